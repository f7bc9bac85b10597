"""The checkpointing btrfs receiver on real btrfs: cut, killed and remounted receives resume to stock `btrfs receive`'s tree."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapferry.btrfs.codec.commands import Cmd
from snapferry.btrfs.codec.stream import CMD_HEADER_SIZE, BtrfsStreamReader, StreamCommand, btrfs_crc32c
from snapferry.btrfs.engine.apply import BtrfsApplier
from snapferry.btrfs.resume.checkpoints import (
    STATE_DIR,
    BtrfsCheckpoint,
    BtrfsToken,
    StreamIdentity,
    abort,
    btrfs_token,
    read_state,
    snapshot_readonly,
    start_state,
    transfer_lock,
)
from snapferry.btrfs.resume.receiver import BtrfsCheckpointReceiver
from snapferry.errors import Refused, StreamChanged, TransferInterrupted
from snapferry_testkit.btrfs_testbed import (
    assert_same_tree,
    describe,
    mkfs,
    require_btrfs,
    run,
    snapshot_pair,
    stock_sends,
    subvol,
    unmount,
)

CHECKPOINT = 64 << 10


@dataclass
class Bed:
    base: Path
    target: Path  # a mounted btrfs to receive into, a fresh directory per test
    loop: str
    stock: Path  # stock `btrfs receive` of every stream
    streams: dict[str, bytes]
    source: Path


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    require_btrfs()
    base = tmp_path_factory.mktemp("resume")
    with ExitStack() as stack:
        mnt = mkfs(stack, base, "source").mnt
        snapshot_pair(mnt / "src", mnt / "snap1", mnt / "snap2")
        streams = {name: path.read_bytes() for name, path in stock_sends(base, mnt / "snap1", mnt / "snap2").items()}
        stock = mkfs(stack, base, "stock").mnt
        for v in ("v1", "v2"):
            (stock / v).mkdir()
            for kind in ("full", "incr"):
                run("btrfs", "receive", "-q", "-f", base / f"{kind}_{v}", stock / v)
        target = mkfs(stack, base, "target").mnt
        loop = run("findmnt", "-n", "-o", "SOURCE", target).strip()
        yield Bed(base, target, loop, stock, streams, mnt)


_counter = iter(range(1_000_000))


def _root(bed: Bed, parent_of: str | None = None) -> Path:
    """A fresh receive root; for an incremental, with its parent already received (by the plain applier)."""
    root = bed.target / f"r{next(_counter)}"
    root.mkdir()
    if parent_of is not None:
        with BtrfsApplier(root) as applier:
            applier.apply_stream(io.BytesIO(bed.streams[parent_of.replace("incr", "full")]))
    return root


def _commands(data: bytes) -> list[StreamCommand]:
    return list(BtrfsStreamReader(io.BytesIO(data)))


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.seen.append((event, fields))

    def offsets(self) -> list[int]:
        return [f["offset"] for e, f in self.seen if e == "checkpoint"]


def _cut(root: Path, data: bytes, at: int, size: int = CHECKPOINT) -> Events:
    events = Events()
    with pytest.raises(TransferInterrupted, match="checkpoint"):
        BtrfsCheckpointReceiver(root, checkpoint_size=size, events=events).receive(io.BytesIO(data[:at]))
    return events


def _check_received(bed: Bed, root: Path, stream: str, got: list[Path], parent: bool) -> None:
    snap = "snap2" if stream.startswith("incr") else "snap1"
    assert got == [root / snap]
    stock = bed.stock / stream[-2:] / snap
    assert_same_tree(stock, root / snap)
    mine, theirs = subvol(root / snap), subvol(stock)
    assert mine.received_uuid == theirs.received_uuid == subvol(bed.source / snap).uuid
    assert mine.readonly and mine.stransid == theirs.stransid
    assert sorted(os.listdir(root)) == sorted([snap] + (["snap1"] if parent else []))


def _resume(bed: Bed, root: Path, stream: str, size: int = CHECKPOINT) -> None:
    events = Events()
    got = BtrfsCheckpointReceiver(root, checkpoint_size=size, events=events).receive(io.BytesIO(bed.streams[stream]))
    _check_received(bed, root, stream, got, stream.startswith("incr"))


@pytest.mark.parametrize("stream", ["full_v1", "incr_v1", "full_v2", "incr_v2"])
def test_cuts_then_resume(bed: Bed, stream: str) -> None:
    data = bed.streams[stream]
    parent = stream if stream.startswith("incr") else None
    # Uncut, for the checkpoint offsets; it also must leave nothing behind.
    root = _root(bed, parent)
    events = Events()
    got = BtrfsCheckpointReceiver(root, checkpoint_size=CHECKPOINT, events=events).receive(io.BytesIO(data))
    _check_received(bed, root, stream, got, parent is not None)
    offsets = events.offsets()
    assert len(offsets) >= 4, offsets
    ends = {c.end_offset for c in _commands(data)}
    for at in (200, len(data) // 3, len(data) // 2 + 7, len(data) - 5, offsets[1], offsets[1] + 1, offsets[-1]):
        root = _root(bed, parent)
        cut = _cut(root, data, at)
        kept = [o for o in offsets if o <= at]
        assert cut.offsets() == kept
        state = read_state(root, "snap2" if parent else "snap1")
        assert state is not None and [c.offset for c in state.checkpoints] == kept[-1:]
        assert at in ends or at not in kept
        _resume(bed, root, stream)
    # Cut twice, the second time while resuming.
    root = _root(bed, parent)
    _cut(root, data, len(data) // 4)
    _cut(root, data, 3 * len(data) // 4)
    _resume(bed, root, stream)


def test_non_idempotent_commands_apply_once(bed: Bed) -> None:
    data = bed.streams["incr_v1"]
    commands = _commands(data)
    namespace = [c for c in commands if c.command.kind in (Cmd.RENAME, Cmd.LINK, Cmd.UNLINK)]
    # btrfs sends the a/b swap as RENAME b -> orphan, LINK b -> a, UNLINK a, RENAME orphan -> a; replayed, it breaks.
    assert sum(c.command.kind == Cmd.RENAME for c in namespace) >= 2 and len(namespace) >= 6
    first = namespace[0].offset
    root = _root(bed, "incr_v1")
    # One checkpoint exactly before the first namespace change; the cut after the last one, all applied to the partial.
    events = _cut(root, data, namespace[-1].end_offset, size=first)
    assert events.offsets() == [first]
    assert (root / "snap2" / "c2").exists() and not (root / "snap2" / "d").exists()
    _resume(bed, root, "incr_v1", size=first)
    assert (root / "snap2" / "a").read_bytes() == b"b" * 5000


def test_sigkill_then_resume(bed: Bed) -> None:
    data = bed.streams["full_v2"]
    root = _root(bed)
    code = (
        "import sys; from pathlib import Path; from snapferry.btrfs.resume.receiver import BtrfsCheckpointReceiver; "
        "BtrfsCheckpointReceiver(Path(sys.argv[1]), checkpoint_size=int(sys.argv[2])).receive(sys.stdin.buffer)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), str(CHECKPOINT)], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data[: 3 * len(data) // 4])
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    target = len(data) // 2
    while time.monotonic() < deadline:
        state = read_state(root, "snap1")
        if state is not None and state.last is not None and state.last.offset >= target:
            break
        time.sleep(0.005)
    else:
        proc.kill()
        pytest.fail("the receiver took no checkpoint past the middle of the stream in 30 s")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    assert (root / "snap1").exists() and not subvol(root / "snap1").readonly
    _resume(bed, root, "full_v2")


def test_resume_after_remount(bed: Bed) -> None:
    data = bed.streams["incr_v2"]
    root = _root(bed, "incr_v2")
    _cut(root, data, 2 * len(data) // 3)
    run("sync")
    unmount(bed.target)
    run("mount", "-o", "noatime", bed.loop, bed.target)
    _resume(bed, root, "incr_v2")


def _restamped(data: bytes, command: StreamCommand, at: int | None = None) -> bytes:
    """The stream with one byte of the command (by default its last) changed and its crc32c made right again."""
    out = bytearray(data)
    end = command.end_offset
    out[end - 1 if at is None else at] ^= 0xFF
    out[command.offset + 6 : command.offset + 10] = bytes(4)
    crc = btrfs_crc32c(out[command.offset : end])
    out[command.offset + 6 : command.offset + 10] = crc.to_bytes(4, "little")
    return bytes(out)


def test_changed_stream_is_refused(bed: Bed) -> None:
    data = bed.streams["full_v1"]
    root = _root(bed)
    cut = _cut(root, data, len(data) // 2)
    checkpoint = cut.offsets()[-1]
    write = next(c for c in _commands(data) if c.command.kind == Cmd.WRITE and c.end_offset < checkpoint and c.size > CMD_HEADER_SIZE + 64)
    changed = _restamped(data, write)
    assert _commands(changed)[-1].command.kind == Cmd.END  # still a valid stream
    before = (sorted(os.listdir(root / STATE_DIR / "snap1")), describe(root / "snap1"))
    with pytest.raises(StreamChanged, match=r"differs from the one checkpointed at stream byte \d+ .*abort the transfer of snap1"):
        BtrfsCheckpointReceiver(root, checkpoint_size=CHECKPOINT).receive(io.BytesIO(changed))
    assert (sorted(os.listdir(root / STATE_DIR / "snap1")), describe(root / "snap1")) == before
    # Another stream into the same name is refused too; the original still resumes.
    begin = _commands(data)[0]
    other = _restamped(data, begin, data.index(subvol(bed.source / "snap1").uuid.bytes, begin.offset))
    with pytest.raises(Refused, match="receives another stream"):
        BtrfsCheckpointReceiver(root, checkpoint_size=CHECKPOINT).receive(io.BytesIO(other))
    # The same snapshot sent with protocol 2 has the same identity but other bytes.
    with pytest.raises(StreamChanged):
        BtrfsCheckpointReceiver(root, checkpoint_size=CHECKPOINT).receive(io.BytesIO(bed.streams["full_v2"]))
    assert (sorted(os.listdir(root / STATE_DIR / "snap1")), describe(root / "snap1")) == before
    _resume(bed, root, "full_v1")


def test_token_and_abort(bed: Bed) -> None:
    data = bed.streams["full_v1"]
    root = _root(bed)
    run("btrfs", "-q", "subvolume", "create", root / "mine")
    (root / "mine" / "keep").write_text("x")
    cut = _cut(root, data, len(data) // 2)
    token = BtrfsToken.decode(btrfs_token(root, "snap1"))
    assert token.offset == cut.offsets()[-1] and token.subvolume == "snap1" and token.uuid == subvol(bed.source / "snap1").uuid.hex
    names = [n for n in os.listdir(root / STATE_DIR / "snap1") if n.startswith("ck-")]
    parsed = [BtrfsCheckpoint.parse(n) for n in names]
    assert len(parsed) == 1 and parsed[0] is not None and parsed[0].name == names[0] and parsed[0].offset == token.offset
    with pytest.raises(Refused, match="malformed token"):
        BtrfsToken.decode(btrfs_token(root, "snap1")[:-3] + "000")
    with pytest.raises(Refused, match="nothing to abort"):
        abort(root, "mine")
    stray = root / STATE_DIR / "snap1" / "notes.txt"
    stray.write_text("someone else's")
    with pytest.raises(Refused, match="notes.txt, which snapferry did not create"):
        abort(root, "snap1")
    assert (root / "snap1").exists() and read_state(root, "snap1") is not None
    stray.unlink()
    abort(root, "snap1")
    assert sorted(os.listdir(root)) == ["mine"] and (root / "mine" / "keep").read_text() == "x"
    # A subvolume that is not the partial one is never removed.
    _cut(root, data, len(data) // 2)
    destroy = ["btrfs", "-q", "subvolume", "delete", root / "snap1"]
    run(*destroy)
    run("btrfs", "-q", "subvolume", "snapshot", "-r", root / "mine", root / "snap1")
    with pytest.raises(Refused, match="not a partial subvolume"):
        abort(root, "snap1")
    assert (root / "snap1" / "keep").exists()


def test_concurrent_receive_refused_and_finished_leftovers_cleaned(bed: Bed) -> None:
    data = bed.streams["full_v1"]
    root = _root(bed)
    _cut(root, data, len(data) // 2)
    busy = r"another snapferry process is working on snap1 under .* \(receiving or aborting it\)"
    with transfer_lock(root, "snap1"), pytest.raises(Refused, match=busy):
        BtrfsCheckpointReceiver(root, checkpoint_size=CHECKPOINT).receive(io.BytesIO(data))
    _resume(bed, root, "full_v1")
    # A crash after END but before the checkpoints went: receiving the stream again only tidies up.
    identity = StreamIdentity(subvol(bed.source / "snap1").uuid, subvol(bed.source / "snap1").ctransid)
    directory = start_state(root, "snap1", identity)
    fd, dir_fd = os.open(root / "snap1", os.O_RDONLY), os.open(directory, os.O_RDONLY)
    try:
        snapshot_readonly(dir_fd, BtrfsCheckpoint(1, 4096, bytes(16), identity).name, fd)
    finally:
        os.close(fd)
        os.close(dir_fd)
    _resume(bed, root, "full_v1")
    # Nothing is left behind by a refusal either.
    run("btrfs", "-q", "subvolume", "delete", root / "snap1")
    (root / "snap1").mkdir()
    with pytest.raises(Refused, match="already exists and snapferry has no unfinished transfer"):
        BtrfsCheckpointReceiver(root, checkpoint_size=CHECKPOINT).receive(io.BytesIO(data))
    assert sorted(os.listdir(root)) == ["snap1"]
