"""zfs send -R trees through snapferry: cut, killed and rebooted anywhere, resumed to what plain zfs receive -d gives."""

from __future__ import annotations

import contextlib
import io
import json
import random
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from snapferry.zfs.codec.replication import read_compound_header
from snapferry.zfs.codec.stream import StreamReader
from snapferry.zfs.codec.tree_token import TreeToken
from snapferry_testkit import zfs_testbed as tb

# With the root, 9 file systems, 3 levels below it.
CHILDREN = ["a", "a/b", "a/b/c", "d", "d/e", "f", "g", "g/h"]
CHECKPOINT = "1M"


def _names(root: str) -> list[str]:
    return [root] + [f"{root}/{c}" for c in CHILDREN]


@pytest.fixture(scope="module")
def tree(bed: tb.Bed) -> str:
    """A tree with 3 snapshots in every file system and mixed properties, local and user ones."""
    root = bed.dataset("rtree")
    tb.sh("zfs", "create", root)
    for n, child in enumerate(CHILDREN):
        props = [["-o", "compression=on"], ["-o", "snapferry:role=backup"], ["-o", "atime=off"], []][n % 4]
        tb.sh("zfs", "create", *props, f"{root}/{child}")
    for step, snap in enumerate(("s1", "s2", "s3")):
        for n, dataset in enumerate(_names(root)):
            _write(tb.mountpoint(dataset) / "data", random.Random(100 * step + n), step)
        tb.sh("zfs", "snapshot", "-r", f"{root}@{snap}")
    tb.sh("zfs", "set", "snapferry:note=kept", f"{root}/a/b@s2")  # a snapshot's own property travels too
    return root


def _write(data: Path, rng: random.Random, step: int) -> None:
    """About 1.5 MiB a file system at first (a stream of a few checkpoints), then changes of every kind."""
    data.mkdir(exist_ok=True)
    if step == 0:
        (data / "big.bin").write_bytes(rng.randbytes(1500 << 10))
        for i in range(10):
            (data / f"f{i}.txt").write_text(str(rng.random()) * rng.randrange(1, 200))
        return
    (data / f"f{step}.txt").unlink()
    with open(data / "big.bin", "r+b") as big:
        big.seek(rng.randrange(1 << 20))
        big.write(rng.randbytes(100 << 10))
    (data / f"new{step}.bin").write_bytes(rng.randbytes(rng.randrange(100 << 10, 600 << 10)))


def _reference(bed: tb.Bed, tree: str, name: str, *send: str) -> str:
    """What plain `zfs send -R SEND | zfs receive -d` makes of the tree."""
    target = bed.target(name)
    top = f"{target}/{tree.partition('/')[2]}"
    if not tb.exists(top):
        tb.sh("zfs", "create", "-p", target)
        sent = subprocess.run(["zfs", "send", "-R", *send], capture_output=True, check=True).stdout
        tb.sh("zfs", "receive", "-d", target, input=sent)
    return top


def _state(top: str) -> dict[str, dict[str, object]]:
    """Every file system below `top`: its snapshots by guid, its files, and every property as
    `zfs get -s local,received` shows it (value and source), the snapshots' own included."""
    snapshots: dict[str, object] = {}
    files: dict[str, object] = {}
    for line in tb.sh("zfs", "get", "-H", "-p", "-r", "-o", "name,value", "guid", top).stdout.decode().splitlines():
        name, guid = line.split("\t")
        if "@" in name:
            snapshots[name[len(top) :]] = int(guid)
        else:
            files[name[len(top) :]] = tb.manifest(tb.mountpoint(name) / "data")
    props: dict[str, object] = {}
    shown = tb.sh("zfs", "get", "-H", "-r", "-s", "local,received", "-o", "name,property,value,source", "all", top)
    for line in shown.stdout.decode().splitlines():
        name, prop, value, source = line.split("\t")
        props[f"{name[len(top) :]} {prop}"] = (value, source)
    return {"snapshots": snapshots, "files": files, "props": props}


