"""The btrfs verbs end to end on real btrfs: send | receive -s, cut, killed and remounted, token, send -t, receive -A."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapferry.btrfs.codec.stream import CMD_HEADER_SIZE, CONTINUATION_SIZE, STREAM_HEADER_SIZE
from snapferry.btrfs.resume.checkpoints import STATE_DIR, BtrfsToken
from snapferry.btrfs.resume.sender import BtrfsSendOptions, estimate_stream_size
from snapferry.cli.main import build_parser
from snapferry.cli.send_cmd import split_c
from snapferry_testkit.btrfs_testbed import assert_same_tree, change_tree, fill_tree, mkfs, require_btrfs, run, snapshot_pair, subvol
from snapferry_testkit.zfs_testbed import SNAPFERRY

MIB = 1 << 20


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str


def sf(*args: str | Path, data: bytes | None = None) -> Result:
    proc = subprocess.run([*SNAPFERRY, *map(str, args)], input=data, capture_output=True, timeout=120, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr.decode())


def sent(*args: str | Path) -> bytes:
    out = sf("send", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


@dataclass
class Bed:
    source: Path  # a btrfs holding src (live) and snaps/ (read-only snapshots)
    target: Path  # a btrfs to receive into: a fresh directory per test
    loop: str
    stock: Path  # stock `btrfs receive` of snap1 and snap2

    @property
    def snaps(self) -> Path:
        return self.source / "snaps"

    def root(self, name: str, with_snap1: bool = False) -> Path:
        root = self.target / name
        root.mkdir()
        if with_snap1:
            assert sf("receive", root, data=sent(self.snaps / "snap1")).returncode == 0
        return root


def _fill_with_bulk(live: Path) -> None:
    fill_tree(live)
    (live / "bulk").write_bytes(os.urandom(5 * MIB))


def _change_with_bulk(live: Path) -> None:
    change_tree(live)
    with open(live / "bulk", "r+b") as f:
        f.write(os.urandom(3 * MIB))


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    require_btrfs()
    base = tmp_path_factory.mktemp("btrfs_cli")
    with ExitStack() as stack:
        src = mkfs(stack, base, "source").mnt
        (src / "snaps").mkdir()
        snapshot_pair(src / "src", src / "snaps" / "snap1", src / "snaps" / "snap2", _fill_with_bulk, _change_with_bulk)
        stock = mkfs(stack, base, "stock").mnt
        run("btrfs", "receive", "-q", "-f", _file(base, "full", sent(src / "snaps" / "snap1")), stock)
        run("btrfs", "receive", "-q", "-f", _file(base, "incr", sent("-p", src / "snaps" / "snap1", src / "snaps" / "snap2")), stock)
        target = mkfs(stack, base, "target").mnt
        loop = run("findmnt", "-n", "-o", "SOURCE", target).strip()
        yield Bed(src, target, loop, stock)


def _file(base: Path, name: str, data: bytes) -> Path:
    (base / name).write_bytes(data)
    return base / name


def _token(root: Path) -> str:
    out = sf("token", root)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode().strip()


def _received(bed: Bed, root: Path, snap: str, siblings: tuple[str, ...] = ()) -> None:
    assert_same_tree(bed.stock / snap, root / snap)
    info = subvol(root / snap)
    assert info.readonly and info.received_uuid == subvol(bed.snaps / snap).uuid
    assert sorted(os.listdir(root)) == sorted([snap, *siblings])  # no .snapferry left


@pytest.mark.parametrize("kind", ["full", "incremental", "full_v2"])
def test_cut_then_resume_with_token(bed: Bed, kind: str) -> None:
    incremental = kind == "incremental"
    snap = "snap2" if incremental else "snap1"
    args: list[str | Path] = ["-p", bed.snaps / "snap1"] if incremental else []
    if kind == "full_v2":
        args += ["--proto", "2"]
    data = sent(*args, bed.snaps / snap)
    root = bed.root(kind, with_snap1=incremental)
    cut = sf("receive", "-s", "--checkpoint", "1M", root, data=data[: len(data) * 3 // 4])
    assert cut.returncode == 3, cut.stderr
    assert f"checkpoint(s) of {snap} kept" in cut.stderr and f"snapferry token {root / snap}" in cut.stderr
    token = BtrfsToken.decode(_token(root))
    assert token.subvolume == snap and len(data) // 2 < token.offset <= len(data) * 3 // 4
    # No -p: the parent is found next to the snapshot.
    continuation = sent("-t", token.encode(), *(["--proto", "2"] if kind == "full_v2" else []), bed.snaps / snap)
    # The stream header and first command (they name the stream), then only what was not committed.
    head = STREAM_HEADER_SIZE + CMD_HEADER_SIZE + int.from_bytes(data[STREAM_HEADER_SIZE : STREAM_HEADER_SIZE + 4], "little")
    assert len(continuation) == CONTINUATION_SIZE + head + len(data) - token.offset
    done = sf("receive", "-s", root, data=continuation)
    assert done.returncode == 0, done.stderr
    _received(bed, root, snap, ("snap1",) if incremental else ())
    # What snapferry received is a valid parent for stock btrfs receive's next incremental.
    if not incremental:
        stock_incr = sent("-p", bed.snaps / "snap1", bed.snaps / "snap2")
        run("btrfs", "receive", "-q", root, input=stock_incr)
        assert_same_tree(bed.stock / "snap2", root / "snap2")


@pytest.mark.parametrize("kind", ["full", "incremental", "continuation"])
def test_send_estimates_its_size_for_the_eta(bed: Bed, kind: str) -> None:
    """btrfs has no `zfs send -nP`: a --no-data send on the side gives the progress bar its total."""
    incremental = kind != "full"
    snapshot = bed.snaps / ("snap2" if incremental else "snap1")
    options = BtrfsSendOptions(parent=bed.snaps / "snap1" if incremental else None)
    args: list[str | Path] = ["-p", bed.snaps / "snap1", snapshot] if incremental else [snapshot]
    whole = len(sent(*args))
    offset = 0
    if kind == "continuation":
        root = bed.root("estimated", with_snap1=True)
        data = sent(*args)
        assert sf("receive", "-s", "--checkpoint", "1M", root, data=data[: len(data) // 2]).returncode == 3
        token = _token(root)
        offset = BtrfsToken.decode(token).offset
        args = ["-t", token, *args]
    # Only the WRITE commands' split is reckoned: within 1% of the bytes actually sent.
    estimate = estimate_stream_size(snapshot, options, already_sent=offset)
    assert estimate is not None and abs(estimate - (whole - offset)) <= whole // 100, (estimate, whole, offset)
    # Through the CLI, slowed down so that the send outlasts the estimate (a send that ends first stops it).
    out = sf("send", "--json", "--bwlimit", "1M", *args)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stderr.splitlines()]
    assert [e["total"] for e in events if e["event"] == "estimate"] == [estimate], out.stderr
    quiet = sf("send", "-q", *args)
    assert quiet.returncode == 0 and quiet.stderr == ""


def _receiver_events(proc: subprocess.Popen[bytes]) -> Iterator[dict[str, object]]:
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(b"{"):
            yield json.loads(line)


def test_sigkill_and_remount_then_resume(bed: Bed) -> None:
    root = bed.root("killed")
    data = sent(bed.snaps / "snap1")
    receiver = subprocess.Popen(
        [*SNAPFERRY, "receive", "--json", "-s", "--checkpoint", "1M", str(root)], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert receiver.stdin is not None
    receiver.stdin.write(data[: len(data) - 100_000])
    receiver.stdin.flush()
    for event in _receiver_events(receiver):
        if event["event"] == "checkpoint" and int(str(event["offset"])) > MIB:
            break
    receiver.send_signal(signal.SIGKILL)
    receiver.wait()
    # A reboot: the file system goes away and comes back; only what was committed is there.
    run("umount", bed.target)
    run("mount", "-o", "noatime", bed.loop, bed.target)
    continuation = sent("-t", _token(root), bed.snaps / "snap1")
    done = sf("receive", "-s", root, data=continuation)
    assert done.returncode == 0, done.stderr
    _received(bed, root, "snap1")


def _clone_ready_root(bed: Bed, name: str) -> Path:
    """A receive root holding snap2, snap3's parent, and extra_snap, its clone source (both sides need them)."""
    root = bed.root(name, with_snap1=True)
    assert sf("receive", root, data=sent("-p", bed.snaps / "snap1", bed.snaps / "snap2")).returncode == 0
    assert sf("receive", root, data=sent(bed.source / "extra_snap")).returncode == 0
    return root


