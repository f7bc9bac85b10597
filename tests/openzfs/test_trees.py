"""-R trees on real OpenZFS, native and pieces: a stream cut 7 times and resumed, to exactly what `zfs receive -d` makes of it."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapferry.zfs.codec.replication import read_header
from snapferry.zfs.codec.stream import StreamReader
from snapferry.zfs.codec.tree_token import TreeToken
from snapferry_testkit.zfs_testbed import SNAPFERRY, manifest, mountpoint, send_bytes, sh, snapferry
from tests.openzfs.conftest import make_pool

# Three levels, eight file systems, each with its own small files; properties set at every level, one on a snapshot.
FILESYSTEMS = ["", "/a", "/a/b", "/a/c", "/d", "/d/e", "/g", "/g/h"]
PROPS = {
    "": ["compression=gzip", "user:team=ops"],
    "/a": ["atime=off", "user:tier=gold"],
    "/a/b": ["recordsize=32K"],
    "/d": ["compression=off", "user:tier=bronze"],
    "/d/e": ["atime=on"],
    "/g/h": ["user:note=deep"],
}
SNAPS = ["s1", "s2", "s3"]
CHECKPOINT = 1 << 20  # the smallest snapferry takes
FINAL_END = 312
# What one interruption may cost on top of the stream, besides the header sent again: in pieces mode, the part of
# the partial substream after its last checkpoint and the BEGIN of its continuation.
PIECES_SLACK = CHECKPOINT + (64 << 10)


def _write(root: Path, seed: int, step: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed * 10 + step)
    # Two file systems big enough for pieces mode to checkpoint inside their first substream.
    size = 1_200_000 if step == 1 and seed in (1, 5) else 40_000 + 7_000 * (seed % 5)
    (root / f"data{step}.bin").write_bytes(rnd.randbytes(size))
    (root / "log.txt").open("a").write(f"step {step}\n" * 200)
    if step == 2:
        (root / "data1.bin").unlink()
    if step == 3:
        with open(root / "data2.bin", "r+b") as f:
            f.seek(5_000)
            f.write(rnd.randbytes(9_000))


@dataclass(frozen=True)
class Source:
    pool: str
    root: str  # POOL/tree
    full: bytes  # zfs send -R @s3
    incremental: bytes  # zfs send -R -I @s1 @s3
    reference: str  # POOL/ref, where plain zfs receive -d put the tree (its full, then its -I)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    for pool in make_pool(tmp_path_factory.mktemp("trees"), "-O", "compression=lz4"):
        root = f"{pool}/tree"
        for suffix in FILESYSTEMS:
            sh("zfs", "create", *[arg for prop in PROPS.get(suffix, []) for arg in ("-o", prop)], root + suffix)
        for step, snap in enumerate(SNAPS, start=1):
            for n, suffix in enumerate(FILESYSTEMS):
                _write(mountpoint(root + suffix) / "files", n, step)
            sh("zfs", "snapshot", "-r", f"{root}@{snap}")
        sh("zfs", "set", "user:kept=yes", f"{root}/a@s2")  # a property of a snapshot travels too
        full = sh("zfs", "send", "-R", f"{root}@s3").stdout
        incremental = sh("zfs", "send", "-R", "-I", "@s1", f"{root}@s3").stdout
        sh("zfs", "create", f"{pool}/ref")
        sh("zfs", "receive", "-d", f"{pool}/ref", input=sh("zfs", "send", "-R", f"{root}@s1").stdout)
        sh("zfs", "receive", "-F", "-d", f"{pool}/ref", input=incremental)
        yield Source(pool, root, full, incremental, f"{pool}/ref/tree")


def _substreams(stream: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    """The header's length, and (toguid, start, end) of every substream of a -R stream."""
    _, _, start = read_header(stream)
    reader = StreamReader(io.BytesIO(stream[start:]))
    found = []
    while (first := reader.read_begin(compound=True)) is not None:
        begin, begin_bytes = first
        at = start + reader.bytes_read - len(begin_bytes)
        for _ in reader.records(begin_bytes, len(begin_bytes), len(begin_bytes)):
            pass
        found.append((begin.toguid, at, start + reader.bytes_read))
    return start, found


def tree_state(top: str) -> dict[str, object]:
    """Snapshot guids, file hashes, and every property set locally or received, names relative to `top`."""
    state: dict[str, object] = {}
    out = sh("zfs", "get", "-H", "-p", "-r", "-o", "name,value", "guid", top).stdout.decode()
    for line in out.splitlines():
        name, value = line.split("\t")
        rel = name[len(top) :]
        state[rel] = int(value) if "@" in name else manifest(mountpoint(name) / "files")
    out = sh("zfs", "get", "-H", "-r", "-s", "local,received", "-o", "name,property,value,source", "all", top).stdout.decode()
    state["props"] = sorted(line[len(top) :] for line in out.splitlines())
    return state


