#!/usr/bin/env python3
"""Receive throughput of snapferry against raw `zfs send | zfs receive`, on scratch zfs-fuse pools.

One run creates a source and a destination pool (sparse files), writes N MiB of random data in
~64 MiB files, snapshots it, and times, interleaved round by round (so drift hits all alike):

  raw        zfs send SRC@s | zfs receive DST/raw
  cat        zfs send SRC@s | cat | zfs receive DST/cat                (cost of any pass-through)
  sf-<C>     zfs send SRC@s | snapferry receive -s --checkpoint C DST/sf
  sf2        snapferry send SRC@s | snapferry receive -s DST/sf2       (default checkpoint)

Each is repeated (the destination destroyed in between) and the median reported, with MB/s, the
ratio raw_time / time (target >= 0.9), CPU seconds per GB of the receiving process (wait4 rusage:
snapferry plus the thin `zfs receive` clients it runs), its peak RSS, and the zfs-fuse daemon's CPU.
Larger streams (--rss-mib, default 4096; a list such as 4096,16384 runs each) are then received by
snapferry and raw (--large-repeat) to show that memory stays flat. Tiny-stream runs measure the fixed cost per receive.

    sudo python3 bench/receive_bench.py --size-mib 1024 --json bench-receive.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

from _zfsbench import (
    GiB,
    MiB,
    PipelineResult,
    ScratchPools,
    destroy,
    fill_random,
    install_sigterm_cleanup,
    log,
    median,
    run,
    run_pipeline,
    settle,
    snapferry_argv,
    stream_size,
    zfs_get,
)


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B").rstrip("I")
    unit = " KMGT".index(text[-1]) if text[-1] in "KMGT" else 0
    return int(text[:-1] if unit else text) << (10 * unit)


def variants(
    src_snap: str, dst: str, checkpoints: list[str], sf: list[str], baseline: list[str] | None = None
) -> list[tuple[str, str, list[list[str]]]]:
    """(label, target dataset, pipeline stages); with a baseline, its sf-<C> and sf2 runs too (label@base)."""
    out = [
        ("raw", f"{dst}/raw", [["zfs", "send", src_snap], ["zfs", "receive", f"{dst}/raw"]]),
        ("cat", f"{dst}/cat", [["zfs", "send", src_snap], ["cat"], ["zfs", "receive", f"{dst}/cat"]]),
    ]
    for c in checkpoints:
        target = f"{dst}/sf{c.lower()}"
        out.append((f"sf-{c}", target, [["zfs", "send", src_snap], [*sf, "receive", "-q", "-s", "--checkpoint", c, target]]))
    out.append(("sf2", f"{dst}/sf2", [[*sf, "send", "-q", src_snap], [*sf, "receive", "-q", "-s", f"{dst}/sf2"]]))
    if baseline is not None:
        for label, target, stages in list(out[2:]):
            swapped = [[*baseline, *stage[len(sf) :]] if stage[: len(sf)] == sf else stage for stage in stages]
            out.append((f"{label}@base", f"{target}base", [[f"{a}base" if a == target else a for a in s] for s in swapped]))
    return out


def check(result: PipelineResult, label: str) -> None:
    if not result.ok:
        details = "; ".join(f"{s.argv[0]}... rc={s.returncode} {s.stderr}" for s in result.stages)
        raise RuntimeError(f"{label} failed: {details}")


def record(result: PipelineResult, stream: int) -> dict[str, float]:
    recv = result.stages[-1]
    first = result.stages[0]
    gb = stream / 1e9
    return {
        "wall_s": result.wall,
        "recv_cpu_s": recv.user + recv.sys,
        "recv_user_s": recv.user,
        "recv_sys_s": recv.sys,
        "recv_cpu_s_per_gb": (recv.user + recv.sys) / gb,
        "recv_maxrss_mib": recv.maxrss_kib / 1024,
        "send_cpu_s": first.user + first.sys,
        "send_maxrss_mib": first.maxrss_kib / 1024,
        # A middle stage (`cat`): what any process costs that only reads the stream from one pipe and writes it to another.
        "pass_cpu_s_per_gb": sum(s.user + s.sys for s in result.stages[1:-1]) / gb,
        "daemon_cpu_s": result.daemon_cpu,
        "host_cpu_s": result.host_cpu,
    }


def summarize(label: str, runs: list[dict[str, float]], stream: int, raw_median: float | None) -> dict[str, object]:
    wall = median([r["wall_s"] for r in runs])
    out: dict[str, object] = {
        "label": label,
        "runs": runs,
        "median_wall_s": wall,
        "mb_per_s": stream / 1e6 / wall,
        "ratio_raw_over": (raw_median / wall) if raw_median else None,
        "recv_cpu_s_per_gb": median([r["recv_cpu_s_per_gb"] for r in runs]),
        "pass_cpu_s_per_gb": median([r.get("pass_cpu_s_per_gb", 0.0) for r in runs]),
        "recv_maxrss_mib": max(r["recv_maxrss_mib"] for r in runs),
        "send_maxrss_mib": max(r["send_maxrss_mib"] for r in runs),
        "daemon_cpu_s": median([r["daemon_cpu_s"] for r in runs]),
        "host_cpu_s": median([r["host_cpu_s"] for r in runs]),
    }
    return out


def print_table(title: str, rows: list[dict[str, object]], stream: int) -> None:
    print(f"\n{title}: stream {stream} bytes ({stream / MiB:.0f} MiB)")
    print(f"{'variant':<10} {'median s':>9} {'MB/s':>7} {'raw/x':>6} {'recv CPU s/GB':>14} {'recv RSS MiB':>13} {'daemon CPU s':>13}")
    for r in rows:
        ratio = r["ratio_raw_over"]
        print(
            f"{r['label']:<10} {r['median_wall_s']:>9.2f} {r['mb_per_s']:>7.1f} "
            f"{(f'{ratio:.2f}' if ratio else '-'):>6} {r['recv_cpu_s_per_gb']:>14.2f} "
            f"{r['recv_maxrss_mib']:>13.1f} {r['daemon_cpu_s']:>13.2f}"
        )


def timed_rounds(
    plan: list[tuple[str, str, list[list[str]]]], repeat: int, stream: int, src_guid: str, snap: str, warmup: int = 0
) -> dict[str, list[dict[str, float]]]:
    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in plan}
    # The first receive into a fresh pool is up to 2x slower (seen here): warm up with raw runs.
    for _ in range(warmup):
        label, target, stages = plan[0]
        destroy(target)
        result = run_pipeline(stages)
        check(result, f"warm-up {label}")
        log(f"warm-up  {label:<8} {result.wall:6.2f} s (not counted)")
        destroy(target)
    for rep in range(repeat):
        for label, target, stages in plan:
            destroy(target)
            time.sleep(1.0)
            settle()
            result = run_pipeline(stages)
            check(result, label)
            got = zfs_get(f"{target}@{snap}", "guid")
            if got != src_guid:
                raise RuntimeError(f"{label}: received guid {got} != source guid {src_guid}")
            runs[label].append(record(result, stream))
            log(f"round {rep + 1}/{repeat} {label:<8} {result.wall:6.2f} s  {stream / 1e6 / result.wall:6.1f} MB/s")
            destroy(target)
    return runs


def profile_receive(src_snap: str, target: str, checkpoint: str, out_dir: Path) -> dict[str, object]:
    """One snapferry receive under cProfile; returns its top functions by own time."""
    prof = out_dir / f"receive-{checkpoint}.prof"
    # main(), not the module: the command's own entry point ends with os._exit, before cProfile writes its file.
    entry = out_dir / "profiled_main.py"
    entry.write_text("import sys\nfrom snapferry.cli.main import main\nsys.exit(main())\n")
    stages = [
        ["zfs", "send", src_snap],
        [
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            str(prof),
            str(entry),
            "receive",
            "-q",
            "-s",
            "--checkpoint",
            checkpoint,
            target,
        ],
    ]
    destroy(target)
    result = run_pipeline(stages)
    check(result, f"profile {checkpoint}")
    destroy(target)
    stats = pstats.Stats(str(prof))
    rows = []
    for (file, line, func), (_, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": tt, "cumtime_s": ct})
    rows.sort(key=lambda r: -r["tottime_s"])
    print(f"\ncProfile of snapferry receive --checkpoint {checkpoint} (wall {result.wall:.2f} s, under the profiler):")
    for r in rows[:12]:
        print(f"  {r['tottime_s']:7.3f} s own {r['cumtime_s']:7.3f} s cum {r['calls']:>8}  {r['function']}")
    return {"checkpoint": checkpoint, "wall_s": result.wall, "top": rows[:25]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="data written to the source dataset (MiB)")
    ap.add_argument("--file-mib", type=int, default=64, help="size of each data file (MiB)")
    ap.add_argument("--checkpoints", default="64M,256M,1G", help="checkpoint sizes for the sf-<C> runs")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each variant (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed raw runs before each timed series")
    ap.add_argument("--rss-mib", default="4096", help="data of the larger streams for the RSS check, comma-separated MiB (0: none)")
    ap.add_argument("--large-repeat", type=int, default=2, help="runs of each variant on the large stream")
    ap.add_argument("--tiny-repeat", type=int, default=3, help="tiny-stream runs for the fixed cost (0: skip)")
    ap.add_argument("--profile", action="store_true", help="also run each sf-<C> receive once under cProfile")
    ap.add_argument("--workdir", default="/var/tmp", help="where the sparse pool files go")
    ap.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    ap.add_argument(
        "--baseline",
        metavar="SRC_DIR",
        help="also run the snapferry variants with the code in SRC_DIR (a checkout's src/, e.g. a git worktree of an older commit)",
    )
    args = ap.parse_args()
    install_sigterm_cleanup()

    checkpoints = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    rss_sizes = [int(m) for m in str(args.rss_mib).split(",") if m.strip() and int(m)]
    big = max([args.size_mib, *rss_sizes])
    sf = snapferry_argv()
    report: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "zfs": "zfs-fuse " + run("dpkg-query", "-W", "-f", "${Version}", "zfs-fuse", check=False).stdout.strip(),
        "size_mib": args.size_mib,
        "repeat": args.repeat,
        "checkpoints": checkpoints,
    }
    t0 = time.perf_counter()
    with ScratchPools(args.workdir, "rb") as pools, tempfile.TemporaryDirectory(prefix="sfbench-prof-") as tmp:
        src = pools.create("s", big * MiB * 5 // 4 + 2 * GiB)
        dst = pools.create("d", big * MiB * 2 + 2 * GiB)
        run("zfs", "create", f"{src}/d")
        log(f"writing {args.size_mib} MiB of random data in {args.file_mib} MiB files")
        t = time.perf_counter()
        fill_random(f"/{src}/d", args.size_mib, args.file_mib, prefix="f")
        log(f"written in {time.perf_counter() - t:.1f} s")
        run("zfs", "snapshot", f"{src}/d@s")
        src_guid = zfs_get(f"{src}/d@s", "guid")
        stream = stream_size(f"{src}/d@s")
        report["stream_bytes"] = stream
        log(f"stream {stream} bytes")

        baseline = ["env", f"PYTHONPATH={Path(args.baseline).resolve()}", *sf] if args.baseline else None
        plan = variants(f"{src}/d@s", dst, checkpoints, sf, baseline)
        runs = timed_rounds(plan, args.repeat, stream, src_guid, "s", args.warmup)
        raw_median = median([r["wall_s"] for r in runs["raw"]])
        rows = [summarize(label, runs[label], stream, raw_median) for label, _, _ in plan]
        report["main"] = rows
        print_table(f"{args.size_mib} MiB dataset, median of {args.repeat}", rows, stream)

        if args.tiny_repeat:
            run("zfs", "create", f"{src}/tiny")
            fill_random(f"/{src}/tiny", 1, 1, prefix="t")
            run("zfs", "snapshot", f"{src}/tiny@s")
            tiny_guid = zfs_get(f"{src}/tiny@s", "guid")
            tiny_stream = stream_size(f"{src}/tiny@s")
            tiny_plan = [v for v in variants(f"{src}/tiny@s", dst, ["256M"], sf) if v[0] in ("raw", "sf-256M", "sf2")]
            tiny_runs = timed_rounds(tiny_plan, args.tiny_repeat, tiny_stream, tiny_guid, "s")
            tiny_raw = median([r["wall_s"] for r in tiny_runs["raw"]])
            tiny_rows = [summarize(label, tiny_runs[label], tiny_stream, tiny_raw) for label, _, _ in tiny_plan]
            report["tiny"] = tiny_rows
            print(f"\nfixed cost per receive (1 MiB dataset, median of {args.tiny_repeat}):")
            for r in tiny_rows:
                extra = float(r["median_wall_s"]) - tiny_raw  # type: ignore[arg-type]
                print(f"  {r['label']:<8} {r['median_wall_s']:.3f} s  (+{extra:.3f} s over raw)")

        if args.profile:
            profiles = []
            for c in checkpoints:
                profiles.append(profile_receive(f"{src}/d@s", f"{dst}/prof", c, Path(tmp)))
            report["profiles"] = profiles

        # Larger streams, each adding data to the same dataset: peak RSS must not grow with the stream.
        large_runs: list[dict[str, object]] = []
        have = args.size_mib
        for n, mib in enumerate(m for m in rss_sizes if m > args.size_mib):
            log(f"adding {mib - have} MiB for the {mib} MiB stream")
            fill_random(f"/{src}/d", mib - have, args.file_mib, prefix=f"g{n}", seed=1 + n)
            have = mib
            snap = f"big{n}"
            run("zfs", "snapshot", f"{src}/d@{snap}")
            big_guid = zfs_get(f"{src}/d@{snap}", "guid")
            big_stream = stream_size(f"{src}/d@{snap}")
            big_plan = [v for v in variants(f"{src}/d@{snap}", dst, ["256M"], sf) if v[0] in ("raw", "sf-256M")]
            big_runs = timed_rounds(big_plan, args.large_repeat, big_stream, big_guid, snap, args.warmup)
            big_raw = median([r["wall_s"] for r in big_runs["raw"]])
            big_rows = [summarize(label, big_runs[label], big_stream, big_raw) for label, _, _ in big_plan]
            large_runs.append({"stream_bytes": big_stream, "rows": big_rows})
            print_table(f"{mib} MiB dataset, median of {args.large_repeat}", big_rows, big_stream)
        report["large_runs"] = large_runs

        print("\npeak RSS of snapferry receive (MiB):")
        sf_small = max(r["recv_maxrss_mib"] for r in rows if str(r["label"]).startswith("sf"))
        print(f"  {stream / MiB:6.0f} MiB stream: {sf_small:.1f}")
        for large in large_runs:
            sf_large = next(r for r in large["rows"] if r["label"] == "sf-256M")  # type: ignore[attr-defined]
            print(f"  {int(large['stream_bytes']) / MiB:6.0f} MiB stream: {sf_large['recv_maxrss_mib']:.1f}")  # type: ignore[call-overload]
    report["total_runtime_s"] = time.perf_counter() - t0
    log(f"done in {report['total_runtime_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
