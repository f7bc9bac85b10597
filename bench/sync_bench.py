#!/usr/bin/env python3
"""`snapferry sync` and `syncoid` over ssh on loopback against `zfs send | ssh host zfs receive`, in one run.

A real OpenSSH server on 127.0.0.1 (generated keys, as in the tests) is the "remote" host. Two
datasets are sent: incompressible random data and compressible text. Variants, interleaved:

  raw           zfs send SRC@s | ssh root@127.0.0.1 zfs receive DST/x
  sync-none     snapferry sync --compress none SRC root@127.0.0.1:DST/x
  sync-zstd     snapferry sync --compress zstd:3 SRC root@127.0.0.1:DST/x
  sync-auto     snapferry sync --compress auto SRC root@127.0.0.1:DST/x   (the default for remote)
  syncoid-none  syncoid --no-sync-snap --compress=none SRC root@127.0.0.1:DST/x   (Debian's sanoid)
  syncoid-lzo   syncoid --no-sync-snap SRC root@127.0.0.1:DST/x   (its default compression, lzop; only
                when lzop is installed)

syncoid runs as shipped: mbuffer at both ends when it is installed, and its own ssh ControlMaster
connection (a socket in /tmp, closed with `-O exit` at its end; the bench closes any it leaves), from
a copy with one line fixed so that it can list a remote's snapshots on zfs-fuse (see _zfsbench's
patched_syncoid). The syncoid variants are left out when syncoid is not installed.

Prints the median wall time and the ratio raw_time / time (target >= 0.9). Then the cost of planning
alone: `sync` (and `syncoid --compress=none`) of a destination that is already up to date, its median
wall time, the ssh processes it starts (counted by a wrapper first on PATH) and the connections they
open (counted in sshd's log: with a ControlMaster, most ssh processes share one).

    sudo python3 bench/sync_bench.py --size-mib 512 --json bench/results/sync.json

With `--slow-link RATE` (bytes a second, e.g. 40M) every stream crosses a link of that speed instead
(snapferry_testkit.throttle in front of ssh, for the raw pipe too); syncoid, whose ssh cannot be
wrapped that way, is left out then.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _zfsbench import (
    MiB,
    ScratchPools,
    close_syncoid_masters,
    destroy,
    fill_random,
    install_sigterm_cleanup,
    log,
    median,
    patched_syncoid,
    run,
    run_pipeline,
    settle,
    syncoid_argv,
    syncoid_sockets,
)

from snapferry.transport.wire import parse_rate
from snapferry_testkit.sshd_server import SshServer, remote_snapferry, start_sshd


def fill_text(directory: str, total_mib: int) -> None:
    rng = random.Random(5)
    words = [f"word{i}" for i in range(2000)]
    for index in range(max(1, total_mib // 32)):
        lines = (f"{time.time():.0f} host{rng.randrange(50)} {' '.join(rng.choices(words, k=12))}\n" for _ in range(300_000))
        with open(Path(directory) / f"log{index}.txt", "w") as out:
            out.writelines(lines)


def planning_cost(name: str, argv: list[str], server: SshServer, tmp: Path, rounds: int = 5) -> dict[str, float]:
    """A run with nothing to send: what planning costs (its wall time, the ssh processes it starts and the
    connections sshd accepts).

    `ssh` is counted by a wrapper first on PATH (and also given to snapferry as `--ssh`): with a
    ControlMaster, most ssh processes are clients of one connection, which sshd's log counts."""
    calls = tmp / "ssh-calls"
    bin_dir = tmp / "counting-bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "ssh"
    real_ssh = shutil.which("ssh") or "/usr/bin/ssh"
    wrapper.write_text(f'#!/bin/sh\necho x >> {shlex.quote(str(calls))}\nexec {shlex.quote(real_ssh)} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    walls, processes, connections = [], [], []
    for _ in range(rounds):
        calls.write_text("")
        accepted = server.log.read_text().count("Accepted publickey")
        sockets = syncoid_sockets()
        result = run_pipeline([argv], env=env)
        close_syncoid_masters(sockets)
        if not result.ok:
            raise RuntimeError(f"up-to-date {name} failed: {[s.stderr for s in result.stages]}")
        walls.append(result.wall)
        processes.append(len(calls.read_text().split()))
        connections.append(server.log.read_text().count("Accepted publickey") - accepted)
    log(f"up-to-date {name}: {median(walls):.2f} s, {median(processes):.0f} ssh process(es), {median(connections):.0f} connection(s)")
    return {"median_s": median(walls), "ssh_processes": median(processes), "ssh_connections": median(connections)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--slow-link", metavar="RATE", help="send every stream through a link of this many bytes a second")
    args = parser.parse_args()
    install_sigterm_cleanup()
    snapferry = [sys.executable, "-m", "snapferry"]
    lzop = shutil.which("lzop")
    if shutil.which("syncoid") is None:
        log("syncoid is not installed (apt-get install sanoid): its variants are left out")
    results: dict[str, dict[str, float]] = {}
    with ScratchPools(args.workdir, "sy") as pools, tempfile.TemporaryDirectory(prefix="sfbench-ssh-") as tmp:
        server = start_sshd(Path(tmp))
        syncoid = patched_syncoid(Path(tmp)) if shutil.which("syncoid") and not args.slow_link else None
        try:
            ssh = shlex.split(server.command)
            if args.slow_link:
                rate = str(parse_rate(args.slow_link))
                ssh = [sys.executable, "-m", "snapferry_testkit.throttle", os.devnull, rate, f"{tmp}/never", *ssh]
            ssh_command = shlex.join(ssh)
            src = pools.create("s", args.size_mib * MiB * 3 + (2 << 30))
            dst = pools.create("d", args.size_mib * MiB * 3 + (2 << 30))
            for kind, fill in (("random", lambda d: fill_random(d, args.size_mib)), ("text", lambda d: fill_text(d, args.size_mib))):
                run("zfs", "create", f"{src}/{kind}")
                fill(f"/{src}/{kind}")
                run("zfs", "snapshot", f"{src}/{kind}@s")
                remote = f"root@127.0.0.1:{dst}/{kind}"

                def sync(compress: str, dataset: str = f"{src}/{kind}", target: str = remote) -> list[list[str]]:
                    argv = [*snapferry, "sync", "-q", "--compress", compress, "--ssh", ssh_command]
                    return [[*argv, "--remote-snapferry", remote_snapferry(), dataset, target]]

                variants = {"raw": [["zfs", "send", f"{src}/{kind}@s"], [*ssh, "root@127.0.0.1", f"zfs receive {dst}/{kind}"]]}
                if syncoid is not None:
                    variants["syncoid-none"] = [syncoid_argv(syncoid, server, server.port, f"{src}/{kind}", remote, "none")]
                    if lzop is not None:
                        variants["syncoid-lzo"] = [syncoid_argv(syncoid, server, server.port, f"{src}/{kind}", remote, "lzo")]
                variants["sync-none"] = sync("none")
                variants["sync-zstd"] = sync("zstd:3")
                variants["sync-auto"] = sync("auto")
                times: dict[str, list[float]] = {name: [] for name in variants}
                busy: dict[str, list[float]] = {name: [] for name in variants}
                for round_ in range(args.repeat + 1):
                    for name, stages in variants.items():
                        destroy(f"{dst}/{kind}")
                        settle()
                        sockets = syncoid_sockets()
                        result = run_pipeline(stages)
                        close_syncoid_masters(sockets)
                        if not result.ok:
                            raise RuntimeError(f"{name} failed: {[s.stderr for s in result.stages]}")
                        if round_:  # the first round warms caches and is not counted
                            times[name].append(result.wall)
                            busy[name].append(result.host_cpu)
                        log(f"{kind} round {round_} {name:10s} {result.wall:6.2f} s")
                raw = median(times["raw"])
                for name, values in times.items():
                    wall = median(values)
                    results[f"{kind}/{name}"] = {"median_s": wall, "ratio": raw / wall, "host_cpu_s": median(busy[name])}
            # The text dataset was last received by sync-auto: nothing is left to send to it.
            argv = [*snapferry, "sync", "-q", "--ssh", ssh_command, "--remote-snapferry", remote_snapferry()]
            up_to_date = [f"{src}/text", f"root@127.0.0.1:{dst}/text"]
            results["up-to-date/sync"] = planning_cost("sync", [*argv, *up_to_date], server, Path(tmp))
            if syncoid is not None:
                argv = syncoid_argv(syncoid, server, server.port, *up_to_date, "none")
                results["up-to-date/syncoid"] = planning_cost("syncoid", argv, server, Path(tmp))
        finally:
            server.stop()
    link = f", over a {args.slow_link}/s link" if args.slow_link else ""
    print(f"\n{args.size_mib} MiB per dataset, median of {args.repeat}{link}")
    print(f"{'variant':24s} {'median s':>9s} {'raw/x':>7s}")
    for name, row in results.items():
        if "ratio" in row:
            print(f"{name:24s} {row['median_s']:9.2f} {row['ratio']:7.2f}")
        else:
            counts = f"{row['ssh_processes']:.0f} ssh processes, {row['ssh_connections']:.0f} connections"
            print(f"{name:24s} {row['median_s']:9.2f}   ({counts})")
    if args.json:
        Path(args.json).write_text(json.dumps({"size_mib": args.size_mib, "slow_link": args.slow_link, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
