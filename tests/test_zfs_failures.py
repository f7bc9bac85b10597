"""Bad input, stale tokens, full disks, concurrent receives, aborts and reboots, on real zfs-fuse."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import pytest

from snapferry.zfs.codec.records import HEADER_SIZE
from snapferry_testkit import zfs_testbed as tb


@pytest.fixture(scope="module")
def source(bed: tb.Bed) -> dict[str, object]:
    return tb.two_snapshot_source(bed, seed=11, megabytes=8)


def one_line_error(result: tb.Result, code: int, fragment: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snapferry: "), result.stderr
    assert fragment in lines[0], lines[0]


def test_random_bytes_are_refused_and_nothing_is_created(bed: tb.Bed) -> None:
    dst = bed.target("random")
    result = tb.receive(dst, random.Random(1).randbytes(100_000))
    one_line_error(result, 5, "not a ZFS send stream")
    assert not tb.exists(dst)


def test_empty_input(bed: tb.Bed) -> None:
    one_line_error(tb.receive(bed.target("empty"), b""), 5, "no ZFS stream on input")


def test_truncated_header(bed: tb.Bed, source: dict[str, object]) -> None:
    dst = bed.target("trunc")
    full: bytes = source["full"]  # type: ignore[assignment]
    one_line_error(tb.receive(dst, full[:200]), 3, "input ended inside the BEGIN record")
    assert not tb.exists(dst)


def test_flipped_payload_bit_is_never_committed(bed: tb.Bed, source: dict[str, object]) -> None:
    full = bytearray(source["full"])  # type: ignore[arg-type]
    position = len(full) * 3 // 4
    full[position] ^= 0x10
    dst = bed.target("flipped")
    result = tb.receive(dst, bytes(full))
    one_line_error(result, 5, "were corrupted in transit")
    # Everything committed before the damaged record is intact and resumable.
    offset = json.loads(tb.snapferry("token", "--decode", tb.token(dst)).stdout)["offset"]
    assert offset <= position
    assert tb.resume(dst).returncode == 0
    assert tb.guid(f"{dst}@s1") == source["guid1"]
    assert tb.manifest(tb.mountpoint(dst)) == source["files1"]


def test_flipped_bit_in_plain_zfs_send_stream_is_caught_at_end(bed: tb.Bed, source: dict[str, object]) -> None:
    raw = bytearray(tb.sh("zfs", "send", f"{source['fs']}@s1").stdout)
    raw[len(raw) // 2] ^= 0x01
    dst = bed.target("rawflip")
    result = tb.receive(dst, bytes(raw))
    one_line_error(result, 5, "stream checksum mismatch at END")
    assert "discarded with the partial transfer" in result.stderr
    assert not tb.exists(dst), "unverified checkpoints must not survive a failed END check"


def test_malformed_token(bed: tb.Bed) -> None:
    one_line_error(tb.snapferry("send", "-t", "sf1-garbage-0000"), 4, "malformed token")
    one_line_error(tb.snapferry("token", "--decode", "1-abc-def-0123"), 4, "malformed OpenZFS resume token: ")
    one_line_error(tb.snapferry("send", "-t", "1-abc-def-0123"), 4, "malformed OpenZFS resume token: ")


def test_token_for_another_dataset(bed: tb.Bed, source: dict[str, object]) -> None:
    full: bytes = source["full"]  # type: ignore[assignment]
    dst, other = bed.target("tokA"), bed.target("tokB")
    assert tb.receive(dst, full[: len(full) // 2]).returncode == 3
    assert tb.receive(other, full[: len(full) // 3]).returncode == 3
    continuation = tb.snapferry("send", "-t", tb.token(dst)).stdout
    one_line_error(tb.receive(other, continuation), 4, "its token belongs there, not here")
    assert tb.resume(other).returncode == 0, "the refused stream must leave the other transfer resumable"


def test_stale_token_after_more_progress(bed: tb.Bed, source: dict[str, object]) -> None:
    full: bytes = source["full"]  # type: ignore[assignment]
    dst = bed.target("stale")
    assert tb.receive(dst, full[: len(full) // 3]).returncode == 3
    old = tb.token(dst)
    continuation = tb.snapferry("send", "-t", old).stdout
    assert tb.receive(dst, continuation[: len(continuation) // 2]).returncode == 3
    one_line_error(tb.receive(dst, tb.snapferry("send", "-t", old).stdout), 4, "stale token")
    assert tb.resume(dst).returncode == 0


def test_source_snapshot_destroyed_or_replaced(bed: tb.Bed) -> None:
    fs = bed.dataset("gone")
    tb.sh("zfs", "create", fs)
    tb.write_tree(tb.mountpoint(fs), seed=21, megabytes=4)
    tb.snapshot(f"{fs}@s1")
    stream = tb.send_bytes(f"{fs}@s1")
    dst = bed.target("gone")
    assert tb.receive(dst, stream[: len(stream) // 2]).returncode == 3
    token = tb.token(dst)
    tb.sh("zfs", "destroy", f"{fs}@s1")
    tb.snapshot(f"{fs}@s1")  # same name, another snapshot
    one_line_error(tb.snapferry("send", "-t", token), 4, "no longer exists")
    assert tb.piece_names(dst), "a refused resume keeps the committed progress"
    assert tb.snapferry("receive", "-A", dst).returncode == 0
    assert not tb.exists(dst)


def test_base_snapshot_gone(bed: tb.Bed, source: dict[str, object]) -> None:
    fs = bed.dataset("base")
    tb.sh("zfs", "create", fs)
    root = tb.mountpoint(fs)
    tb.write_tree(root, seed=31, megabytes=4)
    tb.snapshot(f"{fs}@a")
    tb.change_tree(root, seed=32)
    tb.write_tree(root / "more", seed=33, megabytes=4)
    tb.snapshot(f"{fs}@b")
    dst = bed.target("base")
    assert tb.receive(dst, tb.send_bytes(f"{fs}@a")).returncode == 0
    incr = tb.send_bytes("-i", "@a", f"{fs}@b")
    assert tb.receive(dst, incr[: len(incr) // 2]).returncode == 3
    token = tb.token(dst)
    tb.sh("zfs", "destroy", f"{fs}@a")
    one_line_error(tb.snapferry("send", "-t", token), 4, "base snapshot of this incremental")
    result = tb.snapferry("receive", "-A", dst)
    assert result.returncode == 0, result.stderr
    assert tb.snapshot_names(dst) == ["a"]


def test_missing_snapshot(bed: tb.Bed) -> None:
    result = tb.snapferry("send", f"{bed.src.name}/nope@x")
    assert result.returncode == 4, result.stderr
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_out_of_space_then_resume_after_quota_raised(bed: tb.Bed, source: dict[str, object]) -> None:
    parent = bed.target("quota")
    tb.sh("zfs", "create", "-o", "quota=6M", parent)
    dst = f"{parent}/fs"
    result = tb.receive(dst, source["full"])  # type: ignore[arg-type]
    one_line_error(result, 3, "out of space")
    assert tb.piece_names(dst), "checkpoints committed before the disk filled must stay"
    tb.sh("zfs", "set", "quota=none", parent)
    assert tb.resume(dst).returncode == 0
    assert tb.guid(f"{dst}@s1") == source["guid1"]
    assert tb.manifest(tb.mountpoint(dst)) == source["files1"]


def test_concurrent_receive_is_refused(bed: tb.Bed, source: dict[str, object]) -> None:
    dst = bed.target("busy")
    first = subprocess.Popen([*tb.SNAPFERRY, "receive", "-s", dst], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(1.5)
        one_line_error(tb.receive(dst, source["full"]), 4, "another snapferry process is working on")  # type: ignore[arg-type]
    finally:
        assert first.stdin is not None
        first.stdin.close()
        first.wait()


def test_abort_full_and_refuse_foreign_snapshots(bed: tb.Bed, source: dict[str, object]) -> None:
    full: bytes = source["full"]  # type: ignore[assignment]
    dst = bed.target("abort")
    assert tb.receive(dst, full[: len(full) // 2]).returncode == 3
    tb.sh("zfs", "snapshot", f"{dst}@mine")
    one_line_error(tb.snapferry("receive", "-A", dst), 4, "snapferry did not create")
    assert tb.exists(f"{dst}@mine")
    tb.sh("zfs", "destroy", f"{dst}@mine")
    assert tb.snapferry("receive", "-A", dst).returncode == 0
    assert not tb.exists(dst)
    one_line_error(tb.snapferry("token", dst), 1, "no resume token")


def test_fresh_stream_onto_interrupted_transfer_is_refused(bed: tb.Bed, source: dict[str, object]) -> None:
    full: bytes = source["full"]  # type: ignore[assignment]
    dst = bed.target("again")
    assert tb.receive(dst, full[: len(full) // 2]).returncode == 3
    pieces = tb.piece_names(dst)
    one_line_error(tb.receive(dst, full), 4, "already holds an interrupted transfer")
    assert tb.piece_names(dst) == pieces, "never silently re-send from zero"


def test_reboot_daemon_killed_mid_transfer(bed: tb.Bed, source: dict[str, object]) -> None:
    """kill -9 the zfs-fuse daemon while a receive runs, restart it, re-import, resume."""
    full: bytes = source["full"]  # type: ignore[assignment]
    dst = bed.target("reboot")
    receiver = subprocess.Popen([*tb.SNAPFERRY, "receive", "-s", "--checkpoint", "1M", dst], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert receiver.stdin is not None and receiver.stderr is not None
    receiver.stdin.write(full[: len(full) * 2 // 3])
    receiver.stdin.flush()
    deadline = time.monotonic() + 30
    while len(tb.piece_names(dst)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    tb.reboot_daemon([bed.src.directory, bed.dst.directory], [bed.src.name, bed.dst.name])
    receiver.stdin.close()
    receiver.wait(timeout=60)
    err = receiver.stderr.read().decode()
    assert receiver.returncode == 3, err
    assert "Traceback" not in err
    result = tb.resume(dst)
    assert result.returncode == 0, result.stderr
    assert tb.guid(f"{dst}@s1") == source["guid1"]
    assert tb.manifest(tb.mountpoint(dst)) == source["files1"]
    assert tb.piece_names(dst) == []


def test_crash_between_commit_and_checkpoint_name(bed: tb.Bed, source: dict[str, object]) -> None:
    """A piece committed under its open name (killed before the rename) is rolled back, not trusted."""
    full: bytes = source["full"]  # type: ignore[assignment]
    dst = bed.target("window")
    assert tb.receive(dst, full[: len(full) // 2]).returncode == 3
    token = tb.token(dst)
    fields = json.loads(tb.snapferry("token", "--decode", token).stdout)
    # Simulate the crash window: a piece that zfs committed but snapferry never renamed.
    continuation = tb.snapferry("send", "-t", token).stdout
    last = [n for n in tb.piece_names(dst)][-1]
    open_name = f"snapferry-{int(fields['toguid']):016x}-{int(fields['fromguid']):016x}-{fields['seq'] + 1}-open"
    tb.sh("zfs", "snapshot", f"{dst}@{open_name}")
    assert last in tb.piece_names(dst)
    assert tb.snapferry("token", dst).stdout.decode().strip() == token
    result = tb.receive(dst, continuation)
    assert result.returncode == 0, result.stderr
    assert tb.guid(f"{dst}@s1") == source["guid1"]
    assert tb.manifest(tb.mountpoint(dst)) == source["files1"]
    assert tb.piece_names(dst) == []


def test_exit_codes_are_documented() -> None:
    result = tb.snapferry("--help")
    assert result.returncode == 0
    for line in ("3  interrupted", "4  refused", "5  bad stream"):
        assert line in result.stdout.decode()
    assert HEADER_SIZE == 312 and os.geteuid() == 0
