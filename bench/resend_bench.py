#!/usr/bin/env python3
"""Bytes re-sent after k interruptions, against the bound stream + k * checkpoint.

For each checkpoint size C and each k (default 1, 2, 3), on scratch zfs-fuse pools:
  1. `zfs send SRC@s | snapferry receive -s --checkpoint C DST/rK`, cut after a random number of
     bytes (like `| head -c N |`: this script is the pipe and closes both ends), or with the
     receiver killed (--mode kill);
  2. k times: `snapferry send -t $(snapferry token DST) | snapferry receive -s --checkpoint C DST`,
     cut again except the last time (when no checkpoint was committed there is no token, and the
     whole stream is sent again, as a user would);
  3. checks the received snapshot's guid and every file's sha256 against the source.
Every byte that crosses the pipe is counted. The cut points are uniform in the stream (sorted,
--seed), and each attempt is cut at the next point's position in the original stream.

    sudo python3 bench/resend_bench.py --size-mib 1024 --json bench-resend.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from _zfsbench import (
    GiB,
    MiB,
    ScratchPools,
    destroy,
    fill_random,
    install_sigterm_cleanup,
    log,
    run,
    snapferry_argv,
    stream_size,
    tree_digest,
    zfs_get,
)

from snapferry.core.streamio import write_all
from snapferry.zfs.codec.token import ResumeToken


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("B").rstrip("I")
    unit = " KMGT".index(text[-1]) if text[-1] in "KMGT" else 0
    return int(text[:-1] if unit else text) << (10 * unit)


def transfer(sender: list[str], receiver: list[str], limit: int | None, mode: str) -> dict[str, object]:
    """Pipe sender into receiver through this process, counting bytes; stop after `limit` bytes."""
    send = subprocess.Popen(sender, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    recv = subprocess.Popen(receiver, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert send.stdout is not None and recv.stdin is not None
    src, dst = send.stdout.fileno(), recv.stdin.fileno()
    passed = 0
    cut = False
    t = time.perf_counter()
    try:
        while True:
            want = 1 << 20 if limit is None else min(1 << 20, limit - passed)
            if want <= 0:
                cut = True
                break
            chunk = os.read(src, want)
            if not chunk:
                break
            try:
                write_all(dst, [chunk])
            except BrokenPipeError:
                break
            passed += len(chunk)
    finally:
        if cut and mode == "kill":
            recv.send_signal(signal.SIGKILL)
        for stream in (recv.stdin, send.stdout):
            with contextlib.suppress(BrokenPipeError):
                stream.close()
        recv_err = recv.stderr.read().decode(errors="replace").strip() if recv.stderr else ""
        recv.wait()
        send_err = send.stderr.read().decode(errors="replace").strip() if send.stderr else ""
        send.wait()
    return {
        "bytes": passed,
        "cut": cut,
        "wall_s": time.perf_counter() - t,
        "send_rc": send.returncode,
        "recv_rc": recv.returncode,
        "recv_stderr": recv_err[-400:],
        "send_stderr": send_err[-400:],
    }


def wait_receives_gone(target: str, timeout: float = 30.0) -> None:
    """After a kill, the orphaned `zfs receive` of the open piece must see EOF and exit first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = run("pgrep", "-f", f"zfs receive.* {target}$", check=False)
        if not proc.stdout.strip():
            return
        time.sleep(0.2)


