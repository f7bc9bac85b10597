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
reached through a TCP proxy (snapferry_testkit.faultproxy). Each fault fires when the N-th byte of the
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

Scenario `btrfs_sync`: `snapferry sync SNAPDIR root@127.0.0.1:DIR` between those two btrfs, through
the same sshd and proxy, with the sync faults that are not zfs-fuse's (all but daemon and quota);
see bench/_chaos_btrfs_sync.py.

sync retries by itself (--retries); a sync that exits is run again until done. Both scenarios end
by checking the guids, every file's sha256, and that no `snapferry-*` snapshot (and no remote
receive) is left.

    sudo python3 bench/chaos.py --seed 1 --iterations 6 [--json chaos.json]
    sudo python3 bench/chaos.py --seed 1 --only 3          # replay one iteration
    sudo python3 bench/chaos.py --seed 7 --iterations 21 --cover-kinds   # iteration i starts with fault kind i
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest  # the test beds report failures with pytest.fail

# Run as a script, bench/ is first on the import path: its _chaos_* siblings need no path edit.
from _chaos_btrfs import BTRFS_KINDS, BtrfsRunner
from _chaos_btrfs_sync import BTRFS_SYNC_KINDS, BtrfsSyncRunner
from _chaos_common import Iteration, log
from _chaos_sync import SyncRunner
from _chaos_zfs import Runner, make_pool

from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.faultproxy import FaultProxy
from snapferry_testkit.sshd_server import SshServer, start_sshd

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
SCENARIOS = {"local": LOCAL_KINDS, "sync": SYNC_KINDS, "btrfs": BTRFS_KINDS, "btrfs_sync": BTRFS_SYNC_KINDS}
ZFS_SCENARIOS = ("local", "sync")
BTRFS_SCENARIOS = ("btrfs", "btrfs_sync")
SYNC_SCENARIOS = ("sync", "btrfs_sync")
DEFAULT_SCENARIOS = "local,sync,btrfs,btrfs_sync"
# --cover-kinds: iteration i starts with CATALOG[i % len(CATALOG)].
CATALOG = [(scenario, kind) for scenario, kinds in SCENARIOS.items() for kind in kinds]


# -- iterations and the report ------------------------------------------------------------------


def draw(seed: int, index: int, scenarios: tuple[str, ...], max_mib: int, cover: bool) -> Iteration:
    rng = random.Random(f"snapferry-chaos-{seed}-{index}")
    it = Iteration(seed=seed, index=index)
    it.scenario = rng.choice(scenarios)
    it.mode = rng.choice(["full", "incremental"])
    it.megabytes = rng.randint(2, max_mib)
    it.data_seed = rng.randrange(1 << 30)
    it.checkpoint = f"{rng.randint(1, 2 if it.scenario in SYNC_SCENARIOS else 4)}M"
    it.compress = rng.choice(["none", "zstd:3"]) if it.scenario in SYNC_SCENARIOS else "none"
    kinds = [rng.choice(SCENARIOS[it.scenario]) for _ in range(rng.randint(1, 3))]
    if cover:
        catalog = [(s, k) for s, k in CATALOG if s in scenarios]
        it.scenario, first = catalog[index % len(catalog)]
        kinds = [first] + [k if k in SCENARIOS[it.scenario] else "link_cut" if it.scenario in SYNC_SCENARIOS else "cut" for k in kinds[1:]]
        it.compress = "zstd:3" if it.scenario in SYNC_SCENARIOS and not index % 2 else "none"
    if "snapdestroy" in kinds:
        kinds = kinds[: kinds.index("snapdestroy") + 1]  # it ends the iteration
        it.checkpoint = "1M"
    for kind in kinds:
        it.faults.append({"kind": kind, "fraction": rng.random(), "fraction2": rng.random(), "mask": 1 << rng.randrange(8)})
    # Over loopback ssh and sshd buffer megabytes ahead of the receiver; a link at a few MB/s keeps
    # the receiver close to the byte where a fault hits (and the sender alive until the end).
    it.bwlimit = rng.choice(["2M", "4M"]) if it.scenario in SYNC_SCENARIOS else ""
    return it


@dataclass
class Runners:
    """One runner per scenario of the run (None for the others)."""

    local: Runner | None = None
    sync: SyncRunner | None = None
    btrfs: BtrfsRunner | None = None
    btrfs_sync: BtrfsSyncRunner | None = None


