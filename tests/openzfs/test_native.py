"""Native mode on real OpenZFS: receive -s, token, send -t, receive -A, sync, and every stale-token case."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from snapferry_testkit.zfs_testbed import (
    SNAPFERRY,
    change_tree,
    exists,
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


def _source(pool: str, seed: int = 1, megabytes: int = 4) -> dict[str, object]:
    fs = f"{pool}/src"
    sh("zfs", "create", fs)
    write_tree(mountpoint(fs), seed=seed, megabytes=megabytes)
    guid1, files1 = snapshot(f"{fs}@s1")
    change_tree(mountpoint(fs), seed=seed + 1)
    guid2, files2 = snapshot(f"{fs}@s2")
    return {"fs": fs, "guid1": guid1, "files1": files1, "guid2": guid2, "files2": files2}


def modes_chosen(stderr: str) -> list[str]:
    """The "mode" events of a --json run: which resume mechanism snapferry picked."""
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e["mode"] for e in events if e["event"] == "mode"]


def _interrupt(dst: str, stream: bytes, cut: int) -> str:
    """Feed the first `cut` bytes to a native resumable receive; return the OpenZFS token it leaves."""
    result = snapferry("receive", "-s", "--json", dst, input=stream[:cut])
    assert result.returncode == 3, result.stderr
    assert f"resume with: snapferry send -t $(snapferry token {dst}) | snapferry receive -s {dst}" in result.stderr
    assert modes_chosen(result.stderr) == ["native"]
    token = snapferry("token", dst)
    assert token.returncode == 0, token.stderr
    text = token.stdout.decode().strip()
    assert text.startswith("1-") and text == sh("zfs", "get", "-H", "-o", "value", "receive_resume_token", dst).stdout.decode().strip()
    return text


def _resume(dst: str, token: str, *flags: str) -> None:
    continuation = snapferry("send", *flags, "-t", token)
    assert continuation.returncode == 0, continuation.stderr
    result = snapferry("receive", "-s", dst, input=continuation.stdout)
    assert result.returncode == 0, result.stderr


def test_full_stream_cut_and_resumed_natively(pool: str) -> None:
    src = _source(pool)
    stream = send_bytes(f"{src['fs']}@s1")
    dst = f"{pool}/dst"
    token = _interrupt(dst, stream, len(stream) // 2)
    decoded = snapferry("token", "--decode", token)
    assert decoded.returncode == 0
    assert f"toname = {src['fs']}@s1" in decoded.stdout.decode()
    assert f"toguid = {src['guid1']:#x}" in decoded.stdout.decode()
    _resume(dst, token)
    assert guid(f"{dst}@s1") == src["guid1"]
    assert manifest(mountpoint(dst)) == src["files1"]
    assert snapshot_names(dst) == ["s1"]
    assert snapferry("token", dst).returncode == 1


def test_incremental_with_large_embedded_compressed_records_resumed(pool: str) -> None:
    src = _source(pool, seed=5)
    dst = f"{pool}/dst"
    assert snapferry("receive", "-s", dst, input=send_bytes("-L", "-e", "-c", f"{src['fs']}@s1")).returncode == 0
    incremental = send_bytes("-L", "-e", "-c", "-i", "@s1", f"{src['fs']}@s2")
    token = _interrupt(dst, incremental, len(incremental) * 2 // 3)
    fields = json.loads(snapferry("token", "--decode", "--json", token).stdout)
    assert fields["fromguid"] == src["guid1"] and fields["compressok"] and fields["embedok"]
    _resume(dst, token)
    assert guid(f"{dst}@s2") == src["guid2"]
    assert manifest(mountpoint(dst)) == src["files2"]


def test_encrypted_dataset_sent_raw_and_resumed(pool: str, tmp_path: Path) -> None:
    key = tmp_path / "key"
    fs, snap_guid, files = encrypted_source(pool, key, seed=9)
    stream = send_bytes("-w", f"{fs}@s1")
    dst = f"{pool}/secretcopy"
    token = _interrupt(dst, stream, len(stream) // 2)
    assert json.loads(snapferry("token", "--decode", "--json", token).stdout)["rawok"]
    _resume(dst, token)
    assert guid(f"{dst}@s1") == snap_guid
    assert unlocked_manifest(dst, key) == files


def test_send_t_flags_must_match_the_token(pool: str) -> None:
    src = _source(pool, seed=11, megabytes=2)
    stream = send_bytes(f"{src['fs']}@s1")
    dst = f"{pool}/dst"
    token = _interrupt(dst, stream, len(stream) // 2)
    refused = snapferry("send", "-w", "-t", token)
    assert refused.returncode == 4
    assert refused.stderr.strip() == (
        "snapferry: send -t -w: the interrupted transfer was sent without -w, and a resumed stream must match it; "
        "resume without that flag (send -t takes its flags from the token)"
    )
    _resume(dst, token)
    assert manifest(mountpoint(dst)) == src["files1"]


def test_stale_token_snapshot_destroyed(pool: str) -> None:
    src = _source(pool, seed=13, megabytes=2)
    dst = f"{pool}/dst"
    token = _interrupt(dst, send_bytes(f"{src['fs']}@s1"), 1_000_000)
    sh("zfs", "destroy", f"{src['fs']}@s2")
    sh("zfs", "destroy", f"{src['fs']}@s1")
    result = snapferry("send", "-t", token)
    assert result.returncode == 4 and result.stdout == b""
    assert result.stderr.strip() == (
        f"snapferry: stale token: {src['fs']}@s1 (guid {src['guid1']:#x}) used in the initial send no longer exists; "
        "discard the partial receive on the destination with: snapferry receive -A DATASET, then send again"
    )
    aborted = snapferry("receive", "-A", dst)
    assert aborted.returncode == 0, aborted.stderr
    assert f"discarded the interrupted receive of {src['fs']}@s1 into {dst}" in aborted.stderr
    assert not exists(dst)


def test_stale_token_snapshot_replaced_by_one_of_the_same_name(pool: str) -> None:
    src = _source(pool, seed=17, megabytes=2)
    dst = f"{pool}/dst"
    token = _interrupt(dst, send_bytes(f"{src['fs']}@s1"), 1_000_000)
    sh("zfs", "destroy", f"{src['fs']}@s2")
    sh("zfs", "destroy", f"{src['fs']}@s1")
    sh("zfs", "snapshot", f"{src['fs']}@s1")
    result = snapferry("send", "-t", token)
    assert result.returncode == 4
    assert f"stale token: {src['fs']}@s1 is no longer the same snapshot used in the initial send (guid " in result.stderr
    assert f"{src['guid1']:#x} in the token: destroyed and taken again)" in result.stderr


def test_stale_token_incremental_source_gone(pool: str) -> None:
    src = _source(pool, seed=19, megabytes=2)
    dst = f"{pool}/dst"
    assert snapferry("receive", "-s", dst, input=send_bytes(f"{src['fs']}@s1")).returncode == 0
    incremental = send_bytes("-i", "@s1", f"{src['fs']}@s2")
    token = _interrupt(dst, incremental, len(incremental) // 2)
    sh("zfs", "destroy", f"{src['fs']}@s1")
    result = snapferry("send", "-t", token)
    assert result.returncode == 4
    assert result.stderr.strip() == (
        f"snapferry: stale token: the incremental source of the interrupted transfer (guid {src['guid1']:#x}) no longer "
        f"exists in {src['fs']}; discard the partial receive on the destination with: snapferry receive -A DATASET, "
        "then send again"
    )
    # -A on an incremental removes only the partial state: the base snapshot and its data stay.
    aborted = snapferry("receive", "-A", dst)
    assert aborted.returncode == 0, aborted.stderr
    assert snapshot_names(dst) == ["s1"] and manifest(mountpoint(dst)) == src["files1"]
    assert sh("zfs", "get", "-H", "-o", "value", "receive_resume_token", dst).stdout.decode().strip() == "-"


def test_partial_state_blocks_a_new_stream_with_a_clear_message(pool: str) -> None:
    src = _source(pool, seed=23, megabytes=2)
    dst = f"{pool}/dst"
    assert snapferry("receive", "-s", dst, input=send_bytes(f"{src['fs']}@s1")).returncode == 0
    incremental = send_bytes("-i", "@s1", f"{src['fs']}@s2")
    token = _interrupt(dst, incremental, len(incremental) // 2)
    # The kernel keeps the partial receive in dst/%recv: a rollback or a fresh stream must not run over it.
    again = snapferry("receive", "-s", "-F", dst, input=incremental)
    assert again.returncode == 4
    assert again.stderr.strip() == (
        f"snapferry: {dst} holds an interrupted receive (see: snapferry token {dst}); this stream cannot start another: "
        f"resume with: snapferry send -t $(snapferry token {dst}) | snapferry receive -s {dst}, or discard it with: "
        f"snapferry receive -A {dst}"
    )
    assert snapferry("token", dst).stdout.decode().strip() == token
    _resume(dst, token)
    assert manifest(mountpoint(dst)) == src["files2"]


def test_abort_that_cannot_clear_says_why_and_keeps_the_state(pool: str, tmp_path: Path) -> None:
    src = _source(pool, seed=29, megabytes=2)
    dst = f"{pool}/dst"
    token = _interrupt(dst, send_bytes(f"{src['fs']}@s1"), 1_000_000)
    image = tmp_path / f"{pool}.img"
    sh("zpool", "export", pool)
    sh("zpool", "import", "-o", "readonly=on", "-d", str(image.parent), pool)
    try:
        result = snapferry("receive", "-A", dst)
        assert result.returncode == 4
        assert f"the interrupted receive into {dst} is still there" in result.stderr
        assert f"nothing is lost by: zfs destroy -r {dst}" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert snapferry("token", dst).stdout.decode().strip() == token
    finally:
        sh("zpool", "export", pool)
        sh("zpool", "import", "-d", str(image.parent), pool)
    _resume(dst, token)
    assert manifest(mountpoint(dst)) == src["files1"]


def test_sync_resumes_a_native_partial_receive(pool: str) -> None:
    src = _source(pool, seed=31, megabytes=2)
    dst = f"{pool}/mirror"
    _interrupt(dst, send_bytes(f"{src['fs']}@s1"), 1_000_000)
    plan = snapferry("sync", "--dry-run", src["fs"], dst)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.decode().splitlines()[0].startswith(f"resume the interrupted receive of {src['fs']}@s1 after ")
    result = snapferry("sync", "--json", src["fs"], dst)
    assert result.returncode == 0, result.stderr
    assert set(modes_chosen(result.stderr)) == {"native"}
    assert snapshot_names(dst) == ["s1", "s2"]
    assert guid(f"{dst}@s2") == src["guid2"]
    assert manifest(mountpoint(dst)) == src["files2"]


@pytest.mark.parametrize("requested", [None, "native"])
def test_pool_without_extensible_dataset_uses_pieces(legacy_pool: str, requested: str | None) -> None:
    src = _source(legacy_pool, seed=37, megabytes=2)
    dst = f"{legacy_pool}/dst"
    stream = send_bytes(f"{src['fs']}@s1")
    args = ["receive", "-s", "--json", "--checkpoint", "1M", *(["--mode", requested] if requested else []), dst]
    result = snapferry(*args, input=stream)
    if requested == "native":
        assert result.returncode == 4
        assert result.stderr.strip().endswith(
            f"snapferry: native resume is not available on pool {legacy_pool}: it needs OpenZFS 0.7 or later with the "
            "extensible_dataset feature; use --mode pieces"
        )
        assert not exists(dst)
        return
    assert result.returncode == 0, result.stderr
    assert modes_chosen(result.stderr) == ["pieces"]
    assert manifest(mountpoint(dst)) == src["files1"]


def test_an_encrypted_tree_syncs_raw_and_resumes_without_its_key(pool: str, tmp_path: Path) -> None:
    """sync -r of an encrypted tree sends raw (-w by itself): the replica's keys are never loaded, and a killed
    sync goes on where it stopped."""
    key = tmp_path / "key"
    fs, _, files = encrypted_source(pool, key, seed=61)
    sh("zfs", "create", f"{fs}/child")
    write_tree(mountpoint(f"{fs}/child"), seed=62, megabytes=4)
    sh("zfs", "create", "-V", "8M", f"{fs}/vol")  # a volume in the tree (zfs-fuse has none)
    sh("zfs", "snapshot", "-r", f"{fs}@s2")
    dst = f"{pool}/mirror"
    slow = subprocess.Popen(
        [*SNAPFERRY, "sync", "-q", "--mode", "pieces", "--bwlimit", "1M", "--checkpoint", "1M", "-r", fs, dst],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    # Killed once the first dataset has a checkpoint (pieces: they are snapshots, visible while it runs), named as
    # one: a piece still under its -open name holds no position, and the next run would start it again.
    while not (exists(dst) and [n for n in piece_names(dst) if not n.endswith("-open")]):
        assert slow.poll() is None and time.monotonic() < deadline, "no checkpoint on the destination"
        time.sleep(0.2)
    os.killpg(slow.pid, signal.SIGKILL)
    slow.wait(timeout=30)
    done = subprocess.run([*SNAPFERRY, "sync", "-r", fs, dst], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert "3 dataset(s): 3 done" in done.stderr and " 1 resume(s)" in done.stderr, done.stderr
    assert sh("zfs", "get", "-H", "-o", "value", "type", f"{dst}/vol").stdout.decode().strip() == "volume"
    assert guid(f"{dst}/vol@s2") == guid(f"{fs}/vol@s2")
    for dataset in (dst, f"{dst}/child", f"{dst}/vol"):
        assert sh("zfs", "get", "-H", "-o", "value", "keystatus", dataset).stdout.decode().strip() == "unavailable"
    assert snapshot_names(dst) == ["s1", "s2"] and snapshot_names(f"{dst}/child") == snapshot_names(f"{dst}/vol") == ["s2"]
    assert guid(f"{dst}/child@s2") == guid(f"{fs}/child@s2")
    # Only now, with the key, can anyone read the replica: the same files as the source.
    parent_files = {k: v for k, v in unlocked_manifest(dst, key).items() if not k.startswith("child/")}
    assert parent_files == {k: v for k, v in manifest(mountpoint(fs)).items() if not k.startswith("child/")}
    # Received raw one by one, each replica is its own encryption root: the same key opens each.
    assert unlocked_manifest(f"{dst}/child", key) == manifest(mountpoint(f"{fs}/child"))
    assert files.items() <= parent_files.items()  # what @s1 held is still there at @s2
