"""Pieces mode on real OpenZFS: modern streams cut and resumed, raw sends, and a zfs-fuse (v23) stream."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from snapferry.zfs.codec.records import HEADER_SIZE, RecordType
from snapferry.zfs.codec.stream import StreamReader
from snapferry_testkit.zfs_testbed import (
    change_tree,
    guid,
    manifest,
    mountpoint,
    piece_names,
    send_bytes,
    sh,
    snapferry,
    snapshot,
    snapshot_names,
    write_tree,
)
from tests.openzfs.conftest import encrypted_source, unlocked_manifest
from tests.openzfs.test_native import modes_chosen

# Carried into the VM by tests/test_openzfs_vm.py: streams made by zfs-fuse (pool v23) on the host.
V23_DIR = Path(os.environ.get("SNAPFERRY_V23_STREAMS", "v23"))


def _receive_pieces(dst: str, data: bytes, mode: tuple[str, ...] = ("--mode", "pieces")) -> tuple[int, str]:
    result = snapferry("receive", "-s", "--json", *mode, "--checkpoint", "1M", dst, input=data)
    return result.returncode, result.stderr


def _checkpoints(stderr: str) -> int:
    return sum(1 for line in stderr.splitlines() if line.startswith("{") and json.loads(line)["event"] == "checkpoint")


@pytest.mark.parametrize("flags", [(), ("-L", "-e", "-c")], ids=["plain", "Lec"])
def test_modern_stream_cut_resumed_in_pieces_then_plain_incremental(pool: str, flags: tuple[str, ...]) -> None:
    fs = f"{pool}/src"
    sh("zfs", "create", fs)
    write_tree(mountpoint(fs), seed=41, megabytes=4, small_files=20)
    guid1, files1 = snapshot(f"{fs}@s1")
    change_tree(mountpoint(fs), seed=42)
    guid2, files2 = snapshot(f"{fs}@s2")
    stream = send_bytes(*flags, f"{fs}@s1")
    dst = f"{pool}/dst"

    rc, stderr = _receive_pieces(dst, stream[: len(stream) * 3 // 4])
    assert rc == 3, stderr
    assert modes_chosen(stderr) == ["pieces"] and _checkpoints(stderr) >= 2
    token = snapferry("token", dst).stdout.decode().strip()
    assert token.startswith("sf1-")
    # -L only shows in a stream (and matters) once the dataset has blocks over 128K.
    assert json.loads(snapferry("token", "--decode", token).stdout)["send_flags"] == ("ec" if flags else "")
    continuation = snapferry("send", "-t", token)
    assert continuation.returncode == 0, continuation.stderr
    assert len(continuation.stdout) < len(stream) // 2
    rc, stderr = _receive_pieces(dst, continuation.stdout)
    assert rc == 0, stderr

    assert guid(f"{dst}@s1") == guid1 and manifest(mountpoint(dst)) == files1
    assert piece_names(dst) == []
    # The chain of pieces ends in the real snapshot: a plain OpenZFS incremental applies on top.
    plain = sh("zfs", "send", *flags, "-i", f"{fs}@s1", f"{fs}@s2").stdout
    sh("zfs", "receive", "-F", dst, input=plain)
    assert guid(f"{dst}@s2") == guid2 and manifest(mountpoint(dst)) == files2


def test_raw_encrypted_stream_in_pieces(pool: str, tmp_path: Path) -> None:
    key = tmp_path / "key"
    fs, snap_guid, files = encrypted_source(pool, key, seed=43)
    stream = send_bytes("-w", f"{fs}@s1")
    dst = f"{pool}/secretcopy"
    rc, stderr = _receive_pieces(dst, stream[: len(stream) * 3 // 4])
    assert rc == 3, stderr
    assert _checkpoints(stderr) >= 2
    continuation = snapferry("send", "-t", snapferry("token", dst).stdout.decode().strip())
    assert continuation.returncode == 0, continuation.stderr
    rc, stderr = _receive_pieces(dst, continuation.stdout)
    assert rc == 0, stderr
    assert guid(f"{dst}@s1") == snap_guid and piece_names(dst) == []
    assert unlocked_manifest(dst, key) == files


def test_v23_stream_from_zfs_fuse_received_in_pieces(pool: str) -> None:
    meta = json.loads((V23_DIR / "v23.json").read_text())
    full = (V23_DIR / "full.stream").read_bytes()
    dst = f"{pool}/fromfuse"
    # No --mode: a zfs-fuse sender has no `zfs send -t`, so snapferry must not pick native resume.
    rc, stderr = _receive_pieces(dst, full, mode=())
    assert rc == 0, stderr
    assert modes_chosen(stderr) == ["pieces"]
    assert _checkpoints(stderr) >= 3
    assert guid(f"{dst}@s1") == meta["guid1"] and piece_names(dst) == []
    assert manifest(mountpoint(dst)) == meta["files1"]
    # zfs-fuse's own incremental, received by plain zfs receive on top of the chain's last snapshot.
    sh("zfs", "receive", "-F", dst, input=(V23_DIR / "incr.stream").read_bytes())
    assert guid(f"{dst}@s2") == meta["guid2"]
    assert snapshot_names(dst) == ["s1", "s2"]
    assert manifest(mountpoint(dst)) == meta["files2"]


def test_corruption_in_flight_is_caught_by_openzfs_and_checkpoints_stay(pool: str) -> None:
    fs = f"{pool}/src"
    sh("zfs", "create", fs)
    write_tree(mountpoint(fs), seed=47, megabytes=4, small_files=20)
    snap_guid, files = snapshot(f"{fs}@s1")
    stream = bytearray(send_bytes(f"{fs}@s1"))
    reader = StreamReader(io.BytesIO(bytes(stream)))
    begin = reader.read_begin()
    assert begin is not None
    records = reader.records(begin[1], len(begin[1]), len(begin[1]))
    victim = next(r for r in records if r.kind == RecordType.WRITE and r.offset > len(stream) * 0.6)
    stream[victim.offset + HEADER_SIZE + 100] ^= 0x01
    dst = f"{pool}/dst"
    # snapferry takes payload checksums from the stream's stamps here; OpenZFS checks them.
    rc, stderr = _receive_pieces(dst, bytes(stream))
    assert rc == 5, stderr
    last = stderr.strip().splitlines()[-1]
    assert "checksum mismatch" in last and "the stream was corrupted in transit after stream byte" in last
    assert "checkpoint(s) before it are intact" in last
    assert _checkpoints(stderr) >= 2
    continuation = snapferry("send", "-t", snapferry("token", dst).stdout.decode().strip())
    assert continuation.returncode == 0, continuation.stderr
    rc, stderr = _receive_pieces(dst, continuation.stdout)
    assert rc == 0, stderr
    assert guid(f"{dst}@s1") == snap_guid and manifest(mountpoint(dst)) == files


def test_send_estimates_incrementals_for_the_eta(pool: str) -> None:
    """`zfs send -nP` gives the bar its total for an incremental too (zfs-fuse cannot: no ETA there)."""
    fs = f"{pool}/estimated"
    sh("zfs", "create", fs)
    write_tree(mountpoint(fs), seed=44, megabytes=4, small_files=20)
    for name, seed in (("s1", 0), ("s2", 45), ("s3", 46)):
        if seed:
            change_tree(mountpoint(fs), seed=seed)
        snapshot(f"{fs}@{name}")
    for args in (["-i", f"{fs}@s1", f"{fs}@s2"], ["-I", f"{fs}@s1", f"{fs}@s3"], [f"{fs}@s3"]):
        result = snapferry("send", "--json", *args)
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
        estimate = next(e["estimate"] for e in events if e["event"] == "stream")
        assert 0.8 * len(result.stdout) <= estimate <= 1.2 * len(result.stdout), (args, estimate, len(result.stdout))