def _mode_flags(mode: str) -> list[str]:
    """Native is the default's pick on OpenZFS, for a full tree and an incremental one alike."""
    return ["--mode", "pieces"] if mode == "pieces" else []


def _receive(dst: str, data: bytes, mode: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    flags = _mode_flags(mode)
    argv = [*SNAPFERRY, "receive", "-s", "-d", *extra, *flags, "--checkpoint", str(CHECKPOINT), dst]
    return subprocess.run(argv, input=data, capture_output=True, check=False)


def _receive_killed(dst: str, data: bytes, mode: str, complete: set[int], *extra: str) -> None:
    """Feed `data` without ever closing the input, and SIGKILL the receive once it has completed `complete` snapshots."""
    flags = _mode_flags(mode)
    argv = [*SNAPFERRY, "receive", "-s", "-d", *extra, *flags, "--checkpoint", str(CHECKPOINT), dst]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    writer = threading.Thread(target=lambda: _write_quietly(proc.stdin, data), daemon=True)
    writer.start()
    deadline = time.monotonic() + 300
    while not complete <= _guids(dst):
        assert proc.poll() is None and time.monotonic() < deadline, "the receive to be killed ended or got stuck"
        time.sleep(0.5)
    time.sleep(2)  # well inside the next substream
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Its zfs receive sees the end of its input and leaves (native: saving the kernel's partial state).
    while _zfs_running():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _zfs_running() -> bool:
    """Whether any `zfs` process is alive (the VM has no pgrep)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "zfs":
                return True
        except OSError:
            continue
    return False


def _diagnosis(dst: str) -> str:
    token = snapferry("token", dst)
    props = sh("zfs", "get", "-H", "-r", "-o", "name,property,value,source", "snapferry:rtree,receive_resume_token", dst, check=False)
    return f"token: {token.returncode} {token.stderr.strip()}; {props.stdout.decode()} {props.stderr.decode()}"


def _write_quietly(pipe: object, data: bytes) -> None:
    try:
        pipe.write(data)  # type: ignore[attr-defined]
        pipe.flush()  # type: ignore[attr-defined]
    except (BrokenPipeError, ValueError):
        pass


def _guids(top: str) -> set[int]:
    out = sh("zfs", "get", "-H", "-p", "-r", "-o", "name,value", "guid", top, check=False).stdout.decode()
    return {int(value) for name, value in (line.split("\t") for line in out.splitlines()) if "@" in name}


def _token(dst: str) -> tuple[str, dict[str, object]] | None:
    result = snapferry("token", dst)
    if result.returncode == 1:
        return None
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode().strip()
    assert text.startswith("sf1r-"), text
    return text, TreeToken.decode(text).describe()


# Each mode meets both senders and both kinds of tree, in four runs rather than eight (the VM runs at TCG speed).
SCENARIOS = [
    ("full", "native", "zfs"),
    ("full", "pieces", "snapferry"),
    ("incremental", "native", "snapferry"),
    ("incremental", "pieces", "zfs"),
]


@pytest.mark.parametrize(("kind", "mode", "sender"), SCENARIOS)
def test_an_R_stream_cut_seven_times_and_resumed(source: Source, kind: str, mode: str, sender: str) -> None:
    root = source.root
    original = source.full if kind == "full" else source.incremental
    stream = original
    if sender == "snapferry":
        stream = send_bytes("-R", f"{root}@s3") if kind == "full" else send_bytes("-R", "-I", "@s1", f"{root}@s3")
    header_len, subs = _substreams(stream)
    sizes = {guid: end - start for guid, start, end in subs}
    dst = f"{source.pool}/{kind}-{mode}-{sender}"
    sh("zfs", "create", dst)
    extra = ["-F"] if kind == "incremental" else []
    if kind == "incremental":
        sh("zfs", "receive", "-d", dst, input=sh("zfs", "send", "-R", f"{root}@s1").stdout)
    top = f"{dst}/tree"
    started = time.monotonic()

    # 1: inside the header: nothing is received, there is no token, the stream is sent again.
    fed = [header_len // 2]
    result = _receive(dst, stream[: fed[-1]], mode, *extra)
    assert result.returncode == 3, result.stderr
    assert _token(dst) is None

    # 2: inside the third substream, by SIGKILL of the receive (full trees) or a cut input.
    at = subs[2][1] + (subs[2][2] - subs[2][1]) // 2
    fed.append(at)
    if kind == "full":
        _receive_killed(dst, stream[:at], mode, {guid for guid, _, end in subs[:2]}, *extra)
    else:
        result = _receive(dst, stream[:at], mode, *extra)
        assert result.returncode == 3, result.stderr

    # 3-6: inside substreams spread over the rest; 7: inside the final END.
    position, rests = at, []
    targets = [subs[len(subs) * n // 10][1] + 700 for n in (3, 5, 7, 9)] + [len(stream) - 100]
    for n, target in enumerate(targets, start=3):
        found = _token(dst)
        assert found is not None, f"cut {n - 1}: no token: {_diagnosis(dst)}"
        text, decoded = found
        partial = decoded["partial"]
        if partial is not None:
            assert partial["mode"] == mode, decoded
            if n == 3:  # token --decode shows the partial dataset's own state: the kernel's token, or its checkpoint
                shown = json.loads(snapferry("token", "--decode", text).stdout)["partial"]
                assert shown["dataset"].startswith(dst) and ("toname" in shown if mode == "native" else "seq" in shown), shown
        rest = snapferry("send", "-t", text)
        assert rest.returncode == 0, rest.stderr
        rests.append(len(rest.stdout))
        # Only what the destination lacks: the snapshots it has are not read again.
        missing = sum(size for guid, size in sizes.items() if guid not in set(_guids(top)))
        assert len(rest.stdout) <= header_len + missing + FINAL_END + 4096, (len(rest.stdout), missing)
        cut = len(rest.stdout) - 100 if n == 7 else min(header_len + max(target - position, 4096), len(rest.stdout) - 1000)
        fed.append(cut)
        position = max(position, target)
        result = _receive(dst, rest.stdout[:cut], mode, *extra)
        assert result.returncode == 3, f"cut {n}: {result.stderr}"
        assert "resume with: snapferry send -t $(snapferry token" in result.stderr.decode(), result.stderr

    # The last cut left every snapshot in place: the rest is the header and the final END.
    found = _token(dst)
    assert found is not None
    text, decoded = found
    assert decoded["partial"] is None and decoded["snapshots_received"] >= len(subs), decoded
    rest = snapferry("send", "-t", text)
    assert rest.returncode == 0, rest.stderr
    assert len(rest.stdout) == header_len + FINAL_END
    fed.append(len(rest.stdout))
    result = _receive(dst, rest.stdout, mode, *extra)
    assert result.returncode == 0, result.stderr
    assert _token(dst) is None

    _report(kind, mode, sender, len(stream), fed, rests, time.monotonic() - started)
    assert tree_state(top) == tree_state(source.reference), mode
    # The bytes sent again after 7 interruptions: at most the stream plus, per interruption, a header and one partial.
    resent = sum(fed) - len(stream)
    if mode == "pieces":
        assert resent <= 7 * (header_len + PIECES_SLACK), (resent, fed, rests)
    else:
        # The kernel keeps what it has written of the partial substream, not the records still in its receive queue
        # (zfs_recv_queue_length, 16 MiB by default), which it drops when its input ends: one cut can cost that much
        # of the partial substream, never a completed one. Seen on 2.1.11: 370-390 KB at two cuts of 7, 0-50 KB at the others.
        largest = max(sizes.values())
        assert all(loss <= header_len + largest + 4096 for loss in _losses(len(stream), fed, rests)), (fed, rests)
    sh("zfs", "destroy", "-r", dst)


def _losses(size: int, fed: list[int], rests: list[int]) -> list[int]:
    """What each cut after the first cost: what was fed, less how much shorter it made the next `send -t`'s rest (the
    last rest, after the final cut, is the header and the final END: what was fed last)."""
    before = [size, *rests, fed[-1]]
    return [fed[n] - (before[n - 1] - before[n]) for n in range(1, len(before))]


def _report(kind: str, mode: str, sender: str, size: int, fed: list[int], rests: list[int], seconds: float) -> None:
    """The figures, for docs and reviews: $RESULTS comes back from the VM. What each cut cost is what its `send -t`
    (rests) sent beyond what the cut before it had left to send."""
    line = {"kind": kind, "mode": mode, "sender": sender, "stream": size, "fed": fed, "rests": rests, "resent": sum(fed) - size}
    line["losses"] = _losses(size, fed, rests)
    line["seconds"] = round(seconds, 1)
    results = os.environ.get("RESULTS")
    if results:
        with open(Path(results) / "trees.jsonl", "a") as out:
            out.write(json.dumps(line) + "\n")