def _assert_same_tree(top: str, reference: str) -> None:
    got, want = _state(top), _state(reference)
    differences = {
        f"{part} {key}": (got[part].get(key), want[part].get(key))
        for part in want
        for key in got[part].keys() | want[part].keys()
        if got[part].get(key) != want[part].get(key)
    }
    assert not differences, sorted(differences)


def _finish(target: str, stream: bytes, *flags: str) -> list[int]:
    """snapferry send -t $(snapferry token TARGET) | snapferry receive -s -d TARGET until it succeeds (the whole stream
    again where nothing was committed, as the token's message says); the sizes sent."""
    sizes = []
    for _ in range(5):
        token = tb.snapferry("token", target)
        if token.returncode == 0:
            rest = tb.snapferry("send", "-t", token.stdout.decode().strip())
            assert rest.returncode == 0, rest.stderr
            data = rest.stdout
        else:
            assert "no resume token" in token.stderr, token.stderr
            data = stream
        sizes.append(len(data))
        done = tb.receive(target, data, "-d", *flags, checkpoint=CHECKPOINT)
        if done.returncode == 0:
            return sizes
        # 6: zfs-fuse now and then answers EIO to a piece's receive (docs/RELIABILITY.md); what was committed stays.
        assert done.returncode == 3 or "I/O error" in done.stderr, done.stderr
    raise AssertionError("the tree never completed")


def _cut_then_resume(target: str, stream: bytes, cut: int) -> list[int]:
    tb.sh("zfs", "create", "-p", target)
    cut_short = tb.receive(target, stream[:cut], "-d", checkpoint=CHECKPOINT)
    assert cut_short.returncode == 3 or "I/O error" in cut_short.stderr, cut_short.stderr
    return _finish(target, stream)


@pytest.mark.parametrize("fraction", [0.0005, 0.02, 0.15, 0.35, 0.55, 0.8, 0.97, 0.99995])
def test_a_full_R_stream_cut_anywhere_resumes_to_the_same_tree(bed: tb.Bed, tree: str, fraction: float) -> None:
    stream = tb.send_bytes("-R", f"{tree}@s2")
    reference = _reference(bed, tree, "rref_full", f"{tree}@s2")
    target = bed.target(f"rfull{int(fraction * 100000)}")
    cut = int(len(stream) * fraction)
    sizes = _cut_then_resume(target, stream, cut)
    top = f"{target}/{tree.partition('/')[2]}"
    _assert_same_tree(top, reference)
    # Only what was not committed travels again: at most one checkpoint, plus the header.
    assert sizes[0] <= len(stream) - cut + (1 << 20) + (64 << 10)
    assert tb.snapferry("token", target).returncode != 0  # nothing left to resume
    assert tb.sh("zfs", "get", "-H", "-r", "-s", "local", "-o", "name", "snapferry:rtree", target).stdout == b""


@pytest.mark.parametrize("fraction", [0.01, 0.2, 0.45, 0.6, 0.7, 0.9, 0.99])
def test_an_incremental_R_I_stream_cut_anywhere_resumes(bed: tb.Bed, tree: str, fraction: float) -> None:
    target = bed.target(f"rincr{int(fraction * 100)}")
    tb.sh("zfs", "create", target)
    base = tb.receive(target, tb.send_bytes("-R", f"{tree}@s1"), "-d", checkpoint=CHECKPOINT)
    assert base.returncode == 0, base.stderr
    stream = tb.send_bytes("-R", "-I", "@s1", f"{tree}@s3")
    reference = _reference(bed, tree, "rref_incr", f"{tree}@s3")
    cut = int(len(stream) * fraction)
    cut_short = tb.receive(target, stream[:cut], "-d", "-F", checkpoint=CHECKPOINT)
    assert cut_short.returncode == 3 or "I/O error" in cut_short.stderr, cut_short.stderr
    token = tb.snapferry("token", target)
    if fraction > 0.1:  # past the first checkpoint
        decoded = json.loads(tb.snapferry("token", "--decode", token.stdout.decode().strip()).stdout)
        assert decoded["source"] == f"{tree}@s3" and decoded["incremental_from"] == "@s1" and decoded["intermediates"] is True
    sizes = _finish(target, stream, "-F")
    assert sizes[0] <= len(stream) - cut + (1 << 20) + (64 << 10)
    _assert_same_tree(f"{target}/{tree.partition('/')[2]}", reference)


