"""Pieces mode on real OpenZFS: modern streams cut and resumed, raw sends, and a zfs-fuse (v23) stream."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from snapferry.zfs.codec.records import HEADER_SIZE, RecordType
from snapferry.zfs.codec.stream import StreamReader
from snapferry.zfs.codec.token import ResumeToken
from snapferry_testkit.zfs_testbed import (
    SNAPFERRY,
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


# --- send -t jumps to the checkpoint on an OpenZFS source (docs/design.md, "Jumping") -----------------------


def _events(stderr: str, name: str) -> list[dict[str, object]]:
    return [e for e in (json.loads(line) for line in stderr.splitlines() if line.startswith("{")) if e["event"] == name]


def _without_position(token: str) -> str:
    """The same checkpoint as an older snapferry's token: no next record, so send -t re-reads the prefix."""
    return dataclasses.replace(ResumeToken.decode(token), next_kind=None, next_object=None, next_offset=None).encode()


def _send_rest(token: str) -> tuple[bytes, dict[str, object], dict[str, object], float]:
    """`send -t --json`: the continuation, its jump and done events, and its wall time."""
    started = time.monotonic()
    result = snapferry("send", "--json", "-t", token)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    return result.stdout, _events(result.stderr, "jump")[0], _events(result.stderr, "done")[-1], elapsed


def _kill_mid_receive(dst: str, data: bytes) -> None:
    """Feed part of `data` to a receive and SIGKILL it once it has committed another checkpoint."""
    before = len(piece_names(dst))
    proc = subprocess.Popen([*SNAPFERRY, "receive", "-s", "--checkpoint", "1M", dst], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) * 2 // 3])
    proc.stdin.flush()
    deadline = time.monotonic() + 300
    while len(piece_names(dst)) <= before and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    time.sleep(2)  # its `zfs receive` child sees the end of its input and gives up the piece in flight


def _record(figures: dict[str, object]) -> None:
    out = Path(os.environ.get("RESULTS", "/tmp")) / "jump_figures.jsonl"
    with out.open("a") as f:
        f.write(json.dumps(figures) + "\n")
    print(figures)


