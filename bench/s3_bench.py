#!/usr/bin/env python3
"""`snapferry sync`/`restore`/`get` to and from S3 against boto3 moving the same bytes, on one local Swift, in one run.

The bench starts its own Swift (s3api, 127.0.0.1, files in a temp directory) and two scratch zfs-fuse
pools, fills a dataset with incompressible data and snapshots it. `snapferry send SRC@s > FILE` gives
the very bytes `sync` stores; boto3 (multipart, the same part size and concurrency as --chunk-size and
--jobs) moves that file as the baseline. Variants, interleaved round by round (the first round warms
caches and is not counted), medians over --runs:

  upload   boto3 upload_fileobj(FILE)             vs  snapferry sync --chunk-size C --jobs J SRC s3://B/P
           (sync's time includes making the stream from ZFS and the process's start-up; boto3's is the call alone)
  download boto3 download_fileobj -> /dev/null    vs  snapferry get ... > /dev/null
                                                  and snapferry restore s3://B/P/SRC@s DST/r  (includes zfs receive)
           plus `cat FILE | zfs receive DST/raw`: what receiving alone costs here

           plus `snapferry ls` of an empty prefix: the fixed cost of a snapferry process with boto3

Ratios are baseline_time / snapferry_time (1.0: as fast as boto3). For each: CPU (user+sys, children
included; boto3's is this process's during the call), zfs-fuse daemon CPU, and the snapferry process's
peak RSS (from /usr/bin/time: wait4's ru_maxrss of a child starts from this process's RSS at the fork).
Then the cost of interruptions: a sync run with --json is SIGKILLed at a random moment after a random
number of `chunk` events, --kills times, and run again until it completes; reported are the bytes of
`chunk` events with uploaded=true over all runs minus the stream (the event count), and the bytes the
Swift proxy logged as received for the chunk PUTs (the wire: also what in-flight PUTs had sent when killed).
Done with --jobs J and with --jobs 1. Every stored copy read back is checked against FILE's sha256.

    sudo python3 bench/s3_bench.py --size-mib 512 --runs 3 --json bench/results/s3.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from _zfsbench import MiB, ScratchPools, destroy, fill_random, install_sigterm_cleanup, log, median, run, run_pipeline, zfs_get
from boto3.s3.transfer import TransferConfig

from snapferry_testkit.swift_server import SwiftServer, start_swift

BUCKET = "sfbench"
SNAPFERRY = [sys.executable, "-m", "snapferry"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def sha256_of_get(url: str, endpoint: str, jobs: int, env: dict[str, str]) -> str:
    """sha256 of `snapferry get URL`: the stored stream as it comes back."""
    argv = [*SNAPFERRY, "get", "-q", "--endpoint-url", endpoint, "--jobs", str(jobs), url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    h = hashlib.sha256()
    while chunk := proc.stdout.read(4 * MiB):
        h.update(chunk)
    if proc.wait() != 0:
        raise RuntimeError(f"snapferry get {url} failed")
    return h.hexdigest()


def wire_puts(server: SwiftServer, prefix: str) -> dict[str, int]:
    """From the proxy's access log: the PUTs of chunk objects under prefix, their bytes received, how many failed,
    and how many were of a chunk index PUT before.

    A log line is `client remote date method path protocol status referer agent token bytes_recvd bytes_sent ...`;
    a PUT whose client was killed mid-body is logged (499) with the bytes that had arrived."""
    total = puts = failed = 0
    names: set[str] = set()
    for line in server.log("proxy").read_text(errors="replace").splitlines():
        fields = line.split(" ")[1:]  # after "swift-proxy:"
        if len(fields) < 12 or fields[0] == "-" or fields[3] != "PUT":
            continue
        path = urllib.parse.unquote(fields[4])
        if not path.startswith(f"/{BUCKET}/{prefix}/") or "/chunk-" not in path:
            continue
        puts += 1
        names.add(path.rsplit("/", 1)[1][: len("chunk-00000000")])
        total += int(fields[10]) if fields[10].isdigit() else 0
        failed += fields[6] != "200"
    return {"puts": puts, "bytes": total, "failed": failed, "chunks_put_again": puts - len(names)}


def interrupted_sync(
    server: SwiftServer, env: dict[str, str], dataset: str, prefix: str, chunk: int, jobs: int, kills: int, stream: int, rng: random.Random
) -> dict[str, Any]:
    """Sync dataset into a fresh prefix, SIGKILLed `kills` times, each at a random moment after a random number of chunk
    events (before the next would come), then run until it completes."""
    chunks = math.ceil(stream / chunk)
    # Not after the second-to-last chunk: the run would often end before the kill lands.
    points = sorted(rng.sample(range(1, chunks - 1), kills))
    argv = [*SNAPFERRY, "sync", "--json", "--endpoint-url", server.endpoint_url, "--chunk-size", str(chunk), "--jobs", str(jobs)]
    argv += [dataset, f"s3://{BUCKET}/{prefix}"]
    attempts: list[dict[str, Any]] = []
    started = time.perf_counter()
    for attempt in range(kills + 1):
        kill_at = points[attempt] if attempt < kills else None
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        assert proc.stderr is not None
        seen = uploaded = uploaded_bytes = 0
        last = time.perf_counter()
        timer: threading.Timer | None = None
        other: list[str] = []
        for line in proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                other.append(line.rstrip())
                continue
            if event.get("event") != "chunk":
                continue
            seen += 1
            if event.get("uploaded"):
                uploaded += 1
                uploaded_bytes += int(event["bytes"])
            now = time.perf_counter()
            gap, last = now - last, now
            if kill_at is not None and seen >= kill_at and timer is None:
                # A random moment before the next event would come: mid-PUT, not only between two chunks.
                timer = threading.Timer(rng.uniform(0, gap), os.kill, (proc.pid, signal.SIGKILL))
                timer.start()
        if timer is not None:
            timer.cancel()
        rc = proc.wait()
        killed = rc == -signal.SIGKILL
        if not killed and rc != 0:
            raise RuntimeError(f"sync of {prefix} failed ({rc}): {' '.join(other)[-2000:]}")
        attempts.append(
            {"kill_at": kill_at, "killed": killed, "chunk_events": seen, "uploaded": uploaded, "uploaded_bytes": uploaded_bytes}
        )
        log(f"  jobs {jobs} run {attempt}: {seen} chunk events, {uploaded} uploaded" + (" -> SIGKILL" if killed else ", complete"))
        if not killed:
            break
    wall = time.perf_counter() - started
    time.sleep(1)  # the proxy logs a killed client's PUT once it notices the disconnect
    wire = wire_puts(server, prefix)
    total = sum(a["uploaded_bytes"] for a in attempts)
    return {
        "jobs": jobs,
        "chunks": chunks,
        "kill_points": points,
        "attempts": attempts,
        "wall_s": wall,
        "uploaded_bytes": total,
        "excess_bytes": total - stream,
        "excess_chunks": (total - stream) / chunk,
        "wire": wire,
        "wire_excess_bytes": wire["bytes"] - stream,
        "wire_excess_chunks": (wire["bytes"] - stream) / chunk,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    install_sigterm_cleanup()
    chunk, jobs = args.chunk_mib * MiB, args.jobs
    transfer = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=jobs)
    samples: dict[str, list[dict[str, float]]] = {}
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release, "python": sys.version.split()[0]},
        "size_mib": args.size_mib,
        "chunk_mib": args.chunk_mib,
        "jobs": jobs,
        "runs": args.runs,
    }
    with ScratchPools(args.workdir, "s3") as pools, tempfile.TemporaryDirectory(prefix="sfbench-s3-", dir=args.workdir) as tmp_name:
        tmp = Path(tmp_name)
        server = start_swift(tmp / "swift")
        try:
            env = {**os.environ, **server.env()}
            endpoint = ["--endpoint-url", server.endpoint_url]
            client = server.client()
            client.create_bucket(Bucket=BUCKET)
            src = pools.create("s", args.size_mib * MiB * 2 + (2 << 30))
            dst = pools.create("d", args.size_mib * MiB * 3 + (2 << 30))
            dataset = f"{src}/data"
            run("zfs", "create", dataset)
            fill_random(f"/{dataset}", args.size_mib)
            run("zfs", "snapshot", f"{dataset}@s")
            stream_file = tmp / "stream"
            with open(stream_file, "wb") as f:
                subprocess.run([*SNAPFERRY, "send", "-q", f"{dataset}@s"], stdout=f, env=env, check=True)
            stream = stream_file.stat().st_size
            digest = sha256_file(stream_file)
            guid = zfs_get(f"{dataset}@s", "guid")
            out.update(stream_bytes=stream, stream_chunks=math.ceil(stream / chunk))
            log(f"stream {stream} bytes ({math.ceil(stream / chunk)} chunks of {args.chunk_mib} MiB), jobs {jobs}")

            rss_file = tmp / "maxrss"

            def timed(name: str, round_: int, stages: list[list[str]]) -> None:
                # wait4's ru_maxrss of a child starts from its parent's RSS at the fork (this process holds boto3's
                # buffers), so a snapferry process's peak comes from /usr/bin/time, whose own child starts small.
                ours = stages[-1][0] == sys.executable
                if ours:
                    stages = [*stages[:-1], ["/usr/bin/time", "-o", str(rss_file), "-f", "%M", *stages[-1]]]
                result = run_pipeline(stages, env=env)
                if not result.ok:
                    raise RuntimeError(f"{name} failed: {[s.stderr[-2000:] for s in result.stages]}")
                cpu = sum(s.user + s.sys for s in result.stages)
                rss_mib = int(rss_file.read_text().split()[-1]) / 1024 if ours else 0.0
                record(name, round_, {"wall_s": result.wall, "cpu_s": cpu, "daemon_cpu_s": result.daemon_cpu, "peak_rss_mib": rss_mib})

            def in_process(name: str, round_: int, call: Callable[[], object]) -> None:
                """boto3 in this process: the call's wall time and the CPU of all of this process's threads meanwhile."""
                before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                call()
                wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
                cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                record(name, round_, {"wall_s": wall, "cpu_s": cpu, "daemon_cpu_s": 0.0, "peak_rss_mib": 0.0})

            def record(name: str, round_: int, sample: dict[str, float]) -> None:
                rss_note = f", {sample['peak_rss_mib']:.1f} MiB" if sample["peak_rss_mib"] else ""
                log(f"round {round_} {name:18s} {sample['wall_s']:6.2f} s, CPU {sample['cpu_s']:5.2f} s{rss_note}")
                if round_:
                    samples.setdefault(name, []).append(sample)

            store = [*SNAPFERRY, "sync", "-q", *endpoint, "--chunk-size", str(chunk), "--jobs", str(jobs)]
            for round_ in range(args.runs + 1):
                key, prefix = f"boto3/r{round_}", f"sync-r{round_}"
                with open(stream_file, "rb") as source:
                    in_process("upload-boto3", round_, partial(client.upload_fileobj, source, BUCKET, key, Config=transfer))
                timed("sync", round_, [[*store, dataset, f"s3://{BUCKET}/{prefix}"]])
                timed("ls-empty-prefix", round_, [[*SNAPFERRY, "ls", "-q", *endpoint, f"s3://{BUCKET}/nothing-here"]])
                url = f"s3://{BUCKET}/{prefix}/{dataset}@s"
                with open(os.devnull, "wb") as null:
                    in_process("download-boto3", round_, partial(client.download_fileobj, BUCKET, key, null, Config=transfer))
                timed("get", round_, [[*SNAPFERRY, "get", "-q", *endpoint, "--jobs", str(jobs), url]])
                destroy(f"{dst}/r")
                timed("restore", round_, [[*SNAPFERRY, "restore", "-q", *endpoint, "--jobs", str(jobs), url, f"{dst}/r"]])
                if zfs_get(f"{dst}/r@s", "guid") != guid:
                    raise RuntimeError("restored snapshot's guid differs from the source's")
                destroy(f"{dst}/raw")
                timed("zfs-receive-file", round_, [["cat", str(stream_file)], ["zfs", "receive", f"{dst}/raw"]])
                if round_ == 0 and sha256_of_get(url, server.endpoint_url, jobs, env) != digest:
                    raise RuntimeError(f"{url} read back differs from `snapferry send` of the snapshot")
            destroy(f"{dst}/r")
            destroy(f"{dst}/raw")

            rng = random.Random(args.seed)
            interruptions = []
            for kill_jobs in dict.fromkeys((jobs, 1)):
                log(f"interrupted sync, jobs {kill_jobs}, {args.kills} kills")
                prefix = f"kill-j{kill_jobs}"
                result = interrupted_sync(server, env, dataset, prefix, chunk, kill_jobs, args.kills, stream, rng)
                result["read_back_ok"] = sha256_of_get(f"s3://{BUCKET}/{prefix}/{dataset}@s", server.endpoint_url, jobs, env) == digest
                interruptions.append(result)
        finally:
            server.stop()

    summary: dict[str, dict[str, Any]] = {}
    for name, rows in samples.items():
        row: dict[str, Any] = {k: median([r[k] for r in rows]) for k in ("wall_s", "cpu_s", "daemon_cpu_s")}
        row.update(mb_per_s=stream / row["wall_s"] / 1e6, peak_rss_mib=max(r["peak_rss_mib"] for r in rows), runs=rows)
        summary[name] = row
    summary["sync"]["ratio"] = summary["upload-boto3"]["wall_s"] / summary["sync"]["wall_s"]
    for name in ("get", "restore", "zfs-receive-file"):
        summary[name]["ratio"] = summary["download-boto3"]["wall_s"] / summary[name]["wall_s"]
    out.update(results=summary, interruptions=interruptions)

    print(f"\nstream {stream:,} bytes, {args.chunk_mib} MiB chunks/parts, {jobs} jobs, median of {args.runs}")
    print(f"{'variant':18s} {'median s':>9s} {'MB/s':>7s} {'ratio':>6s} {'CPU s':>6s} {'zfs-fuse s':>10s} {'peak RSS MiB':>13s}")
    for name, row in summary.items():
        ratio = f"{row['ratio']:6.2f}" if "ratio" in row else ""
        peak = f"{row['peak_rss_mib']:.1f}" if row["peak_rss_mib"] else ""
        rate = f"{row['mb_per_s']:.1f}" if name != "ls-empty-prefix" else ""
        print(f"{name:18s} {row['wall_s']:9.2f} {rate:>7s} {ratio:>6s} {row['cpu_s']:6.2f} {row['daemon_cpu_s']:10.2f} {peak:>13s}")
    print("(ratio: boto3 upload / sync; boto3 download / get, restore, zfs receive of the file)")
    for r in interruptions:
        kills, wire = sum(a["killed"] for a in r["attempts"]), r["wire"]
        print(f"jobs {r['jobs']}, {kills} kills after chunk events {r['kill_points']} of {r['chunks']}, {r['wall_s']:.2f} s in all")
        print(f"  chunk events uploaded=true: {r['uploaded_bytes']:,} B, excess {r['excess_bytes']:,} B = {r['excess_chunks']:.2f} chunks")
        print(
            f"  on the wire (proxy log): {wire['bytes']:,} B in {wire['puts']} PUTs ({wire['failed']} cut short, "
            f"{wire['chunks_put_again']} of a chunk PUT before), excess {r['wire_excess_bytes']:,} B = {r['wire_excess_chunks']:.2f} chunks"
        )
        print(f"  read back equal to the stream: {r['read_back_ok']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
