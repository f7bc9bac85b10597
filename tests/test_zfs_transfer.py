"""Transfers through real zfs-fuse: complete, cut at many offsets, killed, and resumed."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapferry.zfs.codec.records import HEADER_SIZE
from snapferry_testkit import zfs_testbed as tb


@pytest.fixture(scope="module")
def source(bed: tb.Bed) -> dict[str, object]:
    return tb.two_snapshot_source(bed, seed=1, megabytes=12)


def assert_matches(dst: str, snap: str, guid: object, files: object) -> None:
    assert tb.guid(f"{dst}@{snap}") == guid
    assert tb.manifest(tb.mountpoint(dst)) == files
    assert tb.piece_names(dst) == [], "checkpoint snapshots must be gone after completion"


def test_full_uninterrupted(bed: tb.Bed, source: dict[str, object]) -> None:
    dst = bed.target("full")
    result = tb.receive(dst, source["full"])  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr
    assert_matches(dst, "s1", source["guid1"], source["files1"])
    assert tb.snapshot_names(dst) == ["s1"]


def test_incremental_uninterrupted_from_plain_zfs_send(bed: tb.Bed, source: dict[str, object]) -> None:
    dst = bed.target("incr")
    assert tb.receive(dst, source["full"]).returncode == 0  # type: ignore[arg-type]
    raw = tb.sh("zfs", "send", "-i", "@s1", f"{source['fs']}@s2").stdout
    result = tb.receive(dst, raw, "-F")
    assert result.returncode == 0, result.stderr
    assert_matches(dst, "s2", source["guid2"], source["files2"])


def test_send_I_carries_every_intermediate_snapshot(bed: tb.Bed, source: dict[str, object]) -> None:
    fs = str(source["fs"])
    tb.sh("zfs", "create", f"{fs}x")
    root = tb.mountpoint(f"{fs}x")
    tb.write_tree(root, seed=7, megabytes=4)
    tb.snapshot(f"{fs}x@a")
    tb.change_tree(root, seed=8)
    tb.snapshot(f"{fs}x@b")
    tb.change_tree(root, seed=9)
    guid_c, files_c = tb.snapshot(f"{fs}x@c")
    dst = bed.target("multi")
    assert tb.receive(dst, tb.send_bytes(f"{fs}x@a")).returncode == 0
    result = tb.receive(dst, tb.send_bytes("-I", "@a", f"{fs}x@c"), "-F")
    assert result.returncode == 0, result.stderr
    assert tb.snapshot_names(dst) == ["a", "b", "c"]
    assert_matches(dst, "c", guid_c, files_c)


def _cut_points(stream_len: int) -> list[tuple[str, int]]:
    return [
        ("start", 0),
        ("mid-begin", 100),
        ("mid-header", HEADER_SIZE + 200),
        ("mid-payload", stream_len // 3 + 1001),
        ("at-checkpoint-size", (1 << 20) + 4096),
        ("before-end", stream_len - HEADER_SIZE),
        ("mid-end", stream_len - 10),
    ]


@pytest.mark.parametrize("kind", ["full", "incr"])
def test_cut_at_many_offsets_then_resume(bed: tb.Bed, source: dict[str, object], kind: str) -> None:
    stream: bytes = source[kind]  # type: ignore[assignment]
    for label, cut in _cut_points(len(stream)):
        dst = bed.target(f"cut{kind}{label}".replace("-", ""))
        if kind == "incr":
            assert tb.receive(dst, source["full"]).returncode == 0  # type: ignore[arg-type]
        cut_run = tb.receive(dst, stream[:cut])
        assert cut_run.returncode in (3, 5), (label, cut_run.stderr)
        assert "Traceback" not in cut_run.stderr
        if cut_run.returncode == 3 and tb.piece_names(dst):
            assert "resume with: snapferry send -t" in cut_run.stderr
            result = tb.resume(dst)
        else:
            # Nothing was committed: the only way on is to send again, and snapferry says so.
            assert "no resume token" in tb.snapferry("token", dst).stderr
            result = tb.receive(dst, stream)
        assert result.returncode == 0, (label, result.stderr)
        snap, guid_key, files_key = ("s1", "guid1", "files1") if kind == "full" else ("s2", "guid2", "files2")
        assert_matches(dst, snap, source[guid_key], source[files_key])


def test_resume_skips_committed_bytes(bed: tb.Bed, source: dict[str, object]) -> None:
    stream: bytes = source["full"]  # type: ignore[assignment]
    dst = bed.target("resent")
    assert tb.receive(dst, stream[: len(stream) // 2]).returncode == 3
    token = tb.token(dst)
    committed = tb.snapferry("token", "--decode", token)
    offset = json.loads(committed.stdout)["offset"]
    continuation = tb.snapferry("send", "-t", token).stdout
    # The continuation is a new BEGIN, the uncommitted rest of the stream, and a new END.
    assert len(continuation) == len(stream) - offset + HEADER_SIZE
    assert offset > len(stream) // 2 - (1 << 20) - (128 << 10)
    assert tb.receive(dst, continuation).returncode == 0
    assert_matches(dst, "s1", source["guid1"], source["files1"])


def test_continuation_is_accepted_by_plain_zfs_receive(bed: tb.Bed, source: dict[str, object]) -> None:
    stream: bytes = source["full"]  # type: ignore[assignment]
    dst = bed.target("plain")
    assert tb.receive(dst, stream[: len(stream) // 2]).returncode == 3
    continuation = tb.snapferry("send", "-t", tb.token(dst)).stdout
    tb.sh("zfs", "receive", "-F", dst, input=continuation)
    tb.sh("zfs", "mount", dst)  # snapferry kept the partial dataset unmounted
    assert tb.guid(f"{dst}@s1") == source["guid1"]
    assert tb.manifest(tb.mountpoint(dst)) == source["files1"]
    # The leftover checkpoints of a transfer finished by plain zfs are ours to clean up.
    assert tb.piece_names(dst)
    assert "no resume token" in tb.snapferry("token", dst).stderr
    assert tb.snapferry("receive", "-A", dst).returncode == 0
    assert tb.snapshot_names(dst) == ["s1"]


PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")


@pytest.fixture
def large_pipes() -> Iterator[None]:
    """Pipes of up to 16 MiB for a while: more than the 4 MiB a sender's splice ring reuses (the usual limit, 1 MiB,
    is less than the ring's half, so that a reader lagging behind never holds memory the ring is about to reuse)."""
    usual = PIPE_MAX_SIZE.read_text()
    PIPE_MAX_SIZE.write_text(str(16 << 20))
    try:
        yield
    finally:
        PIPE_MAX_SIZE.write_text(usual)


