"""`snapferry sync` between btrfs directories, locally and through a real sshd on 127.0.0.1: plan, resume, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from snapferry.btrfs.engine.command import Subvolume
from snapferry.btrfs.plan import BtrfsStep, Listing, next_btrfs_step
from snapferry.errors import Refused
from snapferry_testkit.btrfs_testbed import (
    assert_same_tree,
    fill_tree,
    mkfs,
    require_btrfs,
    run,
    snapshot,
    snapshot_pair,
    subvol,
)
from snapferry_testkit.zfs_testbed import SNAPFERRY
from tests.sshd import remote_snapferry, ssh_command, sshd_server  # noqa: F401

MIB = 1 << 20
REMOTE = "root@127.0.0.1"


@dataclass
class Bed:
    live: Path  # the writable subvolume
    snaps: Path  # its read-only snapshots
    target: Path  # a btrfs to receive into

    def snapshot(self, name: str) -> Path:
        return snapshot(self.live, self.snaps / name)

    def fresh_target(self, name: str) -> Path:
        path = self.target / name
        path.mkdir()
        return path


def _fill_with_bulk(live: Path) -> None:
    fill_tree(live)
    (live / "bulk").write_bytes(os.urandom(6 * MIB))


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    require_btrfs()
    base = tmp_path_factory.mktemp("btrfs_sync")
    with ExitStack() as stack:
        src = mkfs(stack, base, "source").mnt
        (src / "snaps").mkdir()
        bed = Bed(src / "live", src / "snaps", mkfs(stack, base, "target").mnt)
        snapshot_pair(bed.live, bed.snaps / "day1", bed.snaps / "day2", _fill_with_bulk)
        (bed.live / "day3").write_bytes(os.urandom(2 * MIB))
        bed.snapshot("day3")
        yield bed


def sync(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    argv = [*SNAPFERRY, "sync", "--remote-snapferry", f"{SNAPFERRY[0]} -m snapferry", *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def _events(stderr: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _plans(stderr: str) -> list[str]:
    return [str(step) for e in _events(stderr) if e["event"] == "plan" for step in e["steps"]]  # type: ignore[attr-defined]


def _replica_of(bed: Bed, target: Path, names: list[str]) -> None:
    assert sorted(os.listdir(target)) == sorted(names)  # no .snapferry left behind
    for name in names:
        assert_same_tree(bed.snaps / name, target / name)
        info = subvol(target / name)
        assert info.readonly and info.received_uuid == subvol(bed.snaps / name).uuid


def test_local_sync_sends_every_snapshot_then_is_up_to_date(bed: Bed) -> None:
    target = bed.fresh_target("local")
    first = sync("--json", bed.snaps, target)
    assert first.returncode == 0, first.stderr
    assert _plans(first.stderr) == ["full send of day1", "incremental day1 -> day2", "incremental day2 -> day3"]
    _replica_of(bed, target, ["day1", "day2", "day3"])
    again = sync(bed.snaps, target)
    assert again.returncode == 0 and "up to date" in again.stderr


def test_no_stream_and_dry_run(bed: Bed) -> None:
    target = bed.fresh_target("nostream")
    plan = sync("--dry-run", bed.snaps, target)
    assert plan.returncode == 0
    assert plan.stdout.splitlines() == ["full send of day1", "incremental day1 -> day2", "incremental day2 -> day3"]
    assert os.listdir(target) == []
    done = sync("--json", "--no-stream", bed.snaps, target)
    assert done.returncode == 0, done.stderr
    assert _plans(done.stderr) == ["full send of day3"]
    _replica_of(bed, target, ["day3"])


def test_sync_over_ssh_push_and_pull(bed: Bed, ssh_command: str) -> None:  # noqa: F811
    pushed = bed.fresh_target("pushed")
    push = sync("--json", "--ssh", ssh_command, bed.snaps, f"{REMOTE}:{pushed}")
    assert push.returncode == 0, push.stderr
    _replica_of(bed, pushed, ["day1", "day2", "day3"])
    pulled = bed.fresh_target("pulled")
    pull = sync("-q", "--ssh", ssh_command, f"{REMOTE}:{bed.snaps}", pulled)
    assert pull.returncode == 0, pull.stderr
    _replica_of(bed, pulled, ["day1", "day2", "day3"])


def test_killed_sync_resumes_from_its_checkpoint(bed: Bed, ssh_command: str, tmp_path: Path) -> None:  # noqa: F811
    target = bed.fresh_target("killed")
    err = tmp_path / "sync.err"
    argv = [*SNAPFERRY, "sync", "--json", "--ssh", ssh_command, "--remote-snapferry", f"{SNAPFERRY[0]} -m snapferry"]
    argv += ["--checkpoint", "1M", "--bwlimit", "2M", "--no-stream", str(bed.snaps), f"{REMOTE}:{target}"]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(argv, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(600):
            if any(e["event"] == "checkpoint" for e in _events(err.read_text())):
                break
            assert proc.poll() is None, err.read_text()
            subprocess.run(["sleep", "0.05"], check=True)
        else:
            pytest.fail("no checkpoint in 30 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a reboot of the sending host
        proc.wait()
    # The remote receive dies with its connection; sync waits out its lock if it has not yet.
    resumed = sync("--json", "--no-stream", "--retries", "8", "--ssh", ssh_command, bed.snaps, f"{REMOTE}:{target}")
    assert resumed.returncode == 0, resumed.stderr
    assert _plans(resumed.stderr)[0] == "resume the interrupted transfer of day3"
    assert any(e["event"] == "resume" for e in _events(resumed.stderr))
    _replica_of(bed, target, ["day3"])


def test_stale_transfer_is_refused_then_aborted(bed: Bed) -> None:
    target = bed.fresh_target("stale")
    bed.snapshot("gone")
    data = subprocess.run([*SNAPFERRY, "send", str(bed.snaps / "gone")], capture_output=True, check=True).stdout
    cut = subprocess.run(
        [*SNAPFERRY, "receive", "-s", "--checkpoint", "1M", str(target)], input=data[: len(data) // 2], capture_output=True
    )
    assert cut.returncode == 3
    run("btrfs", "-q", "subvolume", "delete", bed.snaps / "gone")
    refused = sync(bed.snaps, target)
    assert refused.returncode == 4, refused.stderr
    assert "stale token:" in refused.stderr and "no longer exists" in refused.stderr and "receive -A DIR/gone" in refused.stderr
    assert subprocess.run([*SNAPFERRY, "receive", "-A", str(target / "gone")], check=False).returncode == 0
    done = sync(bed.snaps, target)
    assert done.returncode == 0, done.stderr
    _replica_of(bed, target, ["day1", "day2", "day3"])


def test_usage_errors() -> None:
    mixed = sync("/mnt/a", "tank/b")
    assert mixed.returncode == 2 and "from ZFS to ZFS or from btrfs to btrfs" in mixed.stderr
    forced = sync("--force", "/mnt/a", "/mnt/b")
    assert forced.returncode == 2 and "--force, --snapshot and --mode are for ZFS" in forced.stderr
    relative = sync("/mnt/a", "host:relative/x/../y")
    assert relative.returncode == 2


LIVE = uuid4()


def _sub(
    name: str, otransid: int, uuid: UUID | None = None, received: UUID | None = None, readonly: bool = True, of: UUID = LIVE
) -> Subvolume:
    return Subvolume(Path(name), uuid or uuid4(), received or UUID(int=0), of, otransid, otransid, readonly)


def test_next_btrfs_step_units() -> None:
    a, b, c = _sub("a", 1), _sub("b", 2), _sub("c", 3)
    live = _sub("live", 0, readonly=False)
    empty = Listing([], {})
    assert next_btrfs_step([live, a, b, c], empty, no_stream=False) == BtrfsStep("a")
    assert next_btrfs_step([a, b, c], empty, no_stream=True) == BtrfsStep("c")
    has_a = Listing([_sub("a", 9, received=a.uuid)], {})
    assert next_btrfs_step([a, b, c], has_a, no_stream=False) == BtrfsStep("b", parent="a")
    assert next_btrfs_step([a, b, c], has_a, no_stream=True) == BtrfsStep("c", parent="a")
    has_all = Listing([_sub(s.name, 9, received=s.uuid) for s in (a, b, c)], {})
    assert next_btrfs_step([a, b, c], has_all, no_stream=False) is None
    # Resume first; an unfinished receive with no checkpoint is simply sent again.
    resuming = Listing(has_a.subvolumes, {"c": "sf1b-x", "b": None})
    assert next_btrfs_step([a, b, c], resuming, no_stream=False) == BtrfsStep("c", token="sf1b-x")
    assert next_btrfs_step([a, b, c], Listing(has_a.subvolumes, {"b": None}), no_stream=False) == BtrfsStep("b", parent="a")
    with pytest.raises(Refused, match="no read-only snapshot"):
        next_btrfs_step([live], empty, no_stream=False)


def test_next_btrfs_step_keeps_each_subvolumes_chain() -> None:
    """btrbk-style directories hold snapshots of several subvolumes: each is incremental within its own chain."""
    home, root = uuid4(), uuid4()
    h1, r1, h2, r2 = _sub("home.1", 1, of=home), _sub("root.1", 2, of=root), _sub("home.2", 3, of=home), _sub("root.2", 4, of=root)
    source = [h1, r1, h2, r2]
    assert next_btrfs_step(source, Listing([], {}), no_stream=False) == BtrfsStep("home.1")
    after_h1 = Listing([_sub("home.1", 9, received=h1.uuid)], {})
    assert next_btrfs_step(source, after_h1, no_stream=False) == BtrfsStep("home.2", parent="home.1")
    after_home = Listing([*after_h1.subvolumes, _sub("home.2", 10, received=h2.uuid)], {})
    assert next_btrfs_step(source, after_home, no_stream=False) == BtrfsStep("root.1")
    assert next_btrfs_step(source, after_home, no_stream=True) == BtrfsStep("root.2")
