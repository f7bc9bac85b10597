"""btrfs checkpoints on a receive root: their names, the transfer state directory, tokens and abort."""

from __future__ import annotations

import binascii
import contextlib
import fcntl
import os
import re
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from uuid import UUID

from snapferry.btrfs.engine import ioctl as ioc
from snapferry.btrfs.engine.naming import BTRFS_TOKEN_PREFIX
from snapferry.core.seal import seal, unseal
from snapferry.errors import Locked, MalformedBtrfsToken, Refused

STATE_DIR = ".snapferry"
MARKER = "stream"
NIL = UUID(int=0)
BTRFS_IOC_SNAP_DESTROY = 0x5000940F  # _IOW(0x94, 15, struct btrfs_ioctl_vol_args): 4096 bytes
_VOL_ARGS = struct.Struct("<q4088s")
_VOL_ARGS_V2 = struct.Struct("<qQQ32x4040s")
# The name is the commit: a checkpoint exists under its full name or not at all (snapshot creation is one transaction).
_CHECKPOINT = re.compile(
    r"^ck-(?P<seq>\d{6,})-(?P<offset>[0-9a-f]+)-(?P<fp>[0-9a-f]{32})-(?P<uuid>[0-9a-f]{32})-(?P<ctransid>[0-9a-f]+)-(?P<parent>[0-9a-f]{32})$"
)
_MARKER_LINE = re.compile(r"^(?P<uuid>[0-9a-f]{32}) (?P<ctransid>[0-9a-f]+) (?P<parent>[0-9a-f]{32})\n$")
_TOKEN_MAX_BODY = 1 << 12


@dataclass(frozen=True)
class StreamIdentity:
    """Which stream a transfer receives: the sent subvolume's uuid and ctransid, and its parent's uuid (nil for a full stream)."""

    uuid: UUID
    ctransid: int
    parent: UUID = NIL

    def marker_text(self) -> str:
        return f"{self.uuid.hex} {self.ctransid:x} {self.parent.hex}\n"

    def describe(self) -> str:
        kind = "full" if self.parent == NIL else f"incremental from {self.parent}"
        return f"{kind} stream of {self.uuid} at transid {self.ctransid}"


@dataclass(frozen=True)
class BtrfsCheckpoint:
    """A read-only snapshot of the partial subvolume after every command before stream byte `offset` was applied."""

    seq: int
    offset: int
    fingerprint: bytes
    identity: StreamIdentity

    @property
    def name(self) -> str:
        i = self.identity
        return f"ck-{self.seq:06d}-{self.offset:x}-{self.fingerprint.hex()}-{i.uuid.hex}-{i.ctransid:x}-{i.parent.hex}"

    @classmethod
    def parse(cls, name: str) -> BtrfsCheckpoint | None:
        m = _CHECKPOINT.match(name)
        if m is None:
            return None
        identity = StreamIdentity(UUID(hex=m["uuid"]), int(m["ctransid"], 16), UUID(hex=m["parent"]))
        return cls(int(m["seq"]), int(m["offset"], 16), bytes.fromhex(m["fp"]), identity)


@dataclass
class TransferState:
    """What snapferry keeps under RECEIVE_ROOT/.snapferry/<subvolume name>/ while a transfer is unfinished."""

    receive_root: Path
    name: str
    identity: StreamIdentity | None = None
    checkpoints: list[BtrfsCheckpoint] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.receive_root / STATE_DIR / self.name

    @property
    def partial(self) -> Path:
        return self.receive_root / self.name

    @property
    def last(self) -> BtrfsCheckpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None


def check_subvol_name(name: str) -> None:
    if not name or "/" in name or "\0" in name or name in (".", "..", STATE_DIR) or len(os.fsencode(name)) > 255:
        raise Refused(f"{name!r} is not a subvolume name snapferry receives")


@contextmanager
def transfer_lock(receive_root: Path, name: str) -> Iterator[None]:
    """Hold the transfer of `name` under receive_root for this process alone; its state directory exists meanwhile.

    The lock is a flock on the state directory, so a killed receiver leaves no stale lock behind.
    """
    check_subvol_name(name)
    directory = receive_root / STATE_DIR / name
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(f"{Locked.PREFIX} {name} under {receive_root} (receiving or aborting it); wait for it or stop it first") from None
        yield
    finally:
        os.close(fd)
        # Left empty (refused before anything started, or finished): not a transfer, so no trace.
        with contextlib.suppress(OSError):
            os.rmdir(directory)
        with contextlib.suppress(OSError):
            os.rmdir(directory.parent)


def read_state(receive_root: Path, name: str) -> TransferState | None:
    """The unfinished transfer of `name` under receive_root, or None if snapferry has none there."""
    check_subvol_name(name)
    state = TransferState(receive_root, name)
    try:
        entries = sorted(os.listdir(state.directory))
    except FileNotFoundError:
        return None
    for entry in entries:
        checkpoint = BtrfsCheckpoint.parse(entry)
        if checkpoint is not None and _is_subvolume(state.directory / entry):
            state.checkpoints.append(checkpoint)
        elif entry == MARKER:
            m = _MARKER_LINE.match((state.directory / entry).read_text())
            if m is not None:
                state.identity = StreamIdentity(UUID(hex=m["uuid"]), int(m["ctransid"], 16), UUID(hex=m["parent"]))
            else:
                state.foreign.append(entry)
        elif entry != MARKER + ".tmp":
            state.foreign.append(entry)
    state.checkpoints.sort(key=lambda c: c.seq)
    return state


