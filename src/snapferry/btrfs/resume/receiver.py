"""A btrfs receiver that checkpoints the partial subvolume as read-only snapshots and resumes from the last one."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import cache
from pathlib import Path

from snapferry.btrfs.codec.commands import Cmd
from snapferry.btrfs.codec.stream import (
    CONTINUATION_MAGIC,
    CONTINUATION_SIZE,
    STREAM_HEADER_SIZE,
    BtrfsStreamReader,
    Continuation,
    StreamCommand,
    skip_applied,
)
from snapferry.btrfs.engine import ioctl as ioc
from snapferry.btrfs.engine.apply import CREATES, BtrfsApplier
from snapferry.btrfs.resume.checkpoints import (
    NIL,
    BtrfsCheckpoint,
    StreamIdentity,
    TransferState,
    check_subvol_name,
    clear_state,
    destroy_subvolume,
    is_partial,
    is_received,
    read_state,
    snapshot_readonly,
    start_state,
    transfer_lock,
)
from snapferry.core import hints
from snapferry.core.events import EventSink, ignore_events
from snapferry.core.readahead import read_ahead
from snapferry.core.streamio import Prefixed, Readable, read_exact
from snapferry.errors import (
    BtrfsStreamTruncated,
    OutOfSpace,
    PartialInTheWay,
    PrefixMismatch,
    Refused,
    StreamChanged,
    StreamFormatError,
    TransferInterrupted,
)

DEFAULT_CHECKPOINT_SIZE = 256 << 20
_PROGRESS_EVERY = 1 << 20
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CAPABILITY = b"security.capability"
# Commands whose kind the receive loop looks at after applying them.
_WATCHED = frozenset((Cmd.END, Cmd.SET_XATTR, Cmd.CHOWN, Cmd.FILEATTR))


def resume_hint(receive_root: Path, name: str) -> str:
    where = receive_root / name
    return f"{hints.resume_hint(str(where), str(receive_root), 'SNAPSHOT')}; or abort with: {hints.abort_hint(str(where))}"


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def syncfs(fd: int) -> None:
    """syncfs(2): commit everything written to fd's filesystem (Python 3.11 has no os.syncfs)."""
    if _libc().syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _command_size(item: StreamCommand) -> int:
    return item.size


@contextmanager
def out_of_space_interrupts(receive_root: Path) -> Iterator[None]:
    """A full disk or quota anywhere in a receive (state files, checkpoints, the subvolume) is an interruption to resume."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(f"out of space receiving into {receive_root}: {e.strerror}") from None
        raise


def check_receive_root(path: Path) -> None:
    """Refuse, before reading any stream, a receive directory that is missing or not on btrfs."""
    try:
        fd = os.open(path, _O_DIR)
    except FileNotFoundError:
        raise Refused(f"{path} does not exist: create the directory to receive into (on a btrfs file system)") from None
    except NotADirectoryError:
        raise Refused(f"{path} is not a directory") from None
    try:
        ioc.subvol_info(fd)
    except OSError:
        raise Refused(f"{path} is not on a btrfs file system: snapferry receives btrfs streams into btrfs only") from None
    finally:
        os.close(fd)


class _WriteBehind:
    """Starts writing the received data back on a thread well before the next checkpoint, so that the checkpoint's
    flush finds little left to do and the stream is not stalled for all of it (syncfs releases the GIL)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._flush, daemon=True)
            self._thread.start()

    def _flush(self) -> None:
        with contextlib.suppress(OSError):  # only a head start: the checkpoint's own syncfs reports errors
            syncfs(self._fd)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()


