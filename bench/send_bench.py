#!/usr/bin/env python3
"""CPU per GB of `snapferry send` and of `snapferry send -t` while it skips, against raw `zfs send`, on a zfs-fuse pool.

One run creates a source pool with N MiB of random data, snapshots it, and times, interleaved round
by round:

  raw        zfs send SRC@s | wc -c        (the issue's reference: a reader at the pipe's other end)
  raw>null   zfs send SRC@s > /dev/null    (zfs-fuse's daemon then writes to /dev/null itself, no pipe)
  send       snapferry send -q SRC@s | wc -c
  send-t     snapferry send -q -t TOKEN | wc -c, TOKEN from a receive cut at --cut of the stream
             (most of its work is regenerating and verifying the skipped prefix)

CPU is the wait4 rusage (user + sys) of the sending process, which includes its `zfs send` client;
the zfs-fuse daemon's CPU is reported apart. With --baseline SRC_DIR the snapferry runs are repeated
with PYTHONPATH=SRC_DIR (another checkout's src/) in the same rounds. SNAPFERRY_PURE=1 in the
environment measures the numpy reference sums instead of the C extension.

With --also-mib N the same dataset gets a larger snapshot too, and every variant runs against each: a resume
of 49 TiB pays snapferry's start-up (0.07 s) once, and at 1 GiB that start-up is a seventh of the raw pipe's time.

    sudo python3 bench/send_bench.py --size-mib 1024 --baseline /tmp/old/src --json bench-send.json
    sudo python3 bench/send_bench.py --size-mib 1024 --also-mib 4096 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _zfsbench import (
    GiB,
    MiB,
    ScratchPools,
    fill_random,
    install_sigterm_cleanup,
    log,
    median,
    run,
    run_pipeline,
    settle,
    snapferry_argv,
    stream_size,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="data written to the source dataset (MiB)")
    ap.add_argument(
        "--also-mib",
        type=int,
        action="append",
        default=[],
        help="also measure a larger snapshot of the same dataset (repeatable)",
    )
    ap.add_argument("--repeat", type=int, default=2, help="rounds (median reported)")
    ap.add_argument("--cut", type=float, default=0.9, help="where the receive behind the send -t token was cut (fraction)")
    ap.add_argument("--checkpoint", default="64M", help="checkpoint size of that receive")
    ap.add_argument("--workdir", default="/var/tmp", help="where the sparse pool files go")
    ap.add_argument("--baseline", metavar="SRC_DIR", help="also run another checkout's snapferry (its src/)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    install_sigterm_cleanup()

    sf = snapferry_argv()
    builds = {"": sf}
    if args.baseline:
        builds["@base"] = ["env", f"PYTHONPATH={Path(args.baseline).resolve()}", *sf]
    sizes_mib = sorted({args.size_mib, *args.also_mib})
    pool_bytes = max(3 * GiB, 4 * sizes_mib[-1] * MiB)
    by_size: dict[int, dict[str, dict[str, float]]] = {}
    with ScratchPools(args.workdir, "sb") as pools:
        src = pools.create("s", pool_bytes)
        dst = pools.create("d", pool_bytes)
        run("zfs", "create", f"{src}/d")
        written = 0
        for index, size_mib in enumerate(sizes_mib):
            # One dataset, a snapshot at each size: the larger streams carry the smaller's files and more.
            fill_random(f"/{src}/d", size_mib - written, prefix=f"f{index}-", seed=index)
            written = size_mib
            run("zfs", "snapshot", f"{src}/d@s{size_mib}")
        for size_mib in sizes_mib:
            by_size[size_mib] = measure(args, builds, f"{src}/d@s{size_mib}", f"{dst}/m{size_mib}")
    results = by_size[args.size_mib]
    doc: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cut": args.cut,
        "stream_bytes": results["raw"]["stream_bytes"],
        "results": results,
    }
    if len(sizes_mib) > 1:
        doc["sizes"] = {str(size): rows for size, rows in by_size.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def measure(args: argparse.Namespace, builds: dict[str, list[str]], snapshot: str, target: str) -> dict[str, dict[str, float]]:
    """Every variant against one snapshot, interleaved round by round; the table of medians, printed and returned."""
    size = stream_size(snapshot)
    log(f"stream of {snapshot}: {size} bytes")
    tokens = {}
    for tag, argv in builds.items():
        cut = int(size * args.cut)
        recv = run_pipeline(
            [
                ["zfs", "send", snapshot],
                ["head", "-c", str(cut)],
                [*argv, "receive", "-s", "--checkpoint", args.checkpoint, f"{target}r{len(tokens)}"],
            ]
        )
        log(f"receive cut at {cut} bytes{tag}: exit {recv.stages[-1].returncode}")
        tokens[tag] = run(*argv, "token", f"{target}r{len(tokens)}").stdout.strip()
    wc, zfs_send = ["wc", "-c"], ["zfs", "send", snapshot]
    plan: list[tuple[str, list[list[str]]]] = [("raw", [zfs_send, wc]), ("raw>null", [zfs_send])]
    for tag, argv in builds.items():
        plan.append((f"send{tag}", [[*argv, "send", "-q", snapshot], wc]))
        plan.append((f"send-t{tag}", [[*argv, "send", "-q", "-t", tokens[tag]], wc]))
    samples: dict[str, list[tuple[float, float, float, float]]] = {label: [] for label, _ in plan}
    for round_ in range(args.repeat):
        for label, stages in plan:
            settle()
            result = run_pipeline(stages)
            if not result.ok:
                raise RuntimeError(f"{label} failed: {result.stages[-1].stderr}")
            stage = result.stages[0]
            samples[label].append((result.wall, stage.user + stage.sys, result.daemon_cpu, result.host_cpu))
            log(f"round {round_ + 1} {label}: {result.wall:.2f} s, CPU {stage.user:.2f} user + {stage.sys:.2f} sys")
    gb = size / 1e9
    print(f"\n{snapshot}, {size / GiB:.2f} GiB of stream")
    print(f"{'variant':<14} {'wall s':>8} {'ratio':>6} {'CPU s/GB':>9} {'daemon s/GB':>12}")
    raw_wall = median([s[0] for s in samples["raw"]])
    results: dict[str, dict[str, float]] = {}
    for label, rows in samples.items():
        wall, cpu, daemon, host = (median([r[i] for r in rows]) for i in range(4))
        results[label] = {
            "stream_bytes": size,
            "wall_s": wall,
            "ratio": raw_wall / wall,
            "cpu_s_per_gb": cpu / gb,
            "daemon_s_per_gb": daemon / gb,
            "host_cpu_s": host,
        }
        print(f"{label:<14} {wall:8.2f} {raw_wall / wall:6.2f} {cpu / gb:9.2f} {daemon / gb:12.2f}")
    return results


if __name__ == "__main__":
    sys.exit(main())