def _is_subvolume(path: Path) -> bool:
    try:
        return ioc.is_subvolume_root(os.lstat(path))
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_state(receive_root: Path, name: str, identity: StreamIdentity) -> Path:
    """Create the state directory and its marker durably, before the partial subvolume exists, so that abort knows it is ours."""
    directory = receive_root / STATE_DIR / name
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = directory / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(identity.marker_text())
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, directory / MARKER)
    _fsync_dir(directory)
    _fsync_dir(directory.parent)
    return directory


def snapshot_readonly(dir_fd: int, name: str, source_fd: int) -> None:
    """A read-only snapshot of the subvolume open as source_fd, named `name` in dir_fd.

    The ioctl flushes the source's delalloc, waits for its ordered extents and commits a transaction
    (fs/btrfs/ioctl.c create_snapshot), so once it returns the snapshot and its data are on disk.
    """
    args = _VOL_ARGS_V2.pack(source_fd, ioc.BTRFS_SUBVOL_RDONLY, 0, os.fsencode(name))
    fcntl.ioctl(dir_fd, ioc.BTRFS_IOC_SNAP_CREATE_V2, bytearray(args))


def destroy_subvolume(path: Path) -> None:
    """Delete the subvolume at path (a read-only one too); its directory entry goes at once, its space later."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BTRFS_IOC_SNAP_DESTROY, bytearray(_VOL_ARGS.pack(0, os.fsencode(path.name))))
    finally:
        os.close(fd)


def subvol_info_at(path: Path) -> ioc.SubvolInfo:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return ioc.subvol_info(fd)
    finally:
        os.close(fd)


def is_partial(path: Path) -> bool:
    """A subvolume a receive left unfinished: writable and never stamped with a received uuid."""
    if not _is_subvolume(path):
        return False
    info = subvol_info_at(path)
    return not info.readonly and info.received_uuid == NIL


def is_received(path: Path, identity: StreamIdentity) -> bool:
    if not _is_subvolume(path):
        return False
    info = subvol_info_at(path)
    return info.readonly and info.received_uuid == identity.uuid


def clear_state(state: TransferState) -> None:
    """Remove the checkpoints and the state directory (not the partial subvolume)."""
    for checkpoint in state.checkpoints:
        destroy_subvolume(state.directory / checkpoint.name)
    for entry in (MARKER, MARKER + ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state.directory / entry)
    os.rmdir(state.directory)
    with contextlib.suppress(OSError):  # other transfers' state is still there
        os.rmdir(state.directory.parent)


def abort(receive_root: Path, subvol_name: str) -> None:
    """Remove the unfinished transfer of subvol_name: its partial subvolume and its checkpoints, and nothing snapferry did not create."""
    check_subvol_name(subvol_name)
    if not os.path.isdir(receive_root / STATE_DIR / subvol_name):
        raise Refused(f"no unfinished snapferry transfer of {subvol_name} under {receive_root}: nothing to abort")
    with transfer_lock(receive_root, subvol_name):
        state = read_state(receive_root, subvol_name)
        if state is None:
            raise Refused(f"the transfer of {subvol_name} under {receive_root} has just finished: nothing to abort")
        if state.foreign:
            raise Refused(
                f"refused to abort {subvol_name}: {state.directory} holds {', '.join(state.foreign)}, which snapferry did not create"
            )
        partial = state.partial
        remove_partial = False
        if os.path.lexists(partial):
            if state.identity is not None and is_received(partial, state.identity):
                remove_partial = False  # the transfer finished; only its checkpoints were left
            elif state.identity is not None and is_partial(partial):
                remove_partial = True
            else:
                # Without the marker, written before the partial subvolume is created, it cannot be ours.
                raise Refused(f"refused to abort {subvol_name}: {partial} is not a partial subvolume snapferry received")
        if remove_partial:
            destroy_subvolume(partial)
        clear_state(state)


@dataclass(frozen=True)
class BtrfsToken:
    """Where an interrupted btrfs receive stands: the last checkpoint's position in the stream it belongs to."""

    subvolume: str
    uuid: str
    ctransid: int
    parent: str
    seq: int
    offset: int
    fingerprint: str

    def encode(self) -> str:
        return seal(BTRFS_TOKEN_PREFIX, asdict(self))

    @classmethod
    def decode(cls, text: str) -> BtrfsToken:
        text = text.strip()
        if not text.startswith(BTRFS_TOKEN_PREFIX):
            raise MalformedBtrfsToken(f"malformed token: it does not start with {BTRFS_TOKEN_PREFIX!r} (snapferry's btrfs tokens)")
        try:
            token = cls(**unseal(BTRFS_TOKEN_PREFIX, text, _TOKEN_MAX_BODY))
        except (ValueError, TypeError, RecursionError, zlib.error, binascii.Error):
            raise MalformedBtrfsToken("malformed token: it was damaged in copying (its checksum or structure is wrong)") from None
        token._validate()
        return token

    def _validate(self) -> None:
        ok = (
            isinstance(self.subvolume, str)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (self.ctransid, self.seq, self.offset))
            and all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v) for v in (self.uuid, self.parent, self.fingerprint))
        )
        if not ok:
            raise MalformedBtrfsToken("malformed token: a field has the wrong type or form")
        try:
            check_subvol_name(self.subvolume)
        except Refused:
            raise MalformedBtrfsToken("malformed token: its subvolume name is not one path component") from None


def btrfs_token(receive_root: Path, subvol_name: str) -> str:
    """The token of the last checkpoint of subvol_name's unfinished transfer under receive_root."""
    state = read_state(receive_root, subvol_name)
    last = state.last if state is not None else None
    if last is None:
        raise Refused(f"no checkpoint of an unfinished transfer of {subvol_name} under {receive_root}")
    i = last.identity
    return BtrfsToken(subvol_name, i.uuid.hex, i.ctransid, i.parent.hex, last.seq, last.offset, last.fingerprint.hex()).encode()