@pytest.mark.parametrize("incremental", [False, True], ids=["full", "R_I"])
def test_a_plain_zfs_send_R_killed_receiver_and_daemon_restart(bed: tb.Bed, tree: str, incremental: bool) -> None:
    target = bed.target(f"rkilled{int(incremental)}")
    tb.sh("zfs", "create", target)
    send = ["-I", "@s1"] if incremental else []
    if incremental:
        assert tb.receive(target, tb.send_bytes("-R", f"{tree}@s1"), "-d", checkpoint=CHECKPOINT).returncode == 0
    stream = subprocess.run(["zfs", "send", "-R", *send, f"{tree}@s3"], capture_output=True, check=True).stdout
    argv = [*tb.SNAPFERRY, "receive", "-s", "-d", *(["-F"] if incremental else []), "--checkpoint", CHECKPOINT, target]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it may have stopped on its own (zfs-fuse's EIO): the same to resume
        proc.stdin.write(stream[: len(stream) * 3 // 5])
        proc.stdin.flush()
    top = f"{target}/{tree.partition('/')[2]}"
    deadline = time.monotonic() + 60
    while not (tb.exists(f"{top}/d") and tb.piece_names(f"{top}/d")) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.kill()  # SIGKILL: the receiver and whatever zfs receive it had running die mid-piece
    proc.wait()
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    tb.reboot_daemon([bed.src.directory, bed.dst.directory], [bed.src.name, bed.dst.name])
    token = tb.token(target)
    assert token.startswith("sf1r-")
    decoded = json.loads(tb.snapferry("token", "--decode", token).stdout)
    # The partial dataset's last piece may not have been named a checkpoint yet: then it starts over.
    assert decoded["snapshots_received"] > 0 and (decoded["partial"] is None or decoded["partial"]["dataset"].startswith(top))
    _finish(target, stream, *(["-F"] if incremental else []))
    _assert_same_tree(top, _reference(bed, tree, "rref_all", f"{tree}@s3"))


def _substream_starts(stream: bytes) -> list[int]:
    """Where each substream of a -R stream begins."""
    source = io.BytesIO(stream)
    header, _, _ = read_compound_header(source)
    reader = StreamReader(source)
    starts = []
    while (first := reader.read_begin(compound=True)) is not None:
        starts.append(len(header) + reader.bytes_read - len(first[1]))
        for _ in reader.records(first[1], len(first[1]), len(first[1])):
            pass
    return starts


def test_three_interruptions_cost_three_checkpoints_and_send_t_reads_only_what_is_left(bed: tb.Bed, tree: str) -> None:
    """Bytes re-sent after k cuts stay within k checkpoints (and headers); each `send -t` reads from the source only
    the partial dataset's stream and those after it (its json events say where in the partial one it picks up)."""
    stream = tb.send_bytes("-R", f"{tree}@s3")
    starts = _substream_starts(stream)
    target = bed.target("rkcuts")
    tb.sh("zfs", "create", target)
    checkpoint = 1 << 20
    # Three cuts, each inside a dataset's first snapshot past its first checkpoint, then the rest whole.
    sizes = [end - start for start, end in zip(starts, [*starts[1:], len(stream)], strict=True)]
    big = [start for start, size in zip(starts, sizes, strict=True) if size > checkpoint * 5 // 4]
    cut_at = [big[1] + checkpoint * 9 // 8, big[4] + checkpoint * 9 // 8, big[7] + checkpoint * 9 // 8, len(stream)]
    cuts, data, sent, partials = 0, stream, 0, 0
    for at in cut_at:
        cut = len(data) - (len(stream) - at)  # the rest ends as the whole stream does, byte for byte
        sent += cut
        done = tb.receive(target, data[:cut], "-d", checkpoint=CHECKPOINT)
        if at == len(stream) and done.returncode == 0:
            break
        assert done.returncode == 3 or "I/O error" in done.stderr, done.stderr
        rest = tb.snapferry("send", "--json", "-t", tb.token(target))
        assert rest.returncode == 0, rest.stderr
        events = [json.loads(line) for line in rest.stderr.splitlines()]
        plan = next(e for e in events if e["event"] == "stream" and "of" in e)
        # The partial dataset's continuation regenerates its stream up to the checkpoint, and sends from there.
        regenerated = next((e["offset"] for e in events if e["event"] == "stream" and "of" not in e and e["offset"]), 0)
        read = regenerated + len(rest.stdout)
        picks_up = len(stream) - len(rest.stdout) - regenerated  # the partial substream's start, give or take its BEGIN
        partial_start = max(s for s in starts if s <= picks_up + (16 << 10))
        assert read <= len(stream) - partial_start + (64 << 10), (read, len(stream), partial_start)
        assert plan["substreams"] < plan["of"]
        cuts, data, partials = cuts + 1, rest.stdout, partials + bool(regenerated)
    assert partials > 0  # at least one cut fell inside a dataset past its first checkpoint
    _assert_same_tree(f"{target}/{tree.partition('/')[2]}", _reference(bed, tree, "rref_all", f"{tree}@s3"))
    assert sent - len(stream) <= cuts * (checkpoint + (64 << 10)), (sent, len(stream), cuts)


def _tonames(stream: bytes) -> list[str]:
    """Each substream's snapshot, in the stream's order."""
    source = io.BytesIO(stream)
    read_compound_header(source)
    reader = StreamReader(source)
    names = []
    while (first := reader.read_begin(compound=True)) is not None:
        names.append(first[0].toname)
        for _ in reader.records(first[1], len(first[1]), len(first[1])):
            pass
    return names


def test_an_R_I_tree_stays_I_when_a_continuation_begins_with_top_snapshots_only(bed: tb.Bed, tree: str) -> None:
    """The continuation of an -R -I stream no longer shows the snapshots between: a cut after its first substreams, all
    up to the top snapshot, must not turn the tree into -i (which would skip the @s2 of the file systems still to come;
    found on OpenZFS 2.1, whose substream order made it happen)."""
    target = bed.target("rstays")
    tb.sh("zfs", "create", target)
    assert tb.receive(target, tb.send_bytes("-R", f"{tree}@s1"), "-d", checkpoint=CHECKPOINT).returncode == 0
    stream = tb.send_bytes("-R", "-I", "@s1", f"{tree}@s3")
    starts, names = _substream_starts(stream), _tonames(stream)
    # Cut 1 inside a file system's @s3 substream that other file systems' substreams follow.
    n = next(i for i, name in enumerate(names[:-2]) if name.endswith("@s3"))
    first = tb.receive(target, stream[: starts[n] + 200], "-d", "-F", checkpoint=CHECKPOINT)
    assert first.returncode == 3 or "I/O error" in first.stderr, first.stderr
    rest = tb.snapferry("send", "-t", tb.token(target)).stdout
    assert _tonames(rest)[0] == names[n] and any(name.endswith("@s2") for name in _tonames(rest))
    # Cut 2 just inside the continuation's second substream: the first one, to @s3, is complete.
    second = tb.receive(target, rest[: _substream_starts(rest)[1] + 100], "-d", "-F", checkpoint=CHECKPOINT)
    assert second.returncode == 3 or "I/O error" in second.stderr, second.stderr
    assert json.loads(tb.snapferry("token", "--decode", tb.token(target)).stdout)["intermediates"] is True
    _finish(target, stream, "-F")
    _assert_same_tree(f"{target}/{tree.partition('/')[2]}", _reference(bed, tree, "rref_all", f"{tree}@s3"))


def test_receive_A_of_a_tree_keeps_what_it_completed(bed: tb.Bed, tree: str) -> None:
    stream = tb.send_bytes("-R", f"{tree}@s3")
    target = bed.target("rabort")
    tb.sh("zfs", "create", target)
    assert tb.receive(target, stream[: len(stream) // 2], "-d", checkpoint=CHECKPOINT).returncode == 3
    partial = json.loads(tb.snapferry("token", "--decode", tb.token(target)).stdout)["partial"]["dataset"]
    aborted = tb.snapferry("receive", "-A", target)
    assert aborted.returncode == 0, aborted.stderr
    assert "forgot the interrupted -R transfer" in aborted.stderr
    assert not tb.piece_names(partial) if tb.exists(partial) else True
    assert tb.exists(f"{target}/{tree.partition('/')[2]}")  # the completed datasets stay
    assert "no resume token" in tb.snapferry("token", target).stderr


def test_R_stream_damage_and_misuse_are_one_line_errors(bed: tb.Bed, tree: str) -> None:
    stream = bytearray(tb.send_bytes("-R", f"{tree}@s1"))
    target = bed.target("rbad")
    tb.sh("zfs", "create", target)
    stream[400] ^= 0xFF  # inside the header's nvlist
    damaged = tb.receive(target, bytes(stream), "-d")
    assert damaged.returncode != 0 and damaged.stderr.strip().count("\n") == 0
    assert "the -R header's END checksum does not match" in damaged.stderr
    assert tb.snapshot_names(target) == [] and not tb.exists(f"{target}/{tree.partition('/')[2]}")
    single = tb.receive(target, tb.send_bytes(f"{tree}@s1"), "-d")
    assert single.returncode == 2 and "-d, -e, -x and -u are for -R (compound) streams" in single.stderr
    native = tb.receive(target, tb.send_bytes("-R", f"{tree}@s1"), "--mode", "native")
    # zfs-fuse keeps no kernel receive state: a tree in --mode native is refused in one line, as one dataset is.
    assert native.returncode == 4 and "native resume is not available on pool" in native.stderr
    assert native.stderr.strip().count("\n") == 0


def test_x_and_o_change_what_the_tree_receives(bed: tb.Bed, tree: str) -> None:
    """-x leaves a property out of what is received; -o sets it on the top file system, which its descendants then
    inherit (zfs receive's rules; zfs-fuse's own receive has neither option). -u leaves the tree unmounted."""
    target = bed.target("rprops")
    tb.sh("zfs", "create", target)
    done = tb.receive(target, tb.send_bytes("-R", f"{tree}@s1"), "-d", "-u", "-x", "compression", "-o", "snapferry:role=offsite")
    assert done.returncode == 0, done.stderr
    top = f"{target}/{tree.partition('/')[2]}"
    shown = tb.sh("zfs", "get", "-H", "-r", "-o", "name,property,value,source", "compression,atime,snapferry:role", top).stdout.decode()
    props = {(name[len(top) :], prop): (value, source) for name, prop, value, source in (line.split("\t") for line in shown.splitlines())}
    assert props[("", "snapferry:role")] == ("offsite", "local")
    assert props[("/a/b", "snapferry:role")] == ("offsite", f"inherited from {top}")  # sent as "backup", overridden
    assert props[("/a", "compression")][1] != "received"  # sent as "on", left out
    assert props[("/a/b/c", "atime")] == ("off", "received")  # the rest arrives as received
    assert set(tb.sh("zfs", "get", "-H", "-r", "-o", "value", "mounted", top).stdout.decode().split()) == {"no", "-"}


def test_F_of_an_incremental_tree_destroys_what_the_source_does_not_have(bed: tb.Bed, tree: str) -> None:
    """As zfs receive -F -d of an -R -I stream does: snapshots and file systems below the tree that the source does not
    have are destroyed first (here, ones made on the destination only), then the tree is received. (zfs-fuse's own
    receive -F of it fails now and then, with no message, so it is no reference here.)"""
    stream = tb.send_bytes("-R", "-I", "@s1", f"{tree}@s3")
    target = bed.target("rprune")
    tb.sh("zfs", "create", target)
    assert tb.receive(target, tb.send_bytes("-R", f"{tree}@s1"), "-d", checkpoint=CHECKPOINT).returncode == 0
    top = f"{target}/{tree.partition('/')[2]}"
    tb.sh("zfs", "snapshot", f"{top}/a/b@only_here")
    tb.sh("zfs", "create", f"{top}/d/only_here")
    cut = tb.receive(target, stream[: len(stream) // 2], "-d", "-F", checkpoint=CHECKPOINT)
    assert cut.returncode == 3 or "I/O error" in cut.stderr, cut.stderr
    assert "snapferry: destroyed " + f"{top}/d/only_here: not in the -R stream's tree (receive -F)" in cut.stderr
    assert not tb.exists(f"{top}/d/only_here") and not tb.exists(f"{top}/a/b@only_here")
    _finish(target, stream, "-F")
    _assert_same_tree(top, _reference(bed, tree, "rref_all", f"{tree}@s3"))


def test_send_t_refuses_a_renamed_file_system_and_notes_what_is_left_for_the_next_incremental(bed: tb.Bed) -> None:
    """A file system renamed on the source since the cut would land in a second place: refused. One added since (no
    @s2), and a snapshot newer than @s2, are left for the next incremental, and said so."""
    root = bed.dataset("rmoved")
    for dataset in (root, f"{root}/x", f"{root}/y"):
        tb.sh("zfs", "create", dataset)
        _write(tb.mountpoint(dataset) / "data", random.Random(len(dataset)), 0)
    tb.sh("zfs", "snapshot", "-r", f"{root}@s1")
    for dataset in (root, f"{root}/x", f"{root}/y"):
        _write(tb.mountpoint(dataset) / "data", random.Random(len(dataset)), 1)
    tb.sh("zfs", "snapshot", "-r", f"{root}@s2")

    def cut_in_the_second_child_snapshot(target: str, into: int) -> str:
        stream = tb.send_bytes("-R", f"{root}@s2")
        starts = _substream_starts(stream)  # root@s1, root@s2, then each child's s1 and s2
        tb.sh("zfs", "create", target)
        cut = tb.receive(target, stream[: starts[3] + into], "-d", checkpoint=CHECKPOINT)
        assert cut.returncode == 3 or "I/O error" in cut.stderr, cut.stderr
        if cut.returncode == 3:  # inside its BEGIN, or before its first checkpoint: the tree still resumes
            kept = "was kept, the tree's snapshots before it are; " if into > 312 else "3 snapshot(s) received in this run; "
            assert kept + "resume with: snapferry send -t $(snapferry token" in cut.stderr, cut.stderr
        return tb.token(target)

    # zfs-fuse's `zfs rename` of a file system with snapshots answers "dataset is busy" for up to a minute at
    # times, so the rename is the token's: it says the destination holds x's snapshots in /w, as it would after
    # the source's x had been renamed from w. The sender cannot tell the two apart.
    token = TreeToken.decode(cut_in_the_second_child_snapshot(bed.target("rmoved"), 100))
    moved_token = replace(token, where={guid: "/w" if below == "/x" else below for guid, below in token.where.items()})
    moved = tb.snapferry("send", "-t", moved_token.encode())
    assert moved.returncode == 4 and moved.stdout == b"", moved.stderr
    assert f"stale token: {root}/x was renamed on the source since the transfer began (the destination holds its" in moved.stderr
    assert moved.stderr.count("\n") == 1

    target = bed.target("radded")
    token = cut_in_the_second_child_snapshot(target, 4096)
    tb.sh("zfs", "create", f"{root}/added")
    tb.sh("zfs", "snapshot", f"{root}@s3")
    rest = tb.snapferry("send", "--json", "-t", token)
    assert rest.returncode == 0, rest.stderr
    warnings = [e["message"] for e in map(json.loads, rest.stderr.splitlines()) if e["event"] == "warning"]
    left = f"have no @s2 (made since the transfer began?): they are left for the next incremental ({root}/added)"
    assert any(left in w for w in warnings), warnings
    assert "1 snapshot(s) newer than @s2 are left for the next incremental" in warnings
    done = tb.receive(target, rest.stdout, "-d", checkpoint=CHECKPOINT)
    assert done.returncode == 0, done.stderr
    top = f"{target}/{root.partition('/')[2]}"
    assert sorted(tb.sh("zfs", "list", "-H", "-r", "-o", "name", top).stdout.decode().split()) == [top, f"{top}/x", f"{top}/y"]
