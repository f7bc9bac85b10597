#!/usr/bin/env python3
"""What-if for the receive bottleneck: snapferry's own code with two changes patched in at run time.

src/ is not modified. The patched variants run the real PieceReceiver / send_snapshot in a child
process after monkeypatching:
  pipes    F_SETPIPE_SZ 1 MiB on the stream pipes (stdin, each `zfs receive`'s stdin; for send,
           stdout and `zfs send`'s stdout) instead of Linux's 64 KiB default
  cfl      BlockSum.of through a 6-line C fletcher-4 loop (compiled here with gcc -O2, via ctypes)
and are timed, interleaved, against raw `zfs send | zfs receive` and the unpatched CLI.

    sudo python3 bench/whatif_receive.py --size-mib 1024 --json bench/results/whatif.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

F_SETPIPE_SZ = 1031
C_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
void f4_block(const uint32_t *w, size_t n, uint64_t *out) {
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i < n; i++) { a += w[i]; b += a; c += b; d += c; }
    out[0] = a; out[1] = b; out[2] = c; out[3] = d;
}
"""


def patch(pipe_size: int, cfletcher: str | None) -> None:
    import ctypes
    import fcntl

    import numpy as np

    from snapferry.codec import fletcher
    from snapferry.engine import pipes

    if cfletcher:
        lib = ctypes.CDLL(cfletcher)
        lib.f4_block.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        out = (ctypes.c_uint64 * 4)()

        def of(cls: type, data: bytes | bytearray | memoryview) -> object:
            view = memoryview(data).cast("B")
            if len(view) % 4:
                raise ValueError(f"fletcher-4 needs whole 32-bit words, got {len(view)} bytes")
            arr = np.frombuffer(view, dtype=np.uint8)
            lib.f4_block(arr.ctypes.data, len(view) // 4, ctypes.addressof(out))
            return cls(len(view) // 4, out[0], out[1], out[2], out[3])

        fletcher.BlockSum.of = classmethod(of)  # type: ignore[assignment]
    if pipe_size:
        for fd in (0, 1):
            with contextlib.suppress(OSError):  # not a pipe
                fcntl.fcntl(fd, F_SETPIPE_SZ, pipe_size)
        recv_init = pipes.ReceiveProcess.__init__
        send_init = pipes.SendProcess.__init__

        def recv(self: pipes.ReceiveProcess, *a: object, **kw: object) -> None:
            recv_init(self, *a, **kw)  # type: ignore[arg-type]
            fcntl.fcntl(self._fd, F_SETPIPE_SZ, pipe_size)

        def send(self: pipes.SendProcess, *a: object, **kw: object) -> None:
            send_init(self, *a, **kw)  # type: ignore[arg-type]
            fcntl.fcntl(self.stdout.fileno(), F_SETPIPE_SZ, pipe_size)

        pipes.ReceiveProcess.__init__ = recv  # type: ignore[method-assign]
        pipes.SendProcess.__init__ = send  # type: ignore[method-assign]


def child(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["child-recv", "child-send"])
    ap.add_argument("--pipe", type=int, default=0)
    ap.add_argument("--cfletcher")
    ap.add_argument("--checkpoint", type=int, default=256 << 20)
    ap.add_argument("target")
    a = ap.parse_args(argv)
    patch(a.pipe, a.cfletcher)
    from snapferry.engine.pipes import write_all
    from snapferry.engine.zfs import Zfs

    if a.mode == "child-recv":
        from snapferry.resume.receiver import PieceReceiver

        with open(0, "rb", buffering=1 << 20, closefd=False) as source:  # as cmd_receive does
            PieceReceiver(Zfs(), a.target, checkpoint_size=a.checkpoint).receive(source)
    else:
        from snapferry.resume.sender import send_snapshot

        send_snapshot(Zfs(), a.target, lambda parts: write_all(1, parts))
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("child-"):
        return child(sys.argv[1:])
    from _zfsbench import (
        GiB,
        MiB,
        ScratchPools,
        destroy,
        fill_random,
        install_sigterm_cleanup,
        log,
        median,
        run,
        run_pipeline,
        snapferry_argv,
        stream_size,
        zfs_get,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    install_sigterm_cleanup()
    sf = snapferry_argv()
    me = [sys.executable, str(Path(__file__).resolve())]
    big = str(1 << 20)
    with tempfile.TemporaryDirectory(prefix="sfbench-whatif-") as tmp, ScratchPools(args.workdir, "wi") as pools:
        lib = None
        if shutil.which("gcc"):
            (Path(tmp) / "f4.c").write_text(C_SOURCE)
            lib = str(Path(tmp) / "f4.so")
            subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", lib, str(Path(tmp) / "f4.c")], check=True)
        else:
            log("no gcc: skipping the C fletcher variants")
        src = pools.create("s", args.size_mib * MiB * 5 // 4 + 2 * GiB)
        dst = pools.create("d", args.size_mib * MiB * 2 + 2 * GiB)
        run("zfs", "create", f"{src}/d")
        fill_random(f"/{src}/d", args.size_mib)
        run("zfs", "snapshot", f"{src}/d@s")
        snap, guid = f"{src}/d@s", zfs_get(f"{src}/d@s", "guid")
        stream = stream_size(snap)
        t = f"{dst}/t"
        zsend = ["zfs", "send", snap]

        def recv(*flags: str, checkpoint: int = 256 << 20) -> list[str]:
            return [*me, "child-recv", *flags, "--checkpoint", str(checkpoint), t]

        cfl = ["--cfletcher", lib] if lib else []
        plan: dict[str, list[list[str]]] = {
            "raw": [zsend, ["zfs", "receive", t]],
            "sf-256M (CLI)": [zsend, [*sf, "receive", "-q", "-s", "--checkpoint", "256M", t]],
            "sf-256M unpatched": [zsend, recv()],
            "sf-256M +pipes": [zsend, recv("--pipe", big)],
        }
        if lib:
            plan["sf-256M +cfl"] = [zsend, recv(*cfl)]
            for c in (64, 256, 1024):
                plan[f"sf-{c}M +pipes+cfl"] = [zsend, recv("--pipe", big, *cfl, checkpoint=c << 20)]
        plan["sf2 (CLI)"] = [[*sf, "send", "-q", snap], [*sf, "receive", "-q", "-s", t]]
        plan["sf2 +pipes+cfl" if lib else "sf2 +pipes"] = [
            [*me, "child-send", "--pipe", big, *cfl, snap],
            recv("--pipe", big, *cfl),
        ]
        results: dict[str, list[dict[str, float]]] = {k: [] for k in plan}
        destroy(t)
        run_pipeline(plan["raw"])  # warm-up
        for rep in range(args.repeat):
            for label, stages in plan.items():
                destroy(t)
                time.sleep(1.0)
                r = run_pipeline(stages)
                if not r.ok or zfs_get(f"{t}@s", "guid") != guid:
                    raise RuntimeError(f"{label} failed: {[s.stderr for s in r.stages]}")
                results[label].append(
                    {
                        "wall_s": r.wall,
                        "recv_cpu_s": r.stages[-1].user + r.stages[-1].sys,
                        "send_cpu_s": r.stages[0].user + r.stages[0].sys,
                        "daemon_cpu_s": r.daemon_cpu,
                    }
                )
                log(f"round {rep + 1}/{args.repeat} {label:<22} {r.wall:6.2f} s")
                destroy(t)
    raw = median([r["wall_s"] for r in results["raw"]])
    print(f"\nwhat-if, {args.size_mib} MiB dataset, stream {stream} bytes, median of {args.repeat}")
    print(f"{'variant':<22} {'median s':>9} {'MB/s':>7} {'raw/x':>6} {'recv CPU s/GB':>14} {'send CPU s/GB':>14}")
    rows = []
    for label, runs in results.items():
        wall = median([r["wall_s"] for r in runs])
        row = {
            "label": label,
            "median_wall_s": wall,
            "mb_per_s": stream / 1e6 / wall,
            "ratio_raw_over": raw / wall,
            "recv_cpu_s_per_gb": median([r["recv_cpu_s"] for r in runs]) / (stream / 1e9),
            "send_cpu_s_per_gb": median([r["send_cpu_s"] for r in runs]) / (stream / 1e9),
            "runs": runs,
        }
        rows.append(row)
        print(
            f"{label:<22} {wall:>9.2f} {row['mb_per_s']:>7.1f} {row['ratio_raw_over']:>6.2f} "
            f"{row['recv_cpu_s_per_gb']:>14.2f} {row['send_cpu_s_per_gb']:>14.2f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "machine": {"cpus": os.cpu_count()},
                    "stream_bytes": stream,
                    "repeat": args.repeat,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