class BtrfsCheckpointReceiver:
    """Receives btrfs send streams into receive_root, taking a checkpoint every `checkpoint_size` stream bytes.

    A checkpoint is a read-only snapshot of the partial subvolume in RECEIVE_ROOT/.snapferry/<name>/ whose
    name holds the stream position after which it was taken (see BtrfsCheckpoint.name). Snapshot creation
    is one btrfs transaction, so a checkpoint exists with its full name or not at all. The partial
    subvolume itself may hold commands applied after the last checkpoint, and replaying RENAME, LINK or
    UNLINK on it would be wrong, so a resume throws it away and starts again from a copy of the checkpoint.
    """

    def __init__(self, receive_root: Path, *, checkpoint_size: int = DEFAULT_CHECKPOINT_SIZE, events: EventSink = ignore_events) -> None:
        if checkpoint_size <= 0:
            raise ValueError("checkpoint_size must be positive")
        self.receive_root = receive_root
        self.checkpoint_size = checkpoint_size
        self.events = events

    def receive(self, source: Readable) -> list[Path]:
        """Receive every stream on source up to its end; the received subvolumes' paths."""
        check_receive_root(self.receive_root)
        received: list[Path] = []
        while True:
            first = bytearray(1)
            if received and read_exact(source, memoryview(first)) == 0:
                return received
            stream = Prefixed(bytes(first), source) if received else source
            with out_of_space_interrupts(self.receive_root):
                received.append(self._receive_one(stream))

    # --- one stream -----------------------------------------------------------------------------

    def _receive_one(self, source: Readable) -> Path:
        head = bytearray(STREAM_HEADER_SIZE)
        got = read_exact(source, memoryview(head))
        continuation: Continuation | None = None
        try:
            if head == CONTINUATION_MAGIC:
                rest = bytearray(CONTINUATION_SIZE - STREAM_HEADER_SIZE)
                continuation = Continuation.decode(head, rest[: read_exact(source, memoryview(rest))])
                reader = BtrfsStreamReader(source)
            else:
                reader = BtrfsStreamReader(Prefixed(bytes(head[:got]), source))
            commands = iter(reader)
            begin = next(commands)
        except BtrfsStreamTruncated as e:
            raise TransferInterrupted(f"{e}; nothing was received") from None
        command = begin.command
        if command.kind not in (Cmd.SUBVOL, Cmd.SNAPSHOT):
            raise StreamFormatError(f"btrfs stream starts with {command.kind.name}, not SUBVOL or SNAPSHOT")
        if continuation is not None:
            reader.jump(continuation.offset, continuation.fingerprint)
        commands = read_ahead(commands, _command_size)
        name = os.fsdecode(command.path)
        check_subvol_name(name)
        identity = StreamIdentity(command.uuid, command.ctransid, command.clone_uuid if command.kind == Cmd.SNAPSHOT else NIL)
        self.events("stream", subvolume=name, uuid=str(identity.uuid), parent=str(identity.parent))
        with transfer_lock(self.receive_root, name):
            return self._receive_locked(reader, commands, begin, name, identity, continuation)

    def _receive_locked(
        self,
        reader: BtrfsStreamReader,
        commands: Iterator[StreamCommand],
        begin: StreamCommand,
        name: str,
        identity: StreamIdentity,
        continuation: Continuation | None,
    ) -> Path:
        # None only if a transfer finishing as we took the lock removed the directory.
        state = read_state(self.receive_root, name) or TransferState(self.receive_root, name)
        resume_from: BtrfsCheckpoint | None = None
        if state.identity is None and not state.checkpoints and not state.foreign:
            if continuation is not None:
                raise Refused(
                    f"stale token: this continues a transfer of {name} at stream byte {continuation.offset}, but {self.receive_root} "
                    f"has no unfinished transfer of {name} (it finished or was aborted); send {name} again from the start"
                )
            if os.path.lexists(state.partial):
                raise PartialInTheWay(f"{state.partial} already exists and snapferry has no unfinished transfer of it")
        else:
            self._check_state(state, identity)
            if is_received(state.partial, identity):
                # A crash between END and removing the checkpoints: the stream is already all there.
                for _ in commands:
                    pass
                clear_state(state)
                self.events("done", subvolume=name, bytes=reader.bytes_read, already=True)
                return state.partial
            if os.path.lexists(state.partial) and (state.identity is None or not is_partial(state.partial)):
                # Without the marker, which is written before the partial subvolume is created, it is not ours.
                raise PartialInTheWay(f"{state.partial} is not the partial subvolume of snapferry's unfinished transfer of {name}")
            resume_from = state.last
        try:
            with out_of_space_interrupts(self.receive_root):
                if continuation is not None:
                    self._check_continuation(continuation, resume_from, name)
                elif resume_from is not None:
                    self._skip_to(commands, resume_from, name)
                elif os.path.lexists(state.partial):
                    destroy_subvolume(state.partial)  # no checkpoint yet: start over
                    self.events("discard", subvolume=name, target=str(state.partial), reason="partial subvolume with no checkpoint")
                start_state(self.receive_root, name, identity)
                source_path = state.directory / resume_from.name if resume_from is not None else None
                if resume_from is not None and os.path.lexists(state.partial):
                    destroy_subvolume(state.partial)
                return self._apply(reader, commands, begin, state, identity, resume_from, source_path)
        except TransferInterrupted as e:  # cut short, or out of space
            kept = read_state(self.receive_root, name)
            count = len(kept.checkpoints) if kept is not None else 0
            last = kept.last if kept is not None else None
            upto = f" (the last at stream byte {last.offset})" if last is not None else ""
            first = "free some space, then " if isinstance(e, OutOfSpace) else ""
            then = resume_hint(self.receive_root, name) if count else f"send {name} again (it restarts from the beginning)"
            summary = f"{count} checkpoint(s) of {name} kept{upto}; {first}{then}"
            raise type(e)(f"{e}; {summary}") from None

    def _check_state(self, state: TransferState, identity: StreamIdentity) -> None:
        if state.foreign:
            raise Refused(f"{state.directory} holds {', '.join(state.foreign)}, which snapferry did not create; refusing to use it")
        if state.identity is not None and state.identity != identity:
            raise Refused(
                f"an unfinished transfer of {state.name} under {self.receive_root} receives another stream ({state.identity.describe()}); "
                f"finish or abort it before receiving this {identity.describe()}"
            )
        stray = [c.name for c in state.checkpoints if c.identity != identity]
        if stray:
            raise Refused(f"checkpoint {stray[0]} in {state.directory} belongs to another stream; abort the transfer of {state.name}")

    def _skip_to(self, commands: Iterator[StreamCommand], checkpoint: BtrfsCheckpoint, name: str) -> None:
        """Read (and crc-check) the already-applied prefix; its fingerprint must be the checkpoint's."""
        try:
            for _ in skip_applied(commands, checkpoint.offset, checkpoint.fingerprint):
                pass
        except PrefixMismatch:
            raise StreamChanged(
                f"refused to resume {name}: this stream differs from the one checkpointed at stream byte {checkpoint.offset} "
                "(an incremental stream changes after a defrag or balance of the source); "
                f"abort the transfer of {name} and receive that snapshot again from the start"
            ) from None
        self.events("resume", subvolume=name, offset=checkpoint.offset, seq=checkpoint.seq)

    def _check_continuation(self, continuation: Continuation, checkpoint: BtrfsCheckpoint | None, name: str) -> None:
        fresh = f"get a fresh token with: snapferry token {self.receive_root / name}"
        if checkpoint is not None and checkpoint.offset > continuation.offset:
            raise Refused(
                f"stale token: the unfinished transfer of {name} has moved past this token (its last checkpoint is at stream byte "
                f"{checkpoint.offset}, the token's at {continuation.offset}); {fresh}"
            )
        if checkpoint is None or (checkpoint.offset, checkpoint.fingerprint) != (continuation.offset, continuation.fingerprint):
            where = f"stream byte {checkpoint.offset}" if checkpoint is not None else "no checkpoint"
            raise Refused(
                f"stale token: this continuation starts at stream byte {continuation.offset}, but the unfinished transfer of {name} "
                f"has its last checkpoint at {where}; {fresh}"
            )
        self.events("resume", subvolume=name, offset=checkpoint.offset, seq=checkpoint.seq)

    def _apply(
        self,
        reader: BtrfsStreamReader,
        commands: Iterator[StreamCommand],
        begin: StreamCommand,
        state: TransferState,
        identity: StreamIdentity,
        resume_from: BtrfsCheckpoint | None,
        source_path: Path | None,
    ) -> Path:
        name = state.name
        seq = resume_from.seq if resume_from is not None else 0
        last_offset = resume_from.offset if resume_from is not None else 0
        previous = resume_from
        capability_pending = sealed = False
        with ExitStack() as stack:
            state_fd = os.open(state.directory, _O_DIR)
            stack.callback(os.close, state_fd)
            applier = stack.enter_context(BtrfsApplier(self.receive_root, resume_from=source_path))
            applier.apply(begin.command)
            partial_fd = os.open(state.partial, _O_DIR)
            stack.callback(os.close, partial_fd)
            write_behind = _WriteBehind(partial_fd)
            stack.callback(write_behind.wait)
            reported = flushed = last_offset
            apply = applier.apply
            # The stream position at which the next progress event, write-behind or checkpoint is due:
            # most commands come before it, and need no more than this comparison.
            due = last_offset
            created_as = applier.apply_created_as
            held: StreamCommand | None = None  # read after a MKFILE that it did not follow
            while True:
                if held is not None:
                    item, held = held, None
                else:
                    got = next(commands, None)
                    if got is None:
                        break  # the reader raises first: a stream without END is truncated
                    item = got
                command = item.command
                kind = command.kind
                if kind in CREATES:
                    # Its RENAME usually comes next: both are applied together, and no checkpoint falls between them.
                    held = next(commands, None)
                    if held is not None and held.command.kind == Cmd.RENAME:
                        created_as(command, held.command)
                        item, held = held, None
                        command, kind = item.command, Cmd.RENAME
                    else:
                        apply(command)
                else:
                    apply(command)
                if kind in _WATCHED:
                    if kind == Cmd.END:
                        break
                    # The applier holds state across these commands that a checkpoint cannot carry:
                    # a capability to put back after the CHOWN, immutable flags to set at END.
                    if kind == Cmd.SET_XATTR and bytes(command.xattr_name) == _CAPABILITY:
                        capability_pending = True
                    elif kind == Cmd.CHOWN:
                        capability_pending = False
                    elif kind == Cmd.FILEATTR and ioc.fs_flags_from_btrfs(command.fileattr) & ioc.FS_FL_SEALING:
                        sealed = True
                end = item.end_offset
                if end < due:
                    continue
                if end - reported >= _PROGRESS_EVERY:
                    self.events("progress", bytes=end)
                    reported = end
                if end - flushed >= self.checkpoint_size // 4:
                    write_behind.start()
                    flushed = end
                if end - last_offset >= self.checkpoint_size and not capability_pending and not sealed:
                    seq += 1
                    checkpoint = BtrfsCheckpoint(seq, end, item.fingerprint, identity)
                    # The snapshot ioctl flushes and commits by itself; syncfs first costs little then and
                    # keeps the checkpoint's durability from resting on that detail alone.
                    write_behind.wait()
                    syncfs(partial_fd)
                    snapshot_readonly(state_fd, checkpoint.name, partial_fd)
                    if previous is not None:
                        destroy_subvolume(state.directory / previous.name)
                    previous, last_offset = checkpoint, end
                    self.events("checkpoint", subvolume=name, seq=seq, offset=end)
                checkpoint_due = last_offset + self.checkpoint_size if not (capability_pending or sealed) else end + 1
                due = min(reported + _PROGRESS_EVERY, flushed + self.checkpoint_size // 4, checkpoint_due)
            received = applier.finished[-1]
        self.events("progress", bytes=reader.bytes_read)
        done = read_state(self.receive_root, name)
        if done is not None:
            clear_state(done)
        self.events("done", subvolume=name, bytes=reader.bytes_read)
        return received
