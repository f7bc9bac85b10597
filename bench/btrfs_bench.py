#!/usr/bin/env python3
"""btrfs transfer throughput of snapferry against raw `btrfs send | btrfs receive`, on scratch loop-mounted btrfs.

One run makes a source and a target btrfs (sparse image files), builds two trees and snapshots each:

  data   --data-mib MiB of random data in 64 MiB files (the bulk of a backup's bytes)
  meta   --files small files (0-8 KiB, random) in 100 directories (a mail spool, a source tree)

and times, interleaved round by round so that drift hits all alike, for each tree:

  raw       btrfs send SNAP | btrfs receive DIR
  sf-recv   btrfs send SNAP | snapferry receive -s DIR                (snapferry's receiver alone)
  sf        snapferry send SNAP | snapferry receive -s DIR            (both ends, default checkpoints)
  sf-recv-base  as sf-recv, with the package in --baseline SRC         (before/after on the same machine state)
  file      btrfs receive DIR < STREAM                                (the stream saved first: no btrfs send
  sf-file   snapferry receive -s DIR < STREAM                          beside the receiver, as on a host with
                                                                      a core free for each)

Each time includes a final `sync -f` of the target (until the data is on disk; btrfs receive does
not sync by itself, snapferry's checkpoints do). Reported: the median of --repeat runs, MiB/s of
stream, the ratio raw_time / time (target >= 0.9; sf-file's against file's), CPU seconds per GiB of the
receiving process and its peak RSS (wait4 rusage).

    sudo python3 bench/btrfs_bench.py --data-mib 1024 --files 20000 --json bench/results/btrfs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from _zfsbench import MiB, log, median, run_pipeline, settle, snapferry_argv


def sh(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def make_fs(stack: ExitStack, base: Path, name: str, size: int) -> Path:
    image, mnt = base / f"{name}.img", base / name
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    stack.callback(image.unlink)
    sh("mkfs.btrfs", "-q", "-f", image)
    loop = sh("losetup", "--find", "--show", image).strip()
    stack.callback(subprocess.run, ["losetup", "-d", loop], check=False)
    sh("mount", "-o", "noatime", loop, mnt)
    stack.callback(subprocess.run, ["umount", str(mnt)], check=False)
    return mnt


def fill_data(directory: Path, mib: int) -> None:
    for i in range(0, mib, 64):
        with open(directory / f"f{i // 64:04d}", "wb") as f:
            for _ in range(min(64, mib - i)):
                f.write(os.urandom(MiB))


def fill_meta(directory: Path, files: int) -> None:
    rng = random.Random(1)
    for d in range(100):
        (directory / f"d{d:03d}").mkdir()
    for i in range(files):
        (directory / f"d{i % 100:03d}" / f"file{i:06d}").write_bytes(rng.randbytes(rng.randint(0, 8192)))


def save_stream(snapshot: Path, path: Path) -> int:
    """The snapshot's stream into path; its size. Written as it streams by: a bench process holding the stream would
    show in its children's peak RSS (fork)."""
    with open(path, "wb") as out:
        proc = subprocess.Popen(["btrfs", "send", "-q", str(snapshot)], stdout=out)
        if proc.wait():
            raise SystemExit(f"btrfs send {snapshot} failed")
        return out.tell()


def delete_subvolumes(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.name == ".snapferry":
            continue
        sh("btrfs", "-q", "subvolume", "delete", "-c", entry)
    sh("btrfs", "-q", "subvolume", "sync", directory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="SRC",
        help="also time `btrfs send | snapferry receive -s` with the package in SRC (an older src/ tree), interleaved",
    )
    args = parser.parse_args()
    sf = snapferry_argv()
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="sf-btrfs-bench-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        room = (args.data_mib * 3 + 2048) * MiB
        src = make_fs(stack, base, "src", room)
        dst = make_fs(stack, base, "dst", room)
        for tree in ("data", "meta"):
            sh("btrfs", "-q", "subvolume", "create", src / tree)
            if tree == "data":
                fill_data(src / tree, args.data_mib)
            else:
                fill_meta(src / tree, args.files)
            snap = src / f"{tree}_snap"
            sh("btrfs", "-q", "subvolume", "snapshot", "-r", src / tree, snap)
            sh("sync")
            saved = base / f"{tree}.stream"
            size = save_stream(snap, saved)
            log(f"{tree}: stream {size / MiB:.1f} MiB")
            # `sh -c 'exec ...'`: the receiver replaces the shell, so wait4's rusage is still the receiver's.
            from_file = "exec {receiver} < " + shlex.quote(str(saved))
            variants = {
                "raw": [["btrfs", "send", "-q", str(snap)], ["btrfs", "receive", "-q", "{dir}"]],
                "sf-recv": [["btrfs", "send", "-q", str(snap)], [*sf, "receive", "-q", "-s", "{dir}"]],
                "sf": [[*sf, "send", "-q", str(snap)], [*sf, "receive", "-q", "-s", "{dir}"]],
                "file": [["sh", "-c", from_file.format(receiver="btrfs receive -q {dir}")]],
                "sf-file": [["sh", "-c", from_file.format(receiver=shlex.join([*sf, "receive", "-q", "-s"]) + " {dir}")]],
            }
            if args.baseline is not None:
                # `env` execs the receiver in its own process, so wait4's rusage is still the receiver's.
                old = ["env", f"PYTHONPATH={args.baseline.resolve()}", *sf]
                variants["sf-recv-base"] = [["btrfs", "send", "-q", str(snap)], [*old, "receive", "-q", "-s", "{dir}"]]
            times: dict[str, list[float]] = {k: [] for k in variants}
            cpu: dict[str, list[float]] = {k: [] for k in variants}
            rss: dict[str, int] = {k: 0 for k in variants}
            for round_ in range(args.repeat):
                for label, stages in variants.items():
                    target = dst / f"{tree}-{label}-{round_}"
                    target.mkdir()
                    settle()
                    started = time.perf_counter()
                    result = run_pipeline([[a.replace("{dir}", str(target)) for a in stage] for stage in stages])
                    sh("sync", "-f", target)
                    elapsed = time.perf_counter() - started
                    for stage in result.stages:
                        if stage.returncode:
                            raise SystemExit(f"{label} failed: {stage.stderr}")
                    receiver = result.stages[-1]
                    times[label].append(elapsed)
                    cpu[label].append(receiver.user + receiver.sys)
                    rss[label] = max(rss[label], receiver.maxrss_kib)
                    log(f"  {tree} {label} round {round_}: {elapsed:.2f} s")
                    delete_subvolumes(target)
                    target.rmdir()
            # The file variants compare with each other: both receivers alone, their input already written.
            reference = {label: median(times["file" if "file" in label else "raw"]) for label in variants}
            results[tree] = {
                "stream_bytes": size,
                **{
                    label: {
                        "seconds": round(median(times[label]), 3),
                        "mib_s": round(size / MiB / median(times[label]), 1),
                        "ratio": round(reference[label] / median(times[label]), 3),
                        "cpu_s_per_gib": round(median(cpu[label]) / (size / (1 << 30)), 2),
                        "peak_rss_mib": round(rss[label] / 1024, 1),
                    }
                    for label in variants
                },
            }
    report = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "data_mib": args.data_mib,
        "files": args.files,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
