#!/usr/bin/env python3
"""`snapferry sync` over ssh on loopback against `zfs send | ssh host zfs receive`, in one run.

A real OpenSSH server on 127.0.0.1 (generated keys, as in the tests) is the "remote" host. Two
datasets are sent: incompressible random data and compressible text. Variants, interleaved:

  raw        zfs send SRC@s | ssh root@127.0.0.1 zfs receive DST/raw
  sync-none  snapferry sync --compress none SRC root@127.0.0.1:DST/x
  sync-zstd  snapferry sync --compress zstd:3 SRC root@127.0.0.1:DST/x   (the default for remote)

Prints the median wall time and the ratio raw_time / time (target >= 0.9). Then the cost of planning
alone: `sync` of a destination that is already up to date, its median wall time and the number of ssh
connections it opens (counted by a wrapper around ssh).

    sudo python3 bench/sync_bench.py --size-mib 512 --json bench/results/sync.json
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

from _zfsbench import MiB, ScratchPools, destroy, fill_random, install_sigterm_cleanup, log, median, run, run_pipeline

from snapferry_testkit.sshd_server import remote_snapferry, start_sshd


def fill_text(directory: str, total_mib: int) -> None:
    rng = random.Random(5)
    words = [f"word{i}" for i in range(2000)]
    for index in range(max(1, total_mib // 32)):
        lines = (f"{time.time():.0f} host{rng.randrange(50)} {' '.join(rng.choices(words, k=12))}\n" for _ in range(300_000))
        with open(Path(directory) / f"log{index}.txt", "w") as out:
            out.writelines(lines)


def planning_cost(snapferry: list[str], ssh: str, source: str, target: str, tmp: Path, rounds: int = 5) -> dict[str, float]:
    """A sync with nothing to send: what planning costs (its wall time, and the ssh connections it opens)."""
    calls = tmp / "ssh-calls"
    wrapper = tmp / "counting-ssh"
    wrapper.write_text(f"#!/bin/sh\necho x >> {shlex.quote(str(calls))}\nexec {ssh} \"$@\"\n")
    wrapper.chmod(0o755)
    argv = [*snapferry, "sync", "-q", "--ssh", str(wrapper), "--remote-snapferry", remote_snapferry(), source, target]
    walls = []
    for _ in range(rounds):
        calls.write_text("")
        result = run_pipeline([argv])
        if not result.ok:
            raise RuntimeError(f"up-to-date sync failed: {[s.stderr for s in result.stages]}")
        walls.append(result.wall)
    connections = len(calls.read_text().split())
    log(f"up-to-date sync: {median(walls):.2f} s, {connections} ssh connection(s)")
    return {"median_s": median(walls), "ssh_connections": connections}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    install_sigterm_cleanup()
    snapferry = [sys.executable, "-m", "snapferry"]
    results: dict[str, dict[str, float]] = {}
    with ScratchPools(args.workdir, "sy") as pools, tempfile.TemporaryDirectory(prefix="sfbench-ssh-") as tmp:
        server = start_sshd(Path(tmp))
        try:
            ssh = shlex.split(server.command)
            src = pools.create("s", args.size_mib * MiB * 3 + (2 << 30))
            dst = pools.create("d", args.size_mib * MiB * 3 + (2 << 30))
            for kind, fill in (("random", lambda d: fill_random(d, args.size_mib)), ("text", lambda d: fill_text(d, args.size_mib))):
                run("zfs", "create", f"{src}/{kind}")
                fill(f"/{src}/{kind}")
                run("zfs", "snapshot", f"{src}/{kind}@s")
                remote = f"root@127.0.0.1:{dst}/{kind}"

                def sync(compress: str, dataset: str = f"{src}/{kind}", target: str = remote) -> list[list[str]]:
                    argv = [*snapferry, "sync", "-q", "--compress", compress, "--ssh", server.command]
                    return [[*argv, "--remote-snapferry", remote_snapferry(), dataset, target]]

                variants = {
                    "raw": [["zfs", "send", f"{src}/{kind}@s"], [*ssh, "root@127.0.0.1", f"zfs receive {dst}/{kind}"]],
                    "sync-none": sync("none"),
                    "sync-zstd": sync("zstd:3"),
                }
                times: dict[str, list[float]] = {name: [] for name in variants}
                for round_ in range(args.repeat + 1):
                    for name, stages in variants.items():
                        destroy(f"{dst}/{kind}")
                        result = run_pipeline(stages)
                        if not result.ok:
                            raise RuntimeError(f"{name} failed: {[s.stderr for s in result.stages]}")
                        if round_:  # the first round warms caches and is not counted
                            times[name].append(result.wall)
                        log(f"{kind} round {round_} {name:10s} {result.wall:6.2f} s")
                raw = median(times["raw"])
                for name, values in times.items():
                    results[f"{kind}/{name}"] = {"median_s": median(values), "ratio": raw / median(values)}
            results["up-to-date"] = planning_cost(snapferry, server.command, f"{src}/text", f"root@127.0.0.1:{dst}/text", Path(tmp))
        finally:
            server.stop()
    print(f"\n{args.size_mib} MiB per dataset, median of {args.repeat}")
    print(f"{'variant':24s} {'median s':>9s} {'raw/x':>7s}")
    for name, row in results.items():
        if "ratio" in row:
            print(f"{name:24s} {row['median_s']:9.2f} {row['ratio']:7.2f}")
        else:
            print(f"{name:24s} {row['median_s']:9.2f}   ({row['ssh_connections']:.0f} ssh connections)")
    if args.json:
        Path(args.json).write_text(json.dumps({"size_mib": args.size_mib, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
