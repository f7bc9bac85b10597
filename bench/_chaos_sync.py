"""The chaos runner's sync scenario: `snapferry sync SRC root@127.0.0.1:DST` through sshd behind a FaultProxy."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _chaos_common import Iteration, last_line, log, run_sf, size_bytes
from _chaos_zfs import (
    check_aborted,
    check_replica,
    committed,
    destroy_victim,
    quota_margin,
    raise_quota,
    set_quota,
    setup_source,
    stale_refusal,
    victim_of,
)

from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.faultproxy import FaultProxy, Trigger
from snapferry_testkit.feeder import EXTRA_ATTEMPTS
from snapferry_testkit.sshd_server import SshServer, remote_snapferry

SYNC_TIMEOUT = 240
SYNC_RETRIES = 10
# A fault hits the stream's connection, never the few-KiB connections of sync's `zfs get` calls.
MIN_WIRE_OFFSET = 64 * 1024
REMOTE = "root@127.0.0.1"


def proc_table() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every process, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        table[int(entry)] = (int(stat.rpartition(")")[2].split()[1]), [a for a in argv if a])
    return table


def descendants(table: dict[int, tuple[int, list[str]]], root: int) -> set[int]:
    found: set[int] = set()
    todo = [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent and pid not in found]
        found.update(children)
        todo += children
    return found


def remote_receives(target: str, exclude: set[int] | None = None) -> list[int]:
    """The `python -m snapferry [session] receive ... TARGET` processes that sshd started (not our ssh clients). A
    session that took a stream over shows its verb in its title (setproctitle): one string, split here."""
    pids = []
    for pid, (_, title) in proc_table().items():
        argv = " ".join(title).split()
        if pid in (exclude or set()) or not argv or not os.path.basename(argv[0]).startswith("python"):
            continue
        if "snapferry" in argv and "receive" in argv and argv[-1] == target:
            pids.append(pid)
    return pids


def parse_events(path: Path) -> list[dict[str, object]]:
    events = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    events.append(json.loads(line))
    return events


@dataclass
class SyncRun:
    proc: subprocess.Popen[bytes]
    stderr: Path
    started: float
    rc: int | None = None


class SyncRunner:
    """The sync scenario: `snapferry sync SRC root@127.0.0.1:DST` through sshd behind a FaultProxy."""

    def __init__(self, sshd: SshServer, proxy: FaultProxy, workdir: Path, pools: tuple[tb.Pool, tb.Pool] | None = None) -> None:
        self.pools = pools  # zfs-fuse's source and destination pools (the daemon fault restarts both)
        self.sshd = sshd
        self.proxy = proxy
        self.workdir = workdir
        self.ssh = sshd.ssh_command(proxy.port, keepalive=True)
        self.run_now: SyncRun | None = None
        self.runs: list[SyncRun] = []

    # -- sync processes ------------------------------------------------------------------------

    def argv(self, it: Iteration, fs: str, target: str) -> list[str]:
        return [
            *tb.SNAPFERRY,
            "sync",
            "--json",
            "--ssh",
            self.ssh,
            "--remote-snapferry",
            remote_snapferry(),
            "--checkpoint",
            it.checkpoint,
            "--retries",
            str(SYNC_RETRIES),
            "--compress",
            it.compress,
            "--bwlimit",
            it.bwlimit,
            fs,
            f"{REMOTE}:{target}",
        ]

    def start(self, it: Iteration, fs: str, target: str) -> SyncRun:
        stderr = self.workdir / f"it{it.index}-run{len(self.runs)}.err"
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                self.argv(it, fs, target), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
            )
        run = SyncRun(proc, stderr, time.monotonic())
        self.runs.append(run)
        self.run_now = run
        it.sync_runs += 1
        return run

    def wait(self, it: Iteration, run: SyncRun) -> int:
        """The run's exit code (once it ends, or after SYNC_TIMEOUT killed), recorded once in the iteration."""
        if run.rc is not None:
            return run.rc
        left = SYNC_TIMEOUT - (time.monotonic() - run.started)
        try:
            rc = run.proc.wait(timeout=max(1.0, left))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait()
            it.problems.append(f"sync run {self.runs.index(run)} hung for {SYNC_TIMEOUT} s; killed")
            rc = -999
        run.rc = rc
        it.attempts.append({"sync_run": self.runs.index(run), "rc": rc, "stderr": last_line(run.stderr.read_text(errors="replace"))})
        return rc

    def running(self) -> SyncRun | None:
        run = self.run_now
        return run if run is not None and run.proc.poll() is None else None

    def kill_group(self, run: SyncRun) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.proc.pid, signal.SIGKILL)

    # -- faults --------------------------------------------------------------------------------

    def killer(self, kind: str, run: SyncRun, target: str) -> Callable[[], None]:
        """The callback that SIGKILLs what `kind` names, run while the stream's connection waits."""

        def kill() -> None:
            if kind in ("sync_kill", "snapdestroy"):
                os.killpg(run.proc.pid, signal.SIGKILL)
                return
            table = proc_table()
            ours = descendants(table, run.proc.pid)
            if kind == "receiver_kill":
                pids = remote_receives(target, exclude=ours)
            else:
                pids = []
                for pid in ours:
                    argv = table[pid][1]
                    words = " ".join(argv).split()  # a session that took a stream shows its verb in its title
                    is_ssh = bool(argv) and os.path.basename(argv[0]) == "ssh"
                    # A session's ssh carries the stream once the session took it over (one sync at a time here).
                    carries_stream = is_ssh and ("receive" in argv[-1].split() or "session" in argv[-1].split())
                    sends = not is_ssh and "snapferry" in words and "send" in words
                    if (kind == "ssh_kill" and carries_stream) or (kind == "sender_kill" and sends):
                        pids.append(pid)
            if not pids:
                raise LookupError(f"{kind}: no such process (it had already finished)")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

        return kill

    def trigger(self, it: Iteration, fault: dict[str, object], run: SyncRun, target: str, offset: int) -> Trigger:
        kind = str(fault["kind"])
        mask = int(fault["mask"])  # type: ignore[call-overload]
        if kind == "link_cut":
            return Trigger(offset, "cut", reset=bool(mask & 0x0F))
        if kind == "link_stall":
            seconds = round(0.5 + 7.5 * float(fault["fraction2"]), 1)  # type: ignore[arg-type]
            fault["stall"] = seconds
            return Trigger(offset, "stall", stall=seconds)
        if kind == "link_corrupt":
            return Trigger(offset, "flip", mask=mask)
        if kind == "daemon":
            assert self.pools is not None
            dirs, names = [p.directory for p in self.pools], [p.name for p in self.pools]
            return Trigger(offset, "call", callback=lambda: tb.reboot_daemon(dirs, names))
        return Trigger(offset, "call", callback=self.killer(kind, run, target))

    def inject(self, it: Iteration, fs: str, target: str, fault: dict[str, object]) -> None:
        """Arm one fault on the running (or a new) sync and wait until it fired or the sync ended."""
        kind = str(fault["kind"])
        remaining = max(MIN_WIRE_OFFSET * 2, it.stream_bytes - self.committed(it, target))
        fault["of"] = remaining
        if kind == "quota":
            self.inject_quota(it, fs, target, fault, remaining)
            return
        offset = int(float(fault["fraction"]) * remaining)  # type: ignore[arg-type]
        if kind == "snapdestroy":
            # The receiver lags the wire by what ssh and the pipes buffer: aim well past a checkpoint.
            offset = max(offset, 3 * size_bytes(it.checkpoint) + 128 * 1024)
        offset = max(MIN_WIRE_OFFSET, min(offset, int(0.9 * remaining)))
        fault["offset"] = offset
        run = self.running() or self.start(it, fs, target)
        retries_before = self.retries(run)
        trigger = self.trigger(it, fault, run, target, offset)
        self.proxy.arm(trigger)
        while not trigger.fired.wait(0.1) and run.proc.poll() is None:
            pass
        if not trigger.fired.is_set():
            self.proxy.disarm()
            fault["fired"] = False  # the transfer ended first
            return
        fault["fired"] = True
        if trigger.error:
            fault["error"] = trigger.error
            if trigger.error.startswith("LookupError"):
                fault["fired"] = False  # nothing left to kill: not a fault
            else:
                it.problems.append(f"{kind} at wire byte {offset}: {trigger.error}")
        if kind in ("sync_kill", "snapdestroy"):
            fault["rc"] = self.wait(it, run)
        elif not fault.get("error"):
            # Let sync notice this fault before the next one: a quota must not take its retry for its own.
            settle = time.monotonic() + (float(fault.get("stall", 0)) + 6 if kind == "link_stall" else 30)  # type: ignore[arg-type]
            while self.retries(run) == retries_before and run.proc.poll() is None and time.monotonic() < settle:
                time.sleep(0.1)
        if kind == "snapdestroy":
            self.stale_resume(it, fs, target, fault)

    def retries(self, run: SyncRun) -> int:
        return sum(1 for e in parse_events(run.stderr) if e.get("event") == "retry")

    def inject_quota(self, it: Iteration, fs: str, target: str, fault: dict[str, object], remaining: int) -> None:
        """A quota on DST's parent just above its use; raised as soon as sync reports running out of space."""
        parent = target.rpartition("/")[0]
        margin = quota_margin(fault, remaining)
        fault["offset"] = margin
        fault["quota"] = set_quota(parent, margin)
        run = self.running() or self.start(it, fs, target)
        seen = self.retries(run)
        reason = ""
        while run.proc.poll() is None and time.monotonic() - run.started < SYNC_TIMEOUT:
            # Other retries may come first: zfs-fuse answers I/O errors for a while after a daemon fault.
            reasons = [str(e.get("reason", "")) for e in parse_events(run.stderr) if e.get("event") == "retry"][seen:]
            if any("space" in r for r in reasons):
                reason = next(r for r in reasons if "space" in r)
                break
            time.sleep(0.1)
        if not reason and run.proc.poll() is not None:
            rc = run.proc.returncode
            reason = last_line(run.stderr.read_text(errors="replace")) if rc != 0 else ""
            fault["rc"] = rc
        raise_quota(parent, it.stream_bytes)
        fault["fired"] = bool(reason)
        fault["reason"] = reason[:300]
        if reason and "space" not in reason:
            it.problems.append(f"quota {margin} bytes above use: sync stopped for another reason: {reason[:300]}")

    def committed(self, it: Iteration, target: str) -> int:
        """The stream byte where the transfer's last checkpoint ends (0 without one)."""
        return committed(target)

    def stale_resume(self, it: Iteration, fs: str, target: str, fault: dict[str, object]) -> None:
        """The sync was killed after a checkpoint: a pruner's destroy must fail on sync's hold; once the hold is
        released, destroy the source snapshot, expect a refusal, abort."""
        deadline = time.monotonic() + 60
        while remote_receives(target) and time.monotonic() < deadline:
            time.sleep(0.1)
        if run_sf("token", target).returncode != 0:
            fault["applied"] = False  # no checkpoint committed yet: a plain sync_kill
            fault["counted_as"] = "sync_kill"
            return
        base_guid = tb.guid(f"{fs}@s1") if it.mode == "incremental" else None
        # A pruner first: sync's hold keeps it from destroying what the interrupted transfer needs.
        victim = victim_of(it, fs, fault)
        pruned = tb.sh("zfs", "destroy", victim, check=False)
        if pruned.returncode == 0 or b"dataset is busy" not in pruned.stderr:
            it.problems.append(f"{victim} was not held by the interrupted sync (zfs destroy: {pruned.stderr.decode().strip() or 'done'})")
            return
        fault["held"] = True
        # Then an admin lets it go (snapferry holds --release), and the stale token follows.
        released = run_sf("holds", "--release", "--tag", f"snapferry:{REMOTE}:{target}", fs)
        if released.returncode != 0:
            it.problems.append(f"holds --release: exit {released.returncode}: {last_line(released.stderr)}")
        destroy_victim(it, fs, fault)
        it.terminal = True
        run = self.start(it, fs, target)
        rc = self.wait(it, run)
        stale_refusal(it, rc, run.stderr.read_text(errors="replace"), b"", "sync")
        abort = run_sf("receive", "-A", target)
        if abort.returncode != 0:
            it.problems.append(f"receive -A after the stale token: exit {abort.returncode}: {last_line(abort.stderr)}")
        check_aborted(it, target, base_guid)

    # -- one iteration -------------------------------------------------------------------------

    def run(self, it: Iteration, fs: str, target: str) -> None:
        self.runs = []
        self.run_now = None
        want_guid, want_files, _ = setup_source(it, fs)
        if it.mode == "incremental":
            # The replica of @s1 first, without faults; @s2 is what the faults hit.
            tb.sh("zfs", "destroy", f"{fs}@s2")
            first = self.start(it, fs, target)
            rc = self.wait(it, first)
            assert rc == 0, f"initial sync of @s1 failed: {last_line(first.stderr.read_text())}"
            self.runs = []
            it.sync_runs = 0
            it.attempts.clear()
            want_guid, want_files = tb.snapshot(f"{fs}@s2")
            sent = run_sf("send", "-i", "@s1", f"{fs}@s2")
        else:
            sent = run_sf("send", f"{fs}@s1")
        assert sent.returncode == 0, sent.stderr
        it.stream_bytes = len(sent.stdout)
        if not self.drive(it, fs, target):
            return
        check_replica(it, target, want_guid, want_files)
        src_names = [n for n in tb.snapshot_names(fs) if not n.startswith("snapferry-")]
        dst_names = [n for n in tb.snapshot_names(target) if not n.startswith("snapferry-")]
        if dst_names != src_names:
            it.lost = True
            it.problems.append(f"destination snapshots {dst_names} != source {src_names}")
        it.ok = it.clean

    def drive(self, it: Iteration, fs: str, target: str) -> bool:
        """Inject the iteration's faults into syncs of fs to target, then sync until done; whether to check the replica."""
        wire_before = self.proxy.up_bytes
        try:
            for fault in it.faults:
                if self.runs and self.runs[-1].proc.poll() == 0:
                    break  # done: nothing left for a fault to hit
                self.inject(it, fs, target, fault)
                log(f"  fault {fault['kind']} at {fault.get('offset')}/{fault.get('of')}: fired {fault.get('fired')}")
                if it.terminal:
                    break
            if not it.terminal:
                self.finish_sync(it, fs, target)
        finally:
            if (run := self.running()) is not None:
                self.kill_group(run)
                run.proc.wait()
            it.bytes_fed = self.proxy.up_bytes - wire_before
            self.count_events(it)
        if it.terminal:
            it.ok = not it.problems
            return False
        self.check_remote(it, target)
        if it.lost:
            it.ok = False
            return False
        return True

    def finish_sync(self, it: Iteration, fs: str, target: str) -> None:
        """Wait for the sync in progress, then run it again until it is done."""
        rc = self.wait(it, self.runs[-1]) if self.runs else None
        extra = 0
        while rc != 0 and extra <= EXTRA_ATTEMPTS:
            said = last_line(self.runs[-1].stderr.read_text(errors="replace")) if self.runs else ""
            if rc == 4 and "exists but holds no snapshot" in said and self.leftover_of_a_crash(it, target):
                # zfs-fuse killed during the first piece of a full receive can keep the new dataset (with no
                # snapshot) when the pool is imported again; sync refuses it and says to destroy it: do that.
                it.refusals += 1
                it.attempts.append({"after_daemon": "destroyed the snapshotless dataset zfs-fuse left, as sync said"})
                tb.sh("zfs", "destroy", "-r", target)
                extra += 1
                rc = self.wait(it, self.start(it, fs, target))
                continue
            if rc is not None and rc not in (3, -9, -999):
                # 3: gave up retrying, -9: killed by a fault. Anything else is not a resumable stop.
                it.problems.append(f"sync exited {rc}: {last_line(self.runs[-1].stderr.read_text(errors='replace'))}")
            extra += 1
            rc = self.wait(it, self.start(it, fs, target))
        if rc != 0:
            it.lost = True
            it.problems.append(f"sync not done after {extra} more run(s) (last exit {rc})")

    def leftover_of_a_crash(self, it: Iteration, target: str) -> bool:
        """After a daemon fault of a full transfer: the target exists with no snapshot at all."""
        crashed = it.mode == "full" and any(f["kind"] == "daemon" and f.get("fired") for f in it.faults)
        return crashed and tb.exists(target) and not tb.snapshot_names(target)

    def count_events(self, it: Iteration) -> None:
        for run in self.runs:
            events = parse_events(run.stderr)
            it.resumes += sum(1 for e in events if e.get("event") == "resume")
            it.retries += sum(1 for e in events if e.get("event") == "retry")
            plans = [str(step) for e in events if e.get("event") == "plan" for step in e.get("steps", [])]  # type: ignore[attr-defined]
            it.whole_resends += sum(1 for step in plans if not step.startswith("resume"))
        # The first plan of the first run is the transfer itself, not a re-send.
        it.whole_resends = max(0, it.whole_resends - 1)

    def check_remote(self, it: Iteration, target: str) -> None:
        deadline = time.monotonic() + 30
        while (left := remote_receives(target)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left:
            it.leftover = True
            it.problems.append(f"remote receive(s) still running after the sync ended: {left}")