def token_of(sf: list[str], target: str) -> str | None:
    proc = run(*sf, "token", target, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def one_case(
    sf: list[str], snap: str, target: str, stream: int, checkpoint: str, k: int, rng: random.Random, mode: str
) -> dict[str, object]:
    cuts = sorted(int(rng.uniform(0.02, 0.98) * stream) for _ in range(k))
    receiver = [*sf, "receive", "-q", "-s", "--checkpoint", checkpoint, target]
    attempts = []
    start = 0  # where the current attempt starts in the original stream
    t = time.perf_counter()
    for i in range(k + 1):
        token = token_of(sf, target) if i else None
        if token is None:
            if i:
                log(f"  no token after cut {i}: sending the whole stream again")
            sender = ["zfs", "send", snap]
            start = 0
            resume = None
        else:
            decoded = ResumeToken.decode(token)
            sender = [*sf, "send", "-q", "-t", token]
            start = decoded.offset
            resume = {"offset": decoded.offset, "seq": decoded.seq}
        limit = max(1, cuts[i] - start) if i < k else None
        result = transfer(sender, receiver, limit, mode)
        result.update({"start": start, "cut_at": cuts[i] if i < k else None, "resume": resume})
        attempts.append(result)
        log(
            f"  attempt {i + 1}: from {start / MiB:7.1f} MiB, passed {result['bytes'] / MiB:7.1f} MiB, "
            f"recv rc {result['recv_rc']}, {result['wall_s']:.1f} s"
        )
        if mode == "kill":
            wait_receives_gone(target)
        if i < k and not result["cut"]:
            raise RuntimeError(f"attempt {i + 1} was meant to be cut but ended: {result}")
        if i == k and result["recv_rc"] != 0:
            raise RuntimeError(f"final attempt failed: {result['recv_stderr']}")
    total = sum(int(a["bytes"]) for a in attempts)  # type: ignore[call-overload]
    bound = stream + k * parse_size(checkpoint)
    return {
        "k": k,
        "checkpoint": checkpoint,
        "cuts": cuts,
        "attempts": attempts,
        "total_sent": total,
        "stream": stream,
        "ratio": total / stream,
        "bound": bound,
        "bound_ratio": bound / stream,
        "within_bound": total <= bound,
        "resent": total - stream,
        "wall_s": time.perf_counter() - t,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--file-mib", type=int, default=64)
    ap.add_argument("--checkpoints", default="64M,256M")
    ap.add_argument("--ks", default="1,2,3", help="numbers of interruptions")
    ap.add_argument(
        "--mode", choices=["cut", "kill"], default="cut", help="cut: close the pipe like head -c; kill: SIGKILL the receiver at the cut"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-verify-data", action="store_true", help="skip the sha256 comparison of the files")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    install_sigterm_cleanup()

    sf = snapferry_argv()
    ks = [int(x) for x in args.ks.split(",")]
    checkpoints = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    rng = random.Random(args.seed)
    cases = []
    t0 = time.perf_counter()
    with ScratchPools(args.workdir, "rs") as pools:
        src = pools.create("s", args.size_mib * MiB * 5 // 4 + 2 * GiB)
        dst = pools.create("d", args.size_mib * MiB * 3 + 2 * GiB)
        run("zfs", "create", f"{src}/d")
        log(f"writing {args.size_mib} MiB of random data")
        fill_random(f"/{src}/d", args.size_mib, args.file_mib)
        run("zfs", "snapshot", f"{src}/d@s")
        snap = f"{src}/d@s"
        src_guid = zfs_get(snap, "guid")
        stream = stream_size(snap)
        want = None if args.no_verify_data else tree_digest(f"/{src}/d")
        log(f"stream {stream} bytes")
        for checkpoint in checkpoints:
            for k in ks:
                target = f"{dst}/r{k}c{checkpoint.lower()}"
                log(f"checkpoint {checkpoint}, k={k} ({args.mode})")
                case = one_case(sf, snap, target, stream, checkpoint, k, rng, args.mode)
                got_guid = zfs_get(f"{target}@s", "guid")
                case["guid_ok"] = got_guid == src_guid
                leftovers = [
                    line
                    for line in run("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", target).stdout.split()
                    if line != f"{target}@s"
                ]
                case["leftover_snapshots"] = leftovers
                if want is not None:
                    case["data_ok"] = tree_digest(f"/{target}") == want
                cases.append(case)
                log(
                    f"  total {case['total_sent']} = {case['ratio']:.3f} x stream (bound {case['bound_ratio']:.3f}), "
                    f"guid {'ok' if case['guid_ok'] else 'MISMATCH'}"
                    + ("" if want is None else f", data {'ok' if case['data_ok'] else 'MISMATCH'}")
                )
                destroy(target)

    print(f"\nre-sent bytes after k interruptions ({args.mode}), stream {stream} bytes ({stream / MiB:.0f} MiB)")
    print(
        f"{'ckpt':>5} {'k':>2} {'total MiB':>10} {'total/stream':>13} {'bound/stream':>13} "
        f"{'ok':>3} {'guid':>5} {'data':>5}  lost per cut (MiB)"
    )
    for c in cases:
        lost = []
        attempts = c["attempts"]
        for i in range(c["k"]):
            nxt = attempts[i + 1]
            lost.append((attempts[i]["start"] + attempts[i]["bytes"] - nxt["start"]) / MiB)
        data = ("ok" if c.get("data_ok") else "BAD") if "data_ok" in c else "-"
        print(
            f"{c['checkpoint']:>5} {c['k']:>2} {c['total_sent'] / MiB:>10.1f} {c['ratio']:>13.3f} "
            f"{c['bound_ratio']:>13.3f} {'yes' if c['within_bound'] else 'NO':>3} "
            f"{'ok' if c['guid_ok'] else 'BAD':>5} {data:>5}  " + ", ".join(f"{x:.1f}" for x in lost)
        )
    runtime = time.perf_counter() - t0
    log(f"done in {runtime:.0f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "machine": {"cpus": os.cpu_count()},
                    "size_mib": args.size_mib,
                    "stream_bytes": stream,
                    "mode": args.mode,
                    "seed": args.seed,
                    "cases": cases,
                    "total_runtime_s": runtime,
                },
                indent=2,
            )
            + "\n"
        )
        log(f"wrote {args.json}")
    ok = all(c["guid_ok"] and c.get("data_ok", True) and c["within_bound"] and not c["leftover_snapshots"] for c in cases)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