@pytest.mark.parametrize("flags", [(), ("-L", "-e", "-c")], ids=["plain", "Lec-incremental"])
def test_send_t_jumps_to_the_checkpoint(pool: str, flags: tuple[str, ...]) -> None:
    fs = f"{pool}/big"
    sh("zfs", "create", "-o", "recordsize=1M" if flags else "recordsize=128K", fs)
    write_tree(mountpoint(fs), seed=51, megabytes=64 if not flags else 32, small_files=40)
    guid1, files1 = snapshot(f"{fs}@s1")
    dst = f"{pool}/copy"
    if flags:
        # An incremental: the base arrives whole, the -L -e -c incremental in pieces.
        change_tree(mountpoint(fs), seed=52)
        write_tree(mountpoint(fs) / "more", seed=53, megabytes=24, small_files=10)
        guid2, files2 = snapshot(f"{fs}@s2")
        sh("zfs", "receive", "-u", dst, input=sh("zfs", "send", f"{fs}@s1").stdout)
        send_args: tuple[str, ...] = (*flags, "-i", "@s1", f"{fs}@s2")
        final, final_guid, final_files = "s2", guid2, files2
    else:
        send_args = (f"{fs}@s1",)
        final, final_guid, final_files = "s1", guid1, files1
    stream = send_bytes(*send_args)
    started = time.monotonic()
    full_bytes = len(sh("zfs", "send", *send_args).stdout)
    full_time = time.monotonic() - started

    # Cut 1, near the end: the jump reads from the kernel only what follows the checkpoint.
    cut = snapferry("receive", "-s", "--mode", "pieces", "--checkpoint", "4M", dst, input=stream[: len(stream) * 9 // 10])
    assert cut.returncode == 3, cut.stderr
    token = snapferry("token", dst).stdout.decode().strip()
    decoded = ResumeToken.decode(token)
    assert decoded.has_position and decoded.next_kind in (RecordType.WRITE, RecordType.OBJECT, RecordType.WRITE_EMBEDDED)
    jumped, jump, done, jump_time = _send_rest(token)
    assert jump["taken"] is True, jump
    # The same continuation, byte for byte, as re-reading the whole stream gives (an older token).
    reread, no_jump, reread_done, reread_time = _send_rest(_without_position(token))
    assert no_jump["taken"] is False and jumped == reread
    rest = len(stream) - decoded.offset
    assert int(str(done["source_bytes"])) <= rest + (2 << 20) < int(str(reread_done["source_bytes"]))
    _record(
        {
            "test": f"jump-{'Lec-incremental' if flags else 'plain'}",
            "stream_bytes": len(stream),
            "checkpoint": decoded.offset,
            "zfs_send_bytes": full_bytes,
            "zfs_send_s": round(full_time, 2),
            "jump_source_bytes": done["source_bytes"],
            "jump_send_t_s": round(jump_time, 2),
            "reread_source_bytes": reread_done["source_bytes"],
            "reread_send_t_s": round(reread_time, 2),
        }
    )

    # Cut 2 with SIGKILL, in the middle of the jump's continuation; then a stale flag and the rest.
    first = ResumeToken.decode(token)
    _kill_mid_receive(dst, jumped)
    token = snapferry("token", dst).stdout.decode().strip()
    assert ResumeToken.decode(token).seq > first.seq
    wrong_flag = snapferry("send", "-t", token, "-w")
    assert wrong_flag.returncode == 2 and "takes -L/-e/-c/-w from the token" in wrong_flag.stderr.strip().splitlines()[-1]
    # Cut 3, a plain end of input, in the next continuation. After the SIGKILL the checkpoints fall where they fall:
    # a later one may be followed by a record where zfs send -t cannot start, and once (CI, 2026-12-06) a jump here
    # fell back to the re-read for a reason not kept. A fallback is correct (the data is compared below), only
    # slower, so the later jumps are recorded, not required (docs/RELIABILITY.md).
    second, jump, _, _ = _send_rest(token)
    _record({"test": f"jump-{'Lec-incremental' if flags else 'plain'}-after-kill", **jump})
    cut = snapferry("receive", "-s", "--checkpoint", "1M", dst, input=second[: len(second) // 2])
    assert cut.returncode == 3, cut.stderr
    rest_stream, jump, _, _ = _send_rest(snapferry("token", dst).stdout.decode().strip())
    _record({"test": f"jump-{'Lec-incremental' if flags else 'plain'}-last", **jump})
    done_rc = snapferry("receive", "-s", "--checkpoint", "1M", dst, input=rest_stream)
    assert done_rc.returncode == 0, done_rc.stderr
    assert guid(f"{dst}@{final}") == final_guid and piece_names(dst) == []
    sh("zfs", "mount", dst, check=False)
    assert manifest(mountpoint(dst)) == final_files


def test_send_t_falls_back_or_refuses_when_the_position_is_wrong(pool: str) -> None:
    fs = f"{pool}/src"
    sh("zfs", "create", fs)
    write_tree(mountpoint(fs), seed=61, megabytes=16, small_files=10)
    snap_guid, files = snapshot(f"{fs}@s1")
    stream = send_bytes(f"{fs}@s1")
    dst = f"{pool}/dst"
    cut = snapferry("receive", "-s", "--mode", "pieces", "--checkpoint", "2M", dst, input=stream[: len(stream) // 2])
    assert cut.returncode == 3, cut.stderr
    token = ResumeToken.decode(snapferry("token", dst).stdout.decode().strip())
    assert token.next_kind == RecordType.WRITE and token.next_offset is not None, token
    reread = snapferry("send", "-t", _without_position(token.encode())).stdout

    # Inside the checkpoint's block: zfs send -t starts at the block, not there, so send -t re-reads instead.
    inside = dataclasses.replace(token, next_offset=token.next_offset + 512).encode()
    result = snapferry("send", "--json", "-t", inside)
    assert result.returncode == 0, result.stderr
    assert _events(result.stderr, "jump")[0]["taken"] is False
    assert any("no jump to the checkpoint" in str(w["message"]) for w in _events(result.stderr, "warning"))
    assert result.stdout == reread

    # A block further on: the kernel starts there as asked, and the receiver refuses what would skip a block.
    further = dataclasses.replace(token, next_offset=token.next_offset + (128 << 10)).encode()
    skipping = snapferry("send", "-t", further)
    assert skipping.returncode == 0, skipping.stderr
    refused = snapferry("receive", "-s", "--checkpoint", "2M", dst, input=skipping.stdout)
    assert refused.returncode == 4 and "its token was altered" in refused.stderr.strip().splitlines()[-1], refused.stderr

    # A stale token (its snapshot gone from the source) is refused before anything is sent, jump or not.
    stale = snapferry("send", "-t", dataclasses.replace(token, toguid=token.toguid ^ 1).encode())
    assert stale.returncode == 4 and stale.stderr.strip().startswith("snapferry: stale token"), stale.stderr

    done = snapferry("receive", "-s", "--checkpoint", "2M", dst, input=snapferry("send", "-t", token.encode()).stdout)
    assert done.returncode == 0, done.stderr
    assert guid(f"{dst}@s1") == snap_guid and manifest(mountpoint(dst)) == files
