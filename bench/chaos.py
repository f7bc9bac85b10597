#!/usr/bin/env python3
"""Randomized fault injection against snapferry's resumable receive and its sync over ssh (zfs-fuse pools), and btrfs.

Each iteration (deterministic from --seed and its index) makes a source dataset of random data,
picks a scenario, a full or an incremental transfer, a --checkpoint size and 1-3 faults.

Scenario `local`: `snapferry send | snapferry receive -s` through pipes; each fault hits a random
byte of the stream fed to the receiver:

  cut          only the first N bytes reach `snapferry receive -s`
  sigkill      N bytes are written, then (after a new checkpoint or 5 s) the receiver is SIGKILLed
  corrupt      one byte at offset N is flipped: the receiver must exit 5
  daemon       N bytes are written, then the zfs-fuse daemon is kill -9ed and restarted
  quota        the destination's parent gets a quota N bytes above its use: the receive must exit 3
               saying out of space; the quota is then raised and the transfer resumed
  snapdestroy  the stream is cut after a checkpoint, then the source snapshot (or an incremental's
               base) is destroyed: `send -t` must refuse with exit 4 "stale token", and
               `snapferry receive -A` must leave nothing behind (ends the iteration)

After each fault the transfer is resumed with `snapferry send -t $(snapferry token DST)` (or the
whole stream again when there is no token); the next fault hits that resume's stream.

Scenario `sync`: `snapferry sync SRC root@127.0.0.1:DST` through a real sshd on a free loopback port,
reached through a TCP proxy (bench/_faultproxy.py). Each fault fires when the N-th byte of the
stream's connection reaches the proxy, with that connection paused meanwhile:

  ssh_kill       the ssh client carrying the stream is SIGKILLed
  sender_kill    the local `snapferry send` is SIGKILLed
  receiver_kill  the remote `snapferry receive` (under sshd) is SIGKILLed
  sync_kill      the whole sync is SIGKILLed (a reboot of the sending host); it is run again
  link_cut       the proxy closes the connection (FIN or RST)
  link_stall     the proxy forwards nothing for 0.5-8 s (ssh gives up after about 3 s)
  link_corrupt   the proxy flips one bit (ssh's MAC must catch it)
  daemon         the zfs-fuse daemon is kill -9ed and restarted
  quota          as above, on the destination's parent; raised once sync reports out of space
  snapdestroy    the sync is killed after a checkpoint, the source snapshot (or base) destroyed: the
                 next sync must refuse with exit 4 "stale token"; then `receive -A` (ends the iteration)

Scenario `btrfs`: `snapferry send | snapferry receive -s DIR` between two loop-mounted btrfs, with
the faults cut, sigkill, corrupt, remount (the target unmounted and mounted again after a SIGKILL:
a reboot) and snapdestroy; see bench/_chaos_btrfs.py.

sync retries by itself (--retries); a sync that exits is run again until done. Both scenarios end
by checking the guids, every file's sha256, and that no `snapferry-*` snapshot (and no remote
receive) is left.

    sudo python3 bench/chaos.py --seed 1 --iterations 6 [--json chaos.json]
    sudo python3 bench/chaos.py --seed 1 --only 3          # replay one iteration
    sudo python3 bench/chaos.py --seed 7 --iterations 21 --cover-kinds   # iteration i starts with fault kind i
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest  # the test beds report failures with pytest.fail

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _chaos_btrfs import BTRFS_KINDS, BtrfsRunner  # noqa: E402
from _faultproxy import FaultProxy, Trigger  # noqa: E402
from _feeder import EXTRA_ATTEMPTS, Feeder, faults_then_resumes  # noqa: E402
from tests import zfs_testbed as tb  # noqa: E402
from tests.sshd_server import SshServer, remote_snapferry, start_sshd  # noqa: E402

MiB = 1 << 20
LOCAL_KINDS = ("cut", "sigkill", "corrupt", "daemon", "quota", "snapdestroy")
SYNC_KINDS = (
    "ssh_kill",
    "sender_kill",
    "receiver_kill",
    "sync_kill",
    "link_cut",
    "link_stall",
    "link_corrupt",
    "daemon",
    "quota",
    "snapdestroy",
)
SCENARIOS = {"local": LOCAL_KINDS, "sync": SYNC_KINDS, "btrfs": BTRFS_KINDS}
ZFS_SCENARIOS = ("local", "sync")
DEFAULT_SCENARIOS = "local,sync,btrfs"
# --cover-kinds: iteration i starts with CATALOG[i % len(CATALOG)].
CATALOG = [(scenario, kind) for scenario, kinds in SCENARIOS.items() for kind in kinds]
TIMEOUT = 300
SYNC_TIMEOUT = 240
SYNC_RETRIES = 10
# A fault hits the stream's connection, never the few-KiB connections of sync's `zfs get` calls.
MIN_WIRE_OFFSET = 64 * 1024
REMOTE = "root@127.0.0.1"


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Iteration:
    seed: int
    index: int
    scenario: str = "local"
    mode: str = ""
    megabytes: int = 0
    data_seed: int = 0
    checkpoint: str = ""
    compress: str = ""
    bwlimit: str = ""
    faults: list[dict[str, object]] = field(default_factory=list)
    attempts: list[dict[str, object]] = field(default_factory=list)
    resumes: int = 0
    whole_resends: int = 0
    retries: int = 0
    sync_runs: int = 0
    stream_bytes: int = 0
    bytes_fed: int = 0
    refusals: int = 0
    terminal: bool = False
    ok: bool = False
    lost: bool = False
    corrupted: bool = False
    leftover: bool = False
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.bytes_fed / self.stream_bytes if self.stream_bytes else 0.0


def make_pool(base: Path, role: str) -> tb.Pool:
    name = f"sfchaos{os.getpid()}{role}"
    directory = base / name
    directory.mkdir(parents=True)
    image = directory / "vdev.img"
    tb.sh("truncate", "-s", "2G", str(image))
    tb.sh("zpool", "create", "-m", f"/{name}", name, str(image))
    return tb.Pool(name, directory)


def run_sf(*args: str, data: bytes | None = None) -> tb.Result:
    proc = subprocess.run([*tb.SNAPFERRY, *args], input=data, capture_output=True, check=False, timeout=TIMEOUT)
    return tb.Result(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("{")]
    return lines[-1][:300] if lines else ""


def checkpoint_ends(dataset: str) -> list[int]:
    """`end` of every committed checkpoint (snapferry-<to>-<from>-<seq>-<end>-<fpfrom>-<fp>)."""
    ends = []
    for name in tb.piece_names(dataset):
        parts = name.split("-")
        if len(parts) in (7, 8) and parts[3] != "open" and parts[-1] != "open":
            with contextlib.suppress(ValueError):
                ends.append(int(parts[4], 16))
    return ends


def committed(dataset: str) -> int:
    return max(checkpoint_ends(dataset), default=0) if tb.exists(dataset) else 0


def size_bytes(text: str) -> int:
    return int(text.rstrip("M")) * MiB


def used(dataset: str) -> int:
    return int(tb.sh("zfs", "get", "-H", "-p", "-o", "value", "used", dataset).stdout.decode().strip())


def set_quota(parent: str, margin: int) -> int:
    """quota = what `parent` uses now + margin (more if zfs finds that below its use); returns it."""
    for _ in range(6):
        quota = used(parent) + margin
        if tb.sh("zfs", "set", f"quota={quota}", parent, check=False).returncode == 0:
            return quota
        margin *= 2
    raise RuntimeError(f"cannot set a quota on {parent}")


def raise_quota(parent: str, stream_bytes: int) -> None:
    tb.sh("zfs", "set", f"quota={used(parent) + 8 * stream_bytes + 64 * MiB}", parent)


def quota_margin(fault: dict[str, object], remaining: int) -> int:
    """Between 5 % and 80 % of what is left to receive, so that the quota is surely reached."""
    return max(256 * 1024, int((0.05 + 0.75 * float(fault["fraction"])) * remaining))  # type: ignore[arg-type]


def destroy_victim(it: Iteration, fs: str, fault: dict[str, object]) -> str:
    """snapdestroy: the snapshot being sent, or (incremental, every other time) its base."""
    victim = f"{fs}@s1" if it.mode == "incremental" and int(fault["mask"]) & 0x55 else f"{fs}@{final_snap(it)}"  # type: ignore[call-overload]
    tb.sh("zfs", "destroy", victim)
    fault["destroyed"] = victim
    return victim


def final_snap(it: Iteration) -> str:
    return "s2" if it.mode == "incremental" else "s1"


def check_aborted(it: Iteration, target: str, base_guid: int | None) -> None:
    """After `receive -A`: a full transfer leaves no dataset; an incremental leaves exactly its base."""
    if it.mode == "full":
        if tb.exists(target):
            it.leftover = True
            it.problems.append(f"{target} still exists after receive -A: {tb.snapshot_names(target)}")
        return
    names = tb.snapshot_names(target) if tb.exists(target) else None
    if names != ["s1"]:
        it.leftover = it.leftover or names is not None
        it.lost = it.lost or names is None or "s1" not in names
        it.problems.append(f"{target} after receive -A holds {names}, expected just its base s1")
    elif base_guid is not None and tb.guid(f"{target}@s1") != base_guid:
        it.lost = True
        it.problems.append(f"{target}@s1 changed guid after receive -A")


def stale_refusal(it: Iteration, rc: int, stderr: str, sent: bytes, what: str) -> bool:
    """The resume after snapdestroy must be refused: exit 4, 'stale token', nothing sent."""
    good = rc == 4 and "stale token" in stderr and not sent
    if good:
        it.refusals += 1
    else:
        it.problems.append(f"{what} after the source snapshot was destroyed: exit {rc} (want 4 'stale token'): {last_line(stderr)}")
    return good


def setup_source(it: Iteration, fs: str) -> tuple[int, dict[str, str], int]:
    """The source dataset with @s1 (and @s2 for an incremental): guid and files of the final snapshot, guid of @s1."""
    tb.sh("zfs", "create", fs)
    root = tb.mountpoint(fs)
    tb.write_tree(root, seed=it.data_seed, megabytes=it.megabytes)
    guid1, files = tb.snapshot(f"{fs}@s1")
    want_guid = guid1
    if it.mode == "incremental":
        tb.change_tree(root, seed=it.data_seed + 1)
        want_guid, files = tb.snapshot(f"{fs}@s2")
    return want_guid, files, guid1


def check_replica(it: Iteration, target: str, want_guid: int, want_files: dict[str, str]) -> None:
    final = f"{target}@{final_snap(it)}"
    if not tb.exists(final):
        it.lost = True
        it.problems.append(f"{final} missing after exit 0")
        return
    got_guid = tb.guid(final)
    if got_guid != want_guid:
        it.lost = True
        it.problems.append(f"guid {got_guid} != source {want_guid}")
    tb.sh("zfs", "set", "atime=off", target, check=False)
    mounted = tb.sh("zfs", "get", "-H", "-o", "value", "mounted", target).stdout.decode().strip()
    if mounted != "yes":
        tb.sh("zfs", "mount", target, check=False)
    got_files = tb.manifest(tb.mountpoint(target))
    if got_files != want_files:
        it.corrupted = True
        diff = sorted(k for k in set(got_files) | set(want_files) if got_files.get(k) != want_files.get(k))
        it.problems.append(f"manifest differs in {len(diff)} file(s): {diff[:5]}")
    left = tb.piece_names(target)
    if left:
        it.leftover = True
        it.problems.append(f"leftover checkpoints: {left}")


class Runner:
    """The local scenario: snapferry send | snapferry receive -s through pipes we control."""

    def __init__(self, src: tb.Pool, dst: tb.Pool) -> None:
        self.src = src
        self.dst = dst

    # -- receivers ---------------------------------------------------------------------------

    def receive(self, target: str, checkpoint: str, data: bytes) -> tb.Result:
        return run_sf("receive", "-s", "--checkpoint", checkpoint, target, data=data)

    def partial_receive(self, target: str, checkpoint: str, data: bytes) -> Feeder:
        """A receiver fed `data` without closing its stdin, left running until a new checkpoint (or 5 s)."""
        before = set(tb.piece_names(target)) if tb.exists(target) else set()
        feeder = Feeder([*tb.SNAPFERRY, "receive", "-s", "--checkpoint", checkpoint, target], data)
        feeder.wait_for(lambda: tb.exists(target) and bool(set(tb.piece_names(target)) - before))
        return feeder

    # -- one attempt -------------------------------------------------------------------------

    def attempt(self, it: Iteration, fs: str, target: str, stream: bytes, fault: dict[str, object] | None, resume_base: int) -> int:
        """Feed `stream` (with `fault` applied) to a receiver; return its exit code."""
        if resume_base < 0:  # `snapferry token` says the transfer is complete: nothing to feed (the replica is checked)
            it.attempts.append({"resend": "none", "why": "snapferry token: the transfer is complete"})
            if fault is not None:
                fault.update(fired=False, offset=0, of=0)
            return 0
        record: dict[str, object] = {"stream_bytes": len(stream), "fault": fault["kind"] if fault else None}
        if fault is None:
            res = self.receive(target, it.checkpoint, stream)
            it.bytes_fed += len(stream)
            record.update(rc=res.returncode, fed=len(stream), stderr=last_line(res.stderr))
            it.attempts.append(record)
            return res.returncode
        kind = str(fault["kind"])
        offset = max(1, min(len(stream) - 1, int(float(fault["fraction"]) * len(stream))))  # type: ignore[arg-type]
        if kind == "snapdestroy":
            # Past a checkpoint of this stream where the stream is long enough for one.
            offset = min(len(stream) - 1, max(offset, 2 * size_bytes(it.checkpoint) + 65536))
        fault["offset"] = offset
        fault["of"] = len(stream)
        fault["fired"] = True
        record["offset"] = offset
        if kind in ("cut", "snapdestroy"):
            res = self.receive(target, it.checkpoint, stream[:offset])
            rc, err, fed = res.returncode, res.stderr, offset
            if rc == 0:
                it.problems.append(f"{kind} at {offset}/{len(stream)}: receiver exited 0 on a truncated stream")
                it.corrupted = True
            elif rc != 3:
                it.problems.append(f"{kind} at {offset}: exit {rc}, expected 3: {last_line(err)}")
        elif kind == "corrupt":
            data = bytearray(stream)
            mask = int(fault["mask"])  # type: ignore[call-overload]
            data[offset] ^= mask
            res = self.receive(target, it.checkpoint, bytes(data))
            rc, err, fed = res.returncode, res.stderr, len(data)
            if rc == 0:
                it.corrupted = True
                it.problems.append(f"corrupt byte {offset}/{len(stream)} (^{mask:#x}): receiver exited 0")
            elif rc != 5:
                it.problems.append(f"corrupt byte {offset} (^{mask:#x}): exit {rc}, expected 5: {last_line(err)}")
            # No checkpoint may end beyond the flipped byte (positions in the original stream).
            ends = checkpoint_ends(target) if tb.exists(target) else []
            if ends and max(ends) > resume_base + offset:
                it.corrupted = True
                it.problems.append(f"corrupt byte {offset}: checkpoint ends at {max(ends)} > {resume_base + offset}")
        elif kind == "sigkill":
            feeder = self.partial_receive(target, it.checkpoint, stream[:offset])
            feeder.proc.send_signal(signal.SIGKILL)
            rc, err = feeder.finish(timeout=30)
            fed = feeder.written
        elif kind == "daemon":
            feeder = self.partial_receive(target, it.checkpoint, stream[:offset])
            tb.reboot_daemon([self.src.directory, self.dst.directory], [self.src.name, self.dst.name])
            rc, err = feeder.finish(timeout=120)
            fed = feeder.written
            if rc == 0:
                it.problems.append(f"daemon kill at {offset}: receiver exited 0")
            elif rc == -999:
                it.problems.append(f"daemon kill at {offset}: receiver hung")
        elif kind == "quota":
            parent = target.rpartition("/")[0]
            margin = quota_margin(fault, len(stream))
            fault["offset"] = record["offset"] = margin
            fault["quota"] = set_quota(parent, margin)
            res = self.receive(target, it.checkpoint, stream)
            rc, err, fed = res.returncode, res.stderr, len(stream)
            raise_quota(parent, it.stream_bytes)
            if rc == 0:
                fault["fired"] = False  # it fitted after all: no fault
            elif rc != 3 or "space" not in err:
                it.problems.append(f"quota {margin} bytes above use: exit {rc}, expected 3 out of space: {last_line(err)}")
        else:
            raise ValueError(kind)
        it.bytes_fed += fed
        record.update(rc=rc, fed=fed, stderr=last_line(err))
        fault["rc"] = rc
        it.attempts.append(record)
        if kind == "snapdestroy" and rc == 3:
            self.stale_resume(it, fs, target, fault)
        return rc

    def stale_resume(self, it: Iteration, fs: str, target: str, fault: dict[str, object]) -> None:
        tok = run_sf("token", target)
        if tok.returncode != 0:
            fault["applied"] = False  # no checkpoint yet: nothing to go stale, carry on as a cut
            fault["counted_as"] = "cut"
            return
        base_guid = tb.guid(f"{fs}@s1") if it.mode == "incremental" else None
        destroy_victim(it, fs, fault)
        it.terminal = True
        cont = run_sf("send", "-t", tok.stdout.decode().strip())
        it.attempts.append({"resend": "stale", "rc": cont.returncode, "stderr": last_line(cont.stderr)})
        stale_refusal(it, cont.returncode, cont.stderr, cont.stdout, "send -t")
        abort = run_sf("receive", "-A", target)
        if abort.returncode != 0:
            it.problems.append(f"receive -A after the stale token: exit {abort.returncode}: {last_line(abort.stderr)}")
        check_aborted(it, target, base_guid)

    def next_stream(self, it: Iteration, target: str, whole: bytes) -> tuple[bytes, int]:
        """The resume stream (and the original-stream byte where it starts), or the whole again."""
        tok = run_sf("token", target)
        if tok.returncode == 1 and "transfer is complete" in tok.stderr:
            # A receive that failed after its last piece was committed (zfs-fuse answering EIO after a restart).
            return b"", -1
        if tok.returncode == 1:
            it.whole_resends += 1
            it.attempts.append({"resend": "whole", "why": last_line(tok.stderr)})
            return whole, 0
        if tok.returncode != 0:
            raise RuntimeError(f"snapferry token exit {tok.returncode}: {last_line(tok.stderr)}")
        token = tok.stdout.decode().strip()
        decoded = run_sf("token", "--decode", token)
        base = 0
        if decoded.returncode == 0:
            try:
                base = int(json.loads(decoded.stdout).get("offset", 0))
            except (ValueError, TypeError, AttributeError):
                base = 0
        cont = run_sf("send", "-t", token)
        if cont.returncode != 0:
            raise RuntimeError(f"snapferry send -t exit {cont.returncode}: {last_line(cont.stderr)}")
        it.resumes += 1
        return cont.stdout, base

    # -- one iteration -----------------------------------------------------------------------

    def run(self, it: Iteration, fs: str, target: str) -> None:
        want_guid, want_files, _ = setup_source(it, fs)
        if it.mode == "incremental":
            base = run_sf("send", f"{fs}@s1")
            assert base.returncode == 0, base.stderr
            res = run_sf("receive", "-s", "--checkpoint", it.checkpoint, target, data=base.stdout)
            assert res.returncode == 0, f"base receive failed: {res.stderr}"
            sent = run_sf("send", "-i", "@s1", f"{fs}@s2")
        else:
            sent = run_sf("send", f"{fs}@s1")
        assert sent.returncode == 0, sent.stderr
        whole = sent.stdout
        it.stream_bytes = len(whole)

        done = faults_then_resumes(
            it,
            (whole, 0),
            lambda feed, fault: self.attempt(it, fs, target, feed[0], fault, feed[1]),
            lambda: self.next_stream(it, target, whole),
            log,
        )
        if it.terminal:
            it.ok = not it.problems
        if not done:
            return
        check_replica(it, target, want_guid, want_files)
        it.ok = not (it.lost or it.corrupted or it.leftover or it.problems)


# -- the sync scenario --------------------------------------------------------------------------


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
    """The `python -m snapferry receive ... TARGET` processes that sshd started (not our ssh clients)."""
    pids = []
    for pid, (_, argv) in proc_table().items():
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

    def __init__(self, src: tb.Pool, dst: tb.Pool, sshd: SshServer, proxy: FaultProxy, workdir: Path) -> None:
        self.src = src
        self.dst = dst
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
                    is_ssh = bool(argv) and os.path.basename(argv[0]) == "ssh"
                    carries_stream = is_ssh and "receive" in " ".join(argv)
                    sends = not is_ssh and "snapferry" in argv and "send" in argv
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
            dirs, names = [self.src.directory, self.dst.directory], [self.src.name, self.dst.name]
            return Trigger(offset, "call", callback=lambda: tb.reboot_daemon(dirs, names))
        return Trigger(offset, "call", callback=self.killer(kind, run, target))

    def inject(self, it: Iteration, fs: str, target: str, fault: dict[str, object]) -> None:
        """Arm one fault on the running (or a new) sync and wait until it fired or the sync ended."""
        kind = str(fault["kind"])
        remaining = max(MIN_WIRE_OFFSET * 2, it.stream_bytes - committed(target))
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

    def stale_resume(self, it: Iteration, fs: str, target: str, fault: dict[str, object]) -> None:
        """The sync was killed after a checkpoint: destroy the source snapshot, expect a refusal, abort."""
        deadline = time.monotonic() + 60
        while remote_receives(target) and time.monotonic() < deadline:
            time.sleep(0.1)
        if run_sf("token", target).returncode != 0:
            fault["applied"] = False  # no checkpoint committed yet: a plain sync_kill
            fault["counted_as"] = "sync_kill"
            return
        base_guid = tb.guid(f"{fs}@s1") if it.mode == "incremental" else None
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
            return
        self.check_remote(it, target)
        if not it.lost:
            check_replica(it, target, want_guid, want_files)
            src_names = [n for n in tb.snapshot_names(fs) if not n.startswith("snapferry-")]
            dst_names = [n for n in tb.snapshot_names(target) if not n.startswith("snapferry-")]
            if dst_names != src_names:
                it.lost = True
                it.problems.append(f"destination snapshots {dst_names} != source {src_names}")
        it.ok = not (it.lost or it.corrupted or it.leftover or it.problems)

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


# -- iterations and the report ------------------------------------------------------------------


def draw(seed: int, index: int, scenarios: tuple[str, ...], max_mib: int, cover: bool) -> Iteration:
    rng = random.Random(f"snapferry-chaos-{seed}-{index}")
    it = Iteration(seed=seed, index=index)
    it.scenario = rng.choice(scenarios)
    it.mode = rng.choice(["full", "incremental"])
    it.megabytes = rng.randint(2, max_mib)
    it.data_seed = rng.randrange(1 << 30)
    it.checkpoint = f"{rng.randint(1, 2 if it.scenario == 'sync' else 4)}M"
    it.compress = rng.choice(["none", "zstd:3"]) if it.scenario == "sync" else "none"
    kinds = [rng.choice(SCENARIOS[it.scenario]) for _ in range(rng.randint(1, 3))]
    if cover:
        catalog = [(s, k) for s, k in CATALOG if s in scenarios]
        it.scenario, first = catalog[index % len(catalog)]
        kinds = [first] + [k if k in SCENARIOS[it.scenario] else "link_cut" if it.scenario == "sync" else "cut" for k in kinds[1:]]
        it.compress = "zstd:3" if it.scenario == "sync" and not index % 2 else "none"
    if "snapdestroy" in kinds:
        kinds = kinds[: kinds.index("snapdestroy") + 1]  # it ends the iteration
        it.checkpoint = "1M"
    for kind in kinds:
        it.faults.append({"kind": kind, "fraction": rng.random(), "fraction2": rng.random(), "mask": 1 << rng.randrange(8)})
    # Over loopback ssh and sshd buffer megabytes ahead of the receiver; a link at a few MB/s keeps
    # the receiver close to the byte where a fault hits (and the sender alive until the end).
    it.bwlimit = rng.choice(["2M", "4M"]) if it.scenario == "sync" else ""
    return it


def run_iteration(it: Iteration, local: Runner | None, sync: SyncRunner | None, btrfs: BtrfsRunner | None) -> Iteration:
    started = time.monotonic()
    if it.scenario == "btrfs":
        assert btrfs is not None
        kinds = [f["kind"] for f in it.faults]
        log(f"iteration {it.index}: btrfs {it.mode}, {it.megabytes} MiB, --checkpoint {it.checkpoint}, faults {kinds}")
        try:
            btrfs.run(it)
        except (Exception, pytest.fail.Exception) as exc:  # noqa: BLE001 - a runner error is a failure of this iteration
            it.problems.append(f"runner error: {type(exc).__name__}: {exc}")
            it.ok = False
        it.seconds = round(time.monotonic() - started, 1)
        return it
    assert local is not None
    src_pool, dst_pool = local.src.name, local.dst.name
    fs = f"{src_pool}/it{it.index}"
    parent = f"{dst_pool}/it{it.index}"
    target = f"{parent}/data"
    log(
        f"iteration {it.index}: {it.scenario} {it.mode}, {it.megabytes} MiB, --checkpoint {it.checkpoint}"
        + (f", --compress {it.compress} --bwlimit {it.bwlimit}" if it.scenario == "sync" else "")
        + f", faults {[f['kind'] for f in it.faults]}"
    )
    try:
        for dataset in (parent, fs):
            if tb.exists(dataset):
                tb.sh("zfs", "destroy", "-r", dataset)
        tb.sh("zfs", "create", parent)
        if it.scenario == "sync":
            assert sync is not None
            sync.run(it, fs, target)
        else:
            local.run(it, fs, target)
    except Exception as exc:  # noqa: BLE001 - a runner error is a failure of this iteration
        it.problems.append(f"runner error: {type(exc).__name__}: {exc}")
        it.ok = False
    finally:
        it.seconds = round(time.monotonic() - started, 1)
        for dataset in (parent, fs):
            for _ in range(10):
                if not tb.exists(dataset) or tb.sh("zfs", "destroy", "-r", dataset, check=False).returncode == 0:
                    break
                time.sleep(0.5)
    return it


def replay_args(args: argparse.Namespace) -> str:
    extra = []
    if args.cover_kinds:
        extra.append("--cover-kinds")
    if args.max_mib != 16:
        extra.append(f"--max-mib {args.max_mib}")
    if args.scenarios != DEFAULT_SCENARIOS:
        extra.append(f"--scenarios {args.scenarios}")
    return " ".join(extra)


def summarize(seed: int, results: list[Iteration], replay: str = "") -> dict[str, object]:
    faults: dict[str, dict[str, int]] = {scenario: dict.fromkeys(kinds, 0) for scenario, kinds in SCENARIOS.items()}
    not_fired = 0
    for it in results:
        for fault in it.faults:
            if fault.get("fired"):
                faults[it.scenario][str(fault.get("counted_as", fault["kind"]))] += 1
            elif "fired" in fault:
                not_fired += 1

    def ratios(scenario: str | None) -> list[float]:
        return [it.ratio for it in results if it.stream_bytes and not it.terminal and scenario in (None, it.scenario)]

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 3) if values else None

    return {
        "seed": seed,
        "iterations": len(results),
        "by_scenario": {s: sum(1 for it in results if it.scenario == s) for s in SCENARIOS},
        "faults": faults,
        "faults_injected": sum(sum(kinds.values()) for kinds in faults.values()),
        "faults_not_reached": not_fired,
        "resumes": sum(it.resumes for it in results),
        "whole_resends": sum(it.whole_resends for it in results),
        "sync_retries": sum(it.retries for it in results),
        "sync_runs": sum(it.sync_runs for it in results),
        "sent_over_stream_mean": mean(ratios(None)),
        "sent_over_stream_worst": round(max(ratios(None)), 3) if ratios(None) else None,
        "sent_over_stream": {s: {"mean": mean(ratios(s)), "worst": round(max(ratios(s)), 3) if ratios(s) else None} for s in SCENARIOS},
        "correct_refusals": sum(it.refusals for it in results),
        "lost": sum(it.lost for it in results),
        "corrupted": sum(it.corrupted for it in results),
        "leftover": sum(it.leftover for it in results),
        "failures": [
            {
                "seed": it.seed,
                "index": it.index,
                "replay": f"--seed {it.seed} --only {it.index}" + (f" {replay}" if replay else ""),
                "problems": it.problems,
            }
            for it in results
            if it.problems or not it.ok
        ],
        "seconds": round(sum(it.seconds for it in results), 1),
    }


def print_report(summary: dict[str, object], results: list[Iteration]) -> None:
    print(
        f"{'it':>4} {'scen':<5} {'mode':<11} {'MiB':>3} {'ckpt':>4} {'faults':<40} {'resumes':>7} {'whole':>5} "
        f"{'stream':>9} {'sent':>9} {'ratio':>6} {'s':>6}  ok"
    )
    for it in results:
        kinds = ",".join(f"{f['kind']}@{f.get('offset', '-')}" + ("" if f.get("fired", True) else "(no)") for f in it.faults)
        print(
            f"{it.index:>4} {it.scenario:<5} {it.mode:<11} {it.megabytes:>3} {it.checkpoint:>4} {kinds[:40]:<40} {it.resumes:>7} "
            f"{it.whole_resends:>5} {it.stream_bytes:>9} {it.bytes_fed:>9} {it.ratio:>6.2f} {it.seconds:>6}  "
            f"{('refused ok' if it.terminal else 'yes') if it.ok else 'NO'}"
        )
    print()
    print(f"seed {summary['seed']}, iterations {summary['iterations']} {summary['by_scenario']}, {summary['seconds']} s")
    print(f"faults injected: {summary['faults_injected']} {summary['faults']} (not reached: {summary['faults_not_reached']})")
    print(
        f"resumes: {summary['resumes']} (whole stream re-sent {summary['whole_resends']} time(s)); "
        f"sync retries {summary['sync_retries']}, sync runs {summary['sync_runs']}"
    )
    print(
        f"bytes sent / stream size: mean {summary['sent_over_stream_mean']}, worst {summary['sent_over_stream_worst']} "
        f"{summary['sent_over_stream']}"
    )
    print(f"correct refusals (stale token): {summary['correct_refusals']}")
    print(f"lost {summary['lost']}, corrupted {summary['corrupted']}, leftover {summary['leftover']}")
    failures = summary["failures"]
    assert isinstance(failures, list)
    for failure in failures:
        print(f"FAILURE/ANOMALY {failure['replay']}: {'; '.join(failure['problems'])}")


def write_json(path: Path, summary: dict[str, object], results: list[Iteration], command: str) -> None:
    payload = {"command": command, "summary": summary, "iterations": [dict(asdict(it), ratio=it.ratio) for it in results]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--only", type=int, help="run just this iteration index")
    parser.add_argument("--first", type=int, default=0, help="start at this iteration index (to finish a run stopped early)")
    parser.add_argument("--json", type=Path, help="write the summary and every iteration here (rewritten after each iteration)")
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS, help=f"comma-separated: local, sync, btrfs (default {DEFAULT_SCENARIOS})")
    parser.add_argument("--max-mib", type=int, default=16, help="largest data set of an iteration, MiB (default 16; at least 2)")
    parser.add_argument("--cover-kinds", action="store_true", help="iteration i starts with the i-th (scenario, fault kind)")
    parser.add_argument("--time-budget", type=float, help="start no iteration after this many seconds")
    parser.add_argument("--logs", type=Path, help="keep every sync run's stderr (JSON events) in this directory")
    args = parser.parse_args(argv)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    if not scenarios or any(s not in SCENARIOS for s in scenarios) or args.max_mib < 2:
        parser.error("--scenarios takes local, sync and/or btrfs; --max-mib at least 2")
    if os.geteuid() != 0:
        print("chaos.py needs root (zfs-fuse, sshd)", file=sys.stderr)
        return 2
    command = "python3 bench/chaos.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    replay = replay_args(args)
    indices = [args.only] if args.only is not None else list(range(args.first, args.iterations))

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    uses_zfs = any(s in ZFS_SCENARIOS for s in scenarios)
    if uses_zfs:
        tb.start_daemon()
    results: list[Iteration] = []
    started = time.monotonic()
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="sfchaos") as tmp:
        base = Path(tmp)
        os.environ["SNAPFERRY_LOCK_DIR"] = str(base / "locks")
        pools: list[tb.Pool] = []
        sshd: SshServer | None = None
        proxy: FaultProxy | None = None
        btrfs: BtrfsRunner | None = None
        try:
            local = sync = None
            if uses_zfs:
                pools.append(make_pool(base, "s"))
                pools.append(make_pool(base, "d"))
                local = Runner(pools[0], pools[1])
            if "btrfs" in scenarios:
                btrfs = BtrfsRunner(base)
            if "sync" in scenarios:
                sshd = start_sshd(base / "sshd")
                proxy = FaultProxy(sshd.port)
                logs = args.logs or base / "sync"
                logs.mkdir(parents=True, exist_ok=True)
                sync = SyncRunner(pools[0], pools[1], sshd, proxy, logs)
            for index in indices:
                if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                    log(f"time budget of {args.time_budget} s spent: stopping before iteration {index}")
                    break
                it = run_iteration(draw(args.seed, index, scenarios, args.max_mib, args.cover_kinds), local, sync, btrfs)
                results.append(it)
                verdict = "ok" if it.ok else "FAILED"
                log(f"iteration {index}: {verdict} sent {it.bytes_fed}/{it.stream_bytes} in {it.seconds} s {it.problems}")
                if args.json:
                    write_json(args.json, summarize(args.seed, results, replay), results, command)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: reporting the iterations done so far")
        finally:
            if proxy is not None:
                proxy.close()
            if sshd is not None:
                sshd.stop()
            if btrfs is not None:
                btrfs.close()
            if uses_zfs:
                tb.start_daemon()
            for pool in reversed(pools):
                pool.destroy()
    summary = summarize(args.seed, results, replay)
    summary["interrupted"] = interrupted
    print_report(summary, results)
    if args.json:
        write_json(args.json, summary, results, command)
    clean = summary["lost"] == summary["corrupted"] == summary["leftover"] == 0 and not summary["failures"]
    return 0 if clean and not interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