def test_changed_stream_is_refused_then_abort_and_restart(bed: Bed) -> None:
    """Other clone sources make other commands of the same snapshot: the resume must notice, never mix."""
    src = bed.source
    run("btrfs", "-q", "subvolume", "create", src / "extra")
    (src / "extra" / "shared").write_bytes(os.urandom(2 * MIB))
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src / "extra", src / "extra_snap")
    run("cp", "--reflink=always", src / "extra" / "shared", src / "src" / "aaa_cloned")
    (src / "src" / "zzz_after").write_bytes(os.urandom(3 * MIB))
    run("btrfs", "-q", "subvolume", "snapshot", "-r", src / "src", bed.snaps / "snap3")
    with_clone = sent("-p", bed.snaps / "snap2", "-c", src / "extra_snap", bed.snaps / "snap3")
    without = sent("-p", bed.snaps / "snap2", bed.snaps / "snap3")
    assert with_clone != without
    root = _clone_ready_root(bed, "changed")
    cut = sf("receive", "-s", "--checkpoint", "1M", root, data=with_clone[: len(with_clone) - 200_000])
    assert cut.returncode == 3, cut.stderr
    token = _token(root)
    refused = sf("send", "-t", token, bed.snaps / "snap3")
    assert refused.returncode == 4 and refused.stdout == b""
    assert "stale token: the stream btrfs send makes of" in refused.stderr and "now differs" in refused.stderr
    assert "snapferry receive -A DIR/snap3" in refused.stderr
    # The full regenerated stream is refused by the receiver too.
    assert "this stream differs from the one checkpointed" in sf("receive", "-s", root, data=without).stderr
    aborted = sf("receive", "-A", root / "snap3")
    assert aborted.returncode == 0, aborted.stderr
    assert sorted(os.listdir(root)) == ["extra_snap", "snap1", "snap2"]
    assert sf("receive", "-s", root, data=without).returncode == 0
    assert_same_tree(bed.snaps / "snap3", root / "snap3")
    # With the same -c, the resume goes on.
    root = _clone_ready_root(bed, "changed_same")
    assert sf("receive", "-s", "--checkpoint", "1M", root, data=with_clone[: len(with_clone) - 200_000]).returncode == 3
    continuation = sent("-t", _token(root), "-p", bed.snaps / "snap2", "-c", src / "extra_snap", bed.snaps / "snap3")
    assert sf("receive", "-s", root, data=continuation).returncode == 0
    assert_same_tree(bed.snaps / "snap3", root / "snap3")


