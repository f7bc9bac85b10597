#!/usr/bin/env python3
"""Issue 14's whole table from one run: each bench script in turn, then every row as a figure against its target.

Runs, one after the other on a machine left alone (each one interleaves its own variants round by round):

  receive_bench.py   zfs send | snapferry receive -s, snapferry send | snapferry receive -s, zfs send | cat |
                     zfs receive (the ceiling of any pass-through), receive CPU, peak RSS at 1 GiB and larger
  send_bench.py      snapferry send and send -t at 90 % against zfs send | wc -c, their CPU
  sync_bench.py      sync over ssh on loopback against zfs send | ssh zfs receive, and syncoid, same run
  btrfs_bench.py     the 20 000-file metadata tree against btrfs send | btrfs receive

and prints the table (markdown) with each row's figure, target and whether it meets it. The JSON of each
script goes to --out, so that the table can be printed again from it (--from) without running anything.

    sudo python3 bench/table.py --out bench/results/table-$(date +%F)
    python3 bench/table.py --from bench/results/table-2026-12-07
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# Each script, its arguments (the sizes) and the JSON file it writes.
RUNS = {
    "receive": ["receive_bench.py", "--size-mib", "1024", "--checkpoints", "1G", "--repeat", "5", "--tiny-repeat", "0"],
    "send": ["send_bench.py", "--size-mib", "1024", "--also-mib", "4096", "--repeat", "3"],
    "sync": ["sync_bench.py", "--size-mib", "512", "--repeat", "5"],
    "btrfs": ["btrfs_bench.py", "--data-mib", "256", "--files", "20000", "--repeat", "3"],
}

Results = dict[str, dict[str, object]]


@dataclass(frozen=True)
class Row:
    path: str
    target: str
    figure: Callable[[Results], str]
    met: Callable[[Results], bool]


def _main_row(results: Results, label: str) -> dict[str, float]:
    rows: list[dict[str, float]] = results["receive"]["main"]  # type: ignore[assignment]
    return next(r for r in rows if r["label"] == label)


def _send(results: Results, label: str) -> dict[str, float]:
    return results["send"]["results"][label]  # type: ignore[index]


def _send_sizes(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """Stream MiB -> variant -> figures, for every size the send bench ran (only its main size before --also-mib)."""
    send: dict[str, object] = results["send"]
    sizes: dict[str, dict[str, dict[str, float]]] = send.get("sizes") or {"": send["results"]}  # type: ignore[assignment]
    return sizes


def _gib(results: Results, rows: dict[str, dict[str, float]]) -> float:
    return float(rows["raw"].get("stream_bytes", results["send"]["stream_bytes"])) / 2**30  # type: ignore[arg-type]


def _send_t_largest(results: Results) -> float:
    largest = max(_send_sizes(results).values(), key=lambda rows: _gib(results, rows))
    return largest["send-t"]["ratio"]


def _send_t_figure(results: Results) -> str:
    """Each size's ratio: at 1 GiB snapferry's start-up (0.07 s) is a seventh of the raw pipe's time, at 4 GiB less."""
    return ", ".join(f"{_gib(results, rows):.0f} GiB: {rows['send-t']['ratio']:.2f}" for rows in _send_sizes(results).values())


def _sync(results: Results, label: str) -> dict[str, float]:
    return results["sync"]["results"].get(label, {})  # type: ignore[attr-defined]


def _meta(results: Results, label: str) -> dict[str, float]:
    return results["btrfs"]["results"]["meta"].get(label, {})  # type: ignore[index,no-any-return]


def _rss(results: Results) -> list[tuple[float, float]]:
    """(stream MiB, peak RSS MiB of snapferry receive) for every size the receive bench ran."""
    receive: dict[str, object] = results["receive"]
    main: list[dict[str, float]] = receive["main"]  # type: ignore[assignment]
    found = [(float(receive["stream_bytes"]) / 2**20, max(r["recv_maxrss_mib"] for r in main if str(r["label"]).startswith("sf")))]  # type: ignore[arg-type]
    for large in receive.get("large_runs", []):  # type: ignore[attr-defined]
        sf = next(r for r in large["rows"] if str(r["label"]).startswith("sf"))
        found.append((large["stream_bytes"] / 2**20, sf["recv_maxrss_mib"]))
    return found