def run_iteration(it: Iteration, runners: Runners) -> Iteration:
    started = time.monotonic()
    wire = f", --compress {it.compress} --bwlimit {it.bwlimit}" if it.scenario in SYNC_SCENARIOS else ""
    kinds = [f["kind"] for f in it.faults]
    log(f"iteration {it.index}: {it.scenario} {it.mode}, {it.megabytes} MiB, --checkpoint {it.checkpoint}{wire}, faults {kinds}")
    try:
        if it.scenario == "btrfs":
            assert runners.btrfs is not None
            runners.btrfs.run(it)
        elif it.scenario == "btrfs_sync":
            assert runners.btrfs_sync is not None
            runners.btrfs_sync.run_btrfs(it)
        else:
            run_zfs_iteration(it, runners)
    except (Exception, pytest.fail.Exception) as exc:  # noqa: BLE001 - a runner error is a failure of this iteration
        it.problems.append(f"runner error: {type(exc).__name__}: {exc}")
        it.ok = False
    finally:
        it.seconds = round(time.monotonic() - started, 1)
    return it


def run_zfs_iteration(it: Iteration, runners: Runners) -> None:
    local = runners.local
    assert local is not None
    fs = f"{local.src.name}/it{it.index}"
    parent = f"{local.dst.name}/it{it.index}"
    target = f"{parent}/data"
    try:
        for dataset in (parent, fs):
            if tb.exists(dataset):
                tb.sh("zfs", "destroy", "-r", dataset)
        tb.sh("zfs", "create", parent)
        if it.scenario == "sync":
            assert runners.sync is not None
            runners.sync.run(it, fs, target)
        else:
            local.run(it, fs, target)
    finally:
        for dataset in (parent, fs):
            for _ in range(10):
                if not tb.exists(dataset) or tb.sh("zfs", "destroy", "-r", dataset, check=False).returncode == 0:
                    break
                time.sleep(0.5)


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
        f"{'it':>4} {'scen':<10} {'mode':<11} {'MiB':>3} {'ckpt':>4} {'faults':<40} {'resumes':>7} {'whole':>5} "
        f"{'stream':>9} {'sent':>9} {'ratio':>6} {'s':>6}  ok"
    )
    for it in results:
        kinds = ",".join(f"{f['kind']}@{f.get('offset', '-')}" + ("" if f.get("fired", True) else "(no)") for f in it.faults)
        print(
            f"{it.index:>4} {it.scenario:<10} {it.mode:<11} {it.megabytes:>3} {it.checkpoint:>4} {kinds[:40]:<40} {it.resumes:>7} "
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
    parser.add_argument(
        "--scenarios", default=DEFAULT_SCENARIOS, help=f"comma-separated, of {', '.join(SCENARIOS)} (default {DEFAULT_SCENARIOS})"
    )
    parser.add_argument("--max-mib", type=int, default=16, help="largest data set of an iteration, MiB (default 16; at least 2)")
    parser.add_argument("--cover-kinds", action="store_true", help="iteration i starts with the i-th (scenario, fault kind)")
    parser.add_argument("--time-budget", type=float, help="start no iteration after this many seconds")
    parser.add_argument("--logs", type=Path, help="keep every sync run's stderr (JSON events) in this directory")
    args = parser.parse_args(argv)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    if not scenarios or any(s not in SCENARIOS for s in scenarios) or args.max_mib < 2:
        parser.error("--scenarios takes local, sync, btrfs and/or btrfs_sync; --max-mib at least 2")
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
            runners = Runners()
            if uses_zfs:
                pools.append(make_pool(base, "s"))
                pools.append(make_pool(base, "d"))
                runners.local = Runner(pools[0], pools[1])
            if any(s in BTRFS_SCENARIOS for s in scenarios):
                btrfs = runners.btrfs = BtrfsRunner(base)
            if any(s in SYNC_SCENARIOS for s in scenarios):
                sshd = start_sshd(base / "sshd")
                proxy = FaultProxy(sshd.port)
                logs = args.logs or base / "sync"
                logs.mkdir(parents=True, exist_ok=True)
                if "sync" in scenarios:
                    runners.sync = SyncRunner(sshd, proxy, logs, (pools[0], pools[1]))
                if "btrfs_sync" in scenarios:
                    assert btrfs is not None
                    runners.btrfs_sync = BtrfsSyncRunner(btrfs, sshd, proxy, logs)
            for index in indices:
                if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                    log(f"time budget of {args.time_budget} s spent: stopping before iteration {index}")
                    break
                it = run_iteration(draw(args.seed, index, scenarios, args.max_mib, args.cover_kinds), runners)
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