def test_defrag_and_balance_between_attempts(bed: Bed) -> None:
    """After a defrag of the live subvolume and a balance, the resume either goes on identically or is refused."""
    root = bed.root("balanced", with_snap1=True)
    data = sent("-p", bed.snaps / "snap1", bed.snaps / "snap2")
    assert sf("receive", "-s", "--checkpoint", "1M", root, data=data[: len(data) - 300_000]).returncode == 3
    run("btrfs", "filesystem", "defragment", "-r", bed.source / "src")
    run("btrfs", "balance", "start", "--full-balance", bed.source)
    token = _token(root)
    continuation = sf("send", "-t", token, bed.snaps / "snap2")
    if continuation.returncode == 0:
        assert sf("receive", "-s", root, data=continuation.stdout).returncode == 0
        _received(bed, root, "snap2", ("snap1",))
    else:
        assert continuation.returncode == 4 and "now differs from the one received" in continuation.stderr


def test_stale_and_wrong_tokens(bed: Bed) -> None:
    root = bed.root("stale")
    data = sent(bed.snaps / "snap1")
    assert sf("receive", "-s", "--checkpoint", "1M", root, data=data[: len(data) // 3]).returncode == 3
    early = _token(root)
    assert sf("receive", "-s", "--checkpoint", "1M", root, data=data[: 2 * len(data) // 3]).returncode == 3
    late = _token(root)
    assert late != early

    wrong_name = sf("send", "-t", late, bed.snaps / "snap2")
    assert wrong_name.returncode == 4 and "continues the transfer of a snapshot named snap1, not" in wrong_name.stderr
    old = sf("receive", "-s", root, data=sent("-t", early, bed.snaps / "snap1"))
    assert old.returncode == 4
    early_at, late_at = BtrfsToken.decode(early).offset, BtrfsToken.decode(late).offset
    assert f"has moved past this token (its last checkpoint is at stream byte {late_at}, the token's at {early_at})" in old.stderr
    assert "get a fresh token with: snapferry token" in old.stderr
    no_path = sf("send", "-t", late)
    assert no_path.returncode == 2 and "needs the snapshot's path" in no_path.stderr
    # A stock btrfs receive refuses a continuation before creating anything.
    stock = subprocess.run(["btrfs", "receive", str(root)], input=sent("-t", late, bed.snaps / "snap1"), capture_output=True)
    assert stock.returncode != 0 and sorted(os.listdir(root)) == [STATE_DIR, "snap1"]

    # The snapshot taken again under the same name is another snapshot.
    retaken = bed.source / "retaken"
    retaken.mkdir()
    run("btrfs", "-q", "subvolume", "snapshot", "-r", bed.source / "src", retaken / "snap1")
    again = sf("send", "-t", late, retaken / "snap1")
    assert again.returncode == 4 and "stale token:" in again.stderr and "deleted and taken again" in again.stderr

    assert sf("receive", "-A", root).returncode == 0  # the one unfinished transfer under root
    assert os.listdir(root) == []
    after = sf("receive", "-s", root, data=sent("-t", late, bed.snaps / "snap1"))
    assert after.returncode == 4 and "has no unfinished transfer of snap1 (it finished or was aborted)" in after.stderr
    assert os.listdir(root) == []
    none = sf("token", root / "snap1")
    assert none.returncode == 1 and "no resume token" in none.stderr
    nothing = sf("receive", "-A", root / "snap1")
    assert nothing.returncode == 4 and "nothing to abort" in nothing.stderr


def test_send_refusals(bed: Bed) -> None:
    writable = sf("send", bed.source / "src")
    assert writable.returncode == 4 and "read-only" in writable.stderr and writable.stdout == b""
    missing = sf("send", bed.snaps / "nope")
    assert missing.returncode == 4 and "nope" in missing.stderr
    zfs_flag = sf("send", "-L", bed.snaps / "snap1")
    assert zfs_flag.returncode == 2 and "zfs send's" in zfs_flag.stderr
    btrfs_flag = sf("send", "-p", "x", "tank/fs@s")
    assert btrfs_flag.returncode == 2 and "btrfs send's" in btrfs_flag.stderr


def test_receive_directory_refusals(bed: Bed, tmp_path: Path) -> None:
    data = sent(bed.snaps / "snap1")
    not_btrfs = sf("receive", "-s", tmp_path, data=data)
    assert (not_btrfs.returncode, not_btrfs.stderr) == (
        4,
        f"snapferry: {tmp_path} is not on a btrfs file system: snapferry receives btrfs streams into btrfs only\n",
    )
    assert os.listdir(tmp_path) == []  # nothing left behind
    missing = sf("receive", "-s", tmp_path / "nope", data=data)
    assert missing.returncode == 4 and "does not exist: create the directory" in missing.stderr
    root = bed.root("refusals")
    garbage = sf("receive", "-s", root, data=b"not a stream at all, just text\n")
    assert (garbage.returncode, garbage.stderr) == (5, "snapferry: no btrfs-stream magic at the start of input: not a btrfs send stream\n")
    assert os.listdir(root) == []


@pytest.mark.parametrize(
    ("argv", "snapshot", "compressed", "clones"),
    [
        (["-c", "tank/fs@s"], "tank/fs@s", True, []),
        (["-c", "-L", "tank/fs@s"], "tank/fs@s", True, []),
        (["tank/fs@s"], "tank/fs@s", False, []),
        (["-c", "/snaps/a", "-c", "/snaps/b", "/snaps/c"], "/snaps/c", False, ["/snaps/a", "/snaps/b"]),
        (["-c", "/snaps/a", "/snaps/c"], "/snaps/c", False, ["/snaps/a"]),
    ],
)
def test_c_is_zfs_flag_or_btrfs_clone_source(argv: list[str], snapshot: str, compressed: bool, clones: list[str]) -> None:
    args = build_parser().parse_args(["send", *argv])
    assert split_c(args) == clones
    assert (args.snapshot, args.c) == (snapshot, compressed)


def test_full_disk_then_resume(bed: Bed, tmp_path: Path) -> None:
    """The target fills up mid-stream: exit 3 "out of space", checkpoints kept; once space is freed the resume completes."""
    data = sent(bed.snaps / "snap1")
    with ExitStack() as stack:
        small = mkfs(stack, tmp_path, "small").mnt
        root = small / "root"
        root.mkdir()
        st = os.statvfs(small)
        filler = small / "filler"
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - len(data) // 2)
        full = sf("receive", "-s", "--checkpoint", "1M", root, data=data)
        assert full.returncode == 3, full.stderr
        assert "out of space" in full.stderr and full.stderr.count("\n") == 1
        filler.unlink()
        run("btrfs", "filesystem", "sync", small)
        assert "checkpoint(s) of snap1 kept (the last at stream byte" in full.stderr
        token = _token(root / "snap1")
        continuation = sent("-t", token, bed.snaps / "snap1")
        assert len(continuation) < len(data) * 3 // 4
        # Full again before the resume: the snapshot of the checkpoint it starts from cannot be made
        # (found by the chaos runner, which exited 1 with a bare "No space left on device").
        run("btrfs", "filesystem", "sync", small)
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, os.statvfs(small).f_bavail * st.f_frsize)
        again = sf("receive", "-s", root, data=continuation)
        assert again.returncode == 3 and again.stderr.count("\n") == 1, again.stderr
        expected = f"snapferry: out of space receiving into {root}: No space left on device; 1 checkpoint(s) of snap1 kept"
        assert again.stderr.startswith(expected)
        assert _token(root / "snap1") == token  # nothing committed was lost
        filler.unlink()
        done = sf("receive", "-s", root, data=continuation)
        assert done.returncode == 0, done.stderr
        assert_same_tree(bed.stock / "snap1", root / "snap1")
        assert sorted(os.listdir(root)) == ["snap1"]