def _largest(results: Results) -> tuple[float, float]:
    """(stream GiB, receive CPU s/GB of snapferry) of the largest stream the receive bench ran: start-up spread thin."""
    receive: dict[str, object] = results["receive"]
    sizes = [(float(receive["stream_bytes"]), _main_row(results, "sf-1G"))]  # type: ignore[arg-type]
    for large in receive.get("large_runs", []):  # type: ignore[attr-defined]
        sizes.append((float(large["stream_bytes"]), next(r for r in large["rows"] if str(r["label"]).startswith("sf"))))
    size, row = max(sizes, key=lambda pair: pair[0])
    return size / 2**30, float(row["recv_cpu_s_per_gb"])


def _receive_cpu_figure(results: Results) -> str:
    """The 1 GiB figure, what `cat` alone costs in the same pipe (the floor of any process in the middle), and the largest stream's."""
    passing = _main_row(results, "cat").get("pass_cpu_s_per_gb", 0.0)
    size, largest = _largest(results)
    own = _main_row(results, "sf-1G")["recv_cpu_s_per_gb"]
    return f"{own:.2f} s/GB (`cat` in the same pipe: {passing:.2f}; at {size:.0f} GiB: {largest:.2f})"


def _sync_figure(results: Results) -> str:
    auto = [_sync(results, f"{kind}/sync-auto").get("ratio") for kind in ("random", "text")]
    syncoid = [_sync(results, f"{kind}/syncoid-none").get("ratio") for kind in ("random", "text")]
    shown = f"random {auto[0]:.2f}, text {auto[1]:.2f}"
    if all(syncoid):
        shown += f" (syncoid --compress=none: {syncoid[0]:.2f}, {syncoid[1]:.2f})"
    return shown


def _sync_met(results: Results) -> bool:
    kinds = ("random", "text")
    auto = [_sync(results, f"{kind}/sync-auto").get("ratio", 0.0) for kind in kinds]
    syncoid = [_sync(results, f"{kind}/syncoid-none").get("ratio", 0.0) for kind in kinds]
    return min(auto) >= 0.9 and all(a >= s for a, s in zip(auto, syncoid, strict=True))


ROWS = [
    Row(
        "`zfs send | snapferry receive -s` (1 GiB)",
        ">= 0.95",
        lambda r: f"{_main_row(r, 'sf-1G')['ratio_raw_over']:.2f} (`| cat |`: {_main_row(r, 'cat')['ratio_raw_over']:.2f})",
        lambda r: _main_row(r, "sf-1G")["ratio_raw_over"] >= 0.95,
    ),
    Row(
        "`snapferry send | snapferry receive -s`",
        ">= 0.9",
        lambda r: f"{_main_row(r, 'sf2')['ratio_raw_over']:.2f}",
        lambda r: _main_row(r, "sf2")["ratio_raw_over"] >= 0.9,
    ),
    Row("`sync` over ssh vs `zfs send | ssh zfs receive`, 512 MiB", ">= 0.9, ahead of syncoid", _sync_figure, _sync_met),
    Row(
        "`send -t` at 90 % vs `zfs send | wc -c`",
        ">= 0.9 (largest stream)",
        _send_t_figure,
        lambda r: _send_t_largest(r) >= 0.9,
    ),
    Row(
        "CPU of `snapferry send`",
        "<= 0.4 s/GB",
        lambda r: f"{_send(r, 'send')['cpu_s_per_gb']:.2f} s/GB",
        lambda r: _send(r, "send")["cpu_s_per_gb"] <= 0.4,
    ),
    Row(
        "CPU of `send -t` while it skips",
        "<= 0.4 s/GB",
        lambda r: f"{_send(r, 'send-t')['cpu_s_per_gb']:.2f} s/GB",
        lambda r: _send(r, "send-t")["cpu_s_per_gb"] <= 0.4,
    ),
    Row(
        "CPU of `snapferry receive -s`",
        "<= 0.4 s/GB",
        _receive_cpu_figure,
        lambda r: _main_row(r, "sf-1G")["recv_cpu_s_per_gb"] <= 0.4,
    ),
    Row(
        "btrfs metadata tree (20 000 files) vs `btrfs send | btrfs receive`",
        ">= 0.9",
        lambda r: (
            f"{_meta(r, 'sf')['ratio']:.2f} (`btrfs send | snapferry receive -s`: {_meta(r, 'sf-recv')['ratio']:.2f}"
            + (f"; the receivers alone, from a file: {_meta(r, 'sf-file')['ratio']:.2f})" if _meta(r, "sf-file") else ")")
        ),
        lambda r: _meta(r, "sf")["ratio"] >= 0.9,
    ),
    Row(
        "peak RSS of `snapferry receive -s`",
        "<= 64 MiB, flat",
        lambda r: ", ".join(f"{rss:.0f} MiB at {size / 1024:.0f} GiB" for size, rss in _rss(r)),
        lambda r: max(rss for _, rss in _rss(r)) <= 64,
    ),
]


