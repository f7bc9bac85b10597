"""The chaos runner's btrfs sync scenario: `snapferry sync SNAPDIR root@127.0.0.1:DIR` between the two loop-mounted btrfs.

The same sshd, FaultProxy and faults as the ZFS sync scenario, less the zfs-fuse ones (daemon, quota):
ssh_kill, sender_kill, receiver_kill, sync_kill, link_cut, link_stall, link_corrupt, and snapdestroy
(the sync killed after a checkpoint, then the snapshot being sent, or for an incremental every other
time its parent, deleted: the next sync must exit 4 "stale token", and `receive -A` leave nothing
but the parent). The replica is checked as in the btrfs scenario.
"""

from __future__ import annotations

import time
from pathlib import Path

from _chaos_btrfs import BtrfsRunner, abort_and_check, remove
from _chaos_common import Iteration, run_sf
from _chaos_sync import SyncRunner, remote_receives
from _chaos_zfs import final_snap, stale_refusal

from snapferry_testkit import btrfs_testbed as bt
from snapferry_testkit.faultproxy import FaultProxy
from snapferry_testkit.sshd_server import SshServer

BTRFS_SYNC_KINDS = ("ssh_kill", "sender_kill", "receiver_kill", "sync_kill", "link_cut", "link_stall", "link_corrupt", "snapdestroy")


class BtrfsSyncRunner(SyncRunner):
    """Per iteration: a live subvolume and a directory of its snapshots on the source btrfs, a directory on the target."""

    def __init__(self, btrfs: BtrfsRunner, sshd: SshServer, proxy: FaultProxy, workdir: Path) -> None:
        super().__init__(sshd, proxy, workdir)
        self.btrfs = btrfs

    def committed(self, it: Iteration, target: str) -> int:
        return max(self.btrfs.checkpoint_ends(Path(target), final_snap(it)), default=0)

    def run_btrfs(self, it: Iteration) -> None:
        src, dst = self.btrfs.src, self.btrfs.dst
        live, snaps, target = src / f"sync{it.index}", src / f"syncsnaps{it.index}", dst / f"sync{it.index}"
        self.runs = []
        self.run_now = None
        try:
            self._run(it, live, snaps, target)
        finally:
            remove(live, snaps, target)

    def _run(self, it: Iteration, live: Path, snaps: Path, target: Path) -> None:
        self.btrfs.make_source(it, live, snaps, target)
        if it.mode == "incremental":
            # The replica of s1 first, without faults; s2 is what the faults hit.
            first = self.start(it, str(snaps), str(target))
            assert self.wait(it, first) == 0, f"initial sync of s1 failed: {first.stderr.read_text()[-300:]}"
            self.runs = []
            it.sync_runs = 0
            it.attempts.clear()
            self.btrfs.change_source(it, live, snaps)
            sent = run_sf("send", "-p", snaps / "s1", snaps / "s2")
        else:
            sent = run_sf("send", snaps / "s1")
        assert sent.returncode == 0, sent.stderr
        it.stream_bytes = len(sent.stdout)
        if not self.drive(it, str(snaps), str(target)):
            return
        self.btrfs.check_replica(it, {"target": target, "snap": snaps / final_snap(it)})
        it.ok = it.clean

    def stale_resume(self, it: Iteration, fs: str, target: str, fault: dict[str, object]) -> None:
        """The sync was killed after a checkpoint: delete the snapshot (or its parent), expect a refusal, abort."""
        deadline = time.monotonic() + 60
        while remote_receives(target) and time.monotonic() < deadline:
            time.sleep(0.1)
        name, snaps = final_snap(it), Path(fs)
        if run_sf("token", Path(target) / name).returncode != 0:
            fault["applied"] = False  # no checkpoint committed yet: a plain sync_kill
            fault["counted_as"] = "sync_kill"
            return
        victim = snaps / "s1" if it.mode == "incremental" and int(fault["mask"]) & 0x55 else snaps / name  # type: ignore[call-overload]
        bt.run("btrfs", "-q", "subvolume", "delete", victim)
        fault["destroyed"] = victim.name
        it.terminal = True
        run = self.start(it, fs, target)
        rc = self.wait(it, run)
        stale_refusal(it, rc, run.stderr.read_text(errors="replace"), b"", "sync")
        abort_and_check(it, Path(target), name)
