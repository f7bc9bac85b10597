"""Offsite to object storage from btrfs: a directory of read-only snapshots stored, restored, and a killed restore resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from snapferry_testkit.btrfs_testbed import assert_same_tree, fill_tree, mkfs, require_btrfs, snapshot, subvol
from snapferry_testkit.swift_server import SwiftServer
from snapferry_testkit.zfs_testbed import SNAPFERRY

MIB = 1 << 20


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(live subvolume, its snapshots' directory, a btrfs to restore into)."""
    require_btrfs()
    base = tmp_path_factory.mktemp("btrfs_offsite")
    with ExitStack() as stack:
        src = mkfs(stack, base, "source").mnt
        dst = mkfs(stack, base, "target").mnt
        live, snaps = src / "live", src / "snaps"
        snaps.mkdir()
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(live)], check=True)
        fill_tree(live)
        (live / "bulk").write_bytes(os.urandom(6 * MIB))
        snapshot(live, snaps / "day1")
        yield live, snaps, dst


def run(swift: SwiftServer, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [*SNAPFERRY, args[0], "--endpoint-url", swift.endpoint_url, *args[1:]]
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **swift.env()}, timeout=240, check=False)


def test_btrfs_snapshots_stored_restored_and_a_killed_restore_resumed(
    volumes: tuple[Path, Path, Path], swift: SwiftServer, swift_bucket: str
) -> None:
    live, snaps, dst = volumes
    url = f"s3://{swift_bucket}/host1"
    first = run(swift, "sync", "--chunk-size", "1M", str(snaps), url)
    assert first.returncode == 0, first.stderr
    (live / "more").write_bytes(os.urandom(3 * MIB))
    snapshot(live, snaps / "day2")
    second = run(swift, "sync", "--chunk-size", "1M", str(snaps), url)
    assert second.returncode == 0 and "stored day2" in second.stderr, second.stderr
    listing = run(swift, "ls", url).stdout.splitlines()
    assert [line.split()[0] for line in listing] == [f"{snaps}@day1", f"{snaps}@day2"]
    assert "incremental from @day1" in listing[1]

    stored = f"{url}/{str(snaps).strip('/')}@day2"
    target = dst / "restored"
    target.mkdir()
    argv = [*SNAPFERRY, "restore", "--json", "--endpoint-url", swift.endpoint_url, "--checkpoint", "1M", "--jobs", "1", stored, str(target)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env={**os.environ, **swift.env()})
    assert proc.stderr is not None
    for line in proc.stderr:
        if json.loads(line).get("event") == "checkpoint":
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert (target / ".snapferry").exists()

    done = run(swift, "restore", "--json", "--checkpoint", "1M", stored, str(target))
    assert done.returncode == 0, done.stderr
    events = [json.loads(line)["event"] for line in done.stderr.splitlines() if line.startswith("{")]
    assert "resume" in events
    for name in ("day1", "day2"):
        assert_same_tree(snaps / name, target / name)
        assert subvol(target / name).received_uuid == subvol(snaps / name).uuid
    assert run(swift, "verify", url).returncode == 0