def _busy(label: str, wall: float, host: float, own: float | None = None) -> str:
    own_text = f"{own:.2f}" if own is not None else "-"
    return f"| {label} | {wall:.2f} | {host:.2f} | {host / wall:.2f} | {own_text} |"


def where_time_goes(results: Results) -> list[str]:
    """Each variant's wall time, the CPU the whole host spent meanwhile (every process, the zfs-fuse daemon, ssh, the
    kernel's threads) and snapferry's own: the arithmetic of what a faster snapferry could still win on this host."""
    lines = [
        "",
        f"Where the time goes ({os.cpu_count()} cores: a run that keeps them busy cannot be shorter than host CPU / cores):",
        "",
        "| variant | wall s | host CPU s | cores busy | snapferry's own CPU s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    if "receive" in results:
        for label in ("raw", "cat", "sf-1G", "sf2"):
            row = _main_row(results, label)
            if "host_cpu_s" in row:
                gb = float(results["receive"]["stream_bytes"]) / 1e9  # type: ignore[arg-type]
                own = row["recv_cpu_s_per_gb"] * gb if label.startswith("sf") else None
                lines.append(_busy(f"receive bench: {label}", row["median_wall_s"], row["host_cpu_s"], own))
    if "send" in results:
        for label in ("raw", "send", "send-t"):
            row = _send(results, label)
            if "host_cpu_s" in row:
                lines.append(_busy(f"send bench: {label}", row["wall_s"], row["host_cpu_s"]))
    if "sync" in results:
        for label in ("random/raw", "random/sync-auto", "random/syncoid-none", "text/raw", "text/sync-auto", "text/syncoid-none"):
            row = _sync(results, label)
            if "host_cpu_s" in row:
                lines.append(_busy(f"sync bench: {label}", row["median_s"], row["host_cpu_s"]))
    return lines if len(lines) > 5 else []


def run_all(out: Path, only: list[str], rss_mib: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, argv in RUNS.items():
        if only and name not in only:
            continue
        extra = ["--rss-mib", rss_mib] if name == "receive" else []
        started = time.monotonic()
        print(f"table: running {argv[0]} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:], *extra, "--json", str(out / f"{name}.json")], check=True)
        print(f"table: {argv[0]} took {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def render(out: Path) -> str:
    results: Results = {name: json.loads((out / f"{name}.json").read_text()) for name in RUNS if (out / f"{name}.json").exists()}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d', time.localtime((out / 'receive.json').stat().st_mtime)) if 'receive' in results else ''}"
        f" on {os.cpu_count()} cores; ratios are raw time / snapferry time, in one run.",
        "",
        "| path | figure | target | met |",
        "| --- | ---: | ---: | :---: |",
    ]
    for row in ROWS:
        try:
            figure, met = row.figure(results), ("yes" if row.met(results) else "no")
        except (KeyError, StopIteration, TypeError):
            figure, met = "not measured", "-"
        # A | inside a cell, even inside `code`, would end it in markdown.
        path, figure = row.path.replace("|", "\\|"), figure.replace("|", "\\|")
        lines.append(f"| {path} | {figure} | {row.target} | {met} |")
    return "\n".join(lines + where_time_goes(results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--out", type=Path, help="run every bench, writing their JSON here, then print the table")
    source.add_argument("--from", dest="from_dir", type=Path, help="only print the table from an earlier run's JSON")
    parser.add_argument("--only", action="append", choices=list(RUNS), default=[], help="run only these benches (repeatable)")
    parser.add_argument("--rss-mib", default="4096,16384", help="the larger streams the receive bench checks peak RSS with")
    args = parser.parse_args()
    if args.out:
        run_all(args.out, args.only, args.rss_mib)
    print(render(args.out or args.from_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