def _lagging_read(argv: list[str]) -> bytes:
    """A command's stdout through a 16 MiB pipe, read in small pieces with pauses: the pipe stays full of references
    to memory the sender may reuse only once they have been read."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 16 << 20)
    proc = subprocess.Popen(argv, stdout=write_end)
    os.close(write_end)
    got = bytearray()
    try:
        time.sleep(0.5)
        while chunk := os.read(read_end, 4096):
            got += chunk
            if len(got) % (1 << 20) < 4096:
                time.sleep(0.05)
    finally:
        os.close(read_end)
    assert proc.wait() == 0
    return bytes(got)


@pytest.mark.usefixtures("large_pipes")
def test_send_into_a_lagging_pipe_gives_the_bytes_it_writes_into_a_file(bed: tb.Bed, source: dict[str, object], tmp_path: Path) -> None:
    """Into a pipe the records go by reference (vmsplice) from memory that is reused once the reader took them; into
    a file they are copied. A reader that lags must still get every byte as a file does."""
    stream: bytes = source["full"]  # type: ignore[assignment]
    dst = bed.target("lagging")
    assert tb.receive(dst, stream[: len(stream) // 3]).returncode == 3
    for args in ([f"{source['fs']}@s2"], ["-i", "@s1", f"{source['fs']}@s2"], ["-t", tb.token(dst)]):
        with open(tmp_path / "stream", "wb") as file:
            subprocess.run([*tb.SNAPFERRY, "send", "-q", *args], stdout=file, check=True)
        assert _lagging_read([*tb.SNAPFERRY, "send", "-q", *args]) == (tmp_path / "stream").read_bytes(), args


def _feed_and_kill(dst: str, stream: bytes, upto: int) -> None:
    """Feed `upto` bytes to a real receiver, wait until it has committed, then SIGKILL it."""
    proc = subprocess.Popen([*tb.SNAPFERRY, "receive", "-s", "--checkpoint", "1M", dst], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.write(stream[:upto])
    proc.stdin.flush()
    deadline = time.monotonic() + 30
    while not tb.piece_names(dst) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdin.close()


def test_receiver_sigkilled_mid_piece_then_resumed(bed: tb.Bed, source: dict[str, object]) -> None:
    stream: bytes = source["full"]  # type: ignore[assignment]
    dst = bed.target("killed")
    _feed_and_kill(dst, stream, len(stream) * 2 // 3 + 777)
    assert tb.piece_names(dst)
    result = tb.resume(dst)
    assert result.returncode == 0, result.stderr
    assert_matches(dst, "s1", source["guid1"], source["files1"])


def test_three_interruptions_then_plain_incremental_on_top(bed: tb.Bed, source: dict[str, object]) -> None:
    stream: bytes = source["full"]  # type: ignore[assignment]
    dst = bed.target("thrice")
    assert tb.receive(dst, stream[: len(stream) // 5]).returncode == 3
    for fraction in (2, 3):
        continuation = tb.snapferry("send", "-t", tb.token(dst)).stdout
        result = tb.receive(dst, continuation[: len(continuation) // fraction])
        assert result.returncode == 3, result.stderr
        # Reading the partial destination (atime) between pieces must not break the chain. It is
        # kept unmounted; mount it and read a file that is complete at this point.
        tb.sh("zfs", "mount", dst)
        assert (tb.mountpoint(dst) / "blob0.bin").read_bytes()[:10]
        tb.sh("zfs", "unmount", dst)
        # Every checkpoint, before and after a resume, names the transfer's own base (none: full).
        assert {name.split("-")[2] for name in tb.piece_names(dst)} == {"0" * 16}
    assert tb.resume(dst).returncode == 0
    assert_matches(dst, "s1", source["guid1"], source["files1"])
    tb.sh("zfs", "receive", "-F", dst, input=tb.sh("zfs", "send", "-i", "@s1", f"{source['fs']}@s2").stdout)
    # zfs-fuse's plain receive leaves the FUSE page cache of files read before it: remount.
    tb.sh("zfs", "unmount", dst)
    tb.sh("zfs", "mount", dst)
    assert tb.guid(f"{dst}@s2") == source["guid2"]
    assert tb.manifest(tb.mountpoint(dst)) == source["files2"]


def test_json_events_for_machines(bed: tb.Bed, source: dict[str, object]) -> None:
    dst = bed.target("json")
    result = tb.snapferry("receive", "-s", "--checkpoint", "2M", "--json", dst, input=source["full"])  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["mode", "stream"] and kinds[-1] == "done"
    assert events[0]["mode"] == "pieces", "zfs-fuse has no kernel resume"
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    assert [c["seq"] for c in checkpoints] == list(range(len(checkpoints))) and len(checkpoints) >= 3
    assert events[-1]["bytes"] == len(source["full"])  # type: ignore[arg-type]


def test_compressed_and_rate_limited_stream(bed: tb.Bed, source: dict[str, object]) -> None:
    fs = str(source["fs"])
    compressed = tb.send_bytes("--compress", "zstd:3", f"{fs}@s1")
    assert compressed[:4] == bytes.fromhex("28b52ffd")
    dst = bed.target("zstd")
    cut = tb.receive(dst, compressed[: len(compressed) // 2])
    assert cut.returncode == 3, cut.stderr
    continuation = tb.snapferry("send", "--compress", "zstd", "--bwlimit", "4M", "-t", tb.token(dst))
    assert continuation.returncode == 0, continuation.stderr
    assert tb.receive(dst, continuation.stdout).returncode == 0
    assert_matches(dst, "s1", source["guid1"], source["files1"])
    started = time.monotonic()
    limited = tb.snapferry("send", "--bwlimit", "4M", "-i", "@s1", f"{fs}@s2")
    # A cap can only slow a transfer down: it may never go faster than the rate allows.
    assert time.monotonic() - started >= len(limited.stdout) / (4 << 20) * 0.9
    assert limited.stdout == source["incr"]
    buffered = tb.snapferry("send", "--buffer", "8M", "--compress", "zstd", f"{fs}@s1")
    assert buffered.returncode == 0 and buffered.stdout == compressed


def test_bad_compression_argument_is_a_usage_error(source: dict[str, object]) -> None:
    result = tb.snapferry("send", "--compress", "lz9", f"{source['fs']}@s1")
    assert result.returncode == 2 and "unknown compression" in result.stderr
