#!/usr/bin/env python3
"""`snapferry sync -r` against `syncoid -r` (Debian's sanoid) on the same tree, pools and sshd, in one run.

A tree of 40 small datasets and 2 large ones is replicated over ssh on loopback (a real sshd, reached
through a byte-counting TCP proxy), from scratch, by each tool:

  uninterrupted   one run of the tool
  3 kills         the tool is SIGKILLed (with what it started) at 1/4, 1/2 and 3/4 of its own uninterrupted
                  time into each run, then run once more to the end; the time is the sum of the runs

Both without compression. syncoid on zfs-fuse has no resume token, so after a kill it sends the
interrupted dataset again from its start; snapferry goes on from the last checkpoint. syncoid runs
from a copy with one line fixed (without it, it cannot list the snapshots of a remote dataset that
exists on zfs-fuse, so no run after a kill works: see _zfsbench's patched_syncoid), and the ssh
ControlMaster a killed syncoid leaves is closed between runs.

Prints the wall time of each, the ratio syncoid_time / snapferry_time, and the bytes that crossed the
link.

    sudo python3 bench/tree_bench.py --large-mib 128 --json bench/results/tree.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _zfsbench import (
    MiB,
    ScratchPools,
    close_syncoid_masters,
    fill_random,
    install_sigterm_cleanup,
    log,
    patched_syncoid,
    rename,
    run,
    syncoid_argv,
    syncoid_sockets,
)

from snapferry_testkit.faultproxy import FaultProxy
from snapferry_testkit.sshd_server import SshServer, remote_snapferry, start_sshd

SMALL = 40


def make_tree(src: str, small_mib: int, large_mib: int) -> None:
    run("zfs", "create", f"{src}/tree")
    for n in range(SMALL):
        run("zfs", "create", f"{src}/tree/small{n:02d}")
        fill_random(f"/{src}/tree/small{n:02d}", small_mib)
    for n in range(2):
        run("zfs", "create", f"{src}/tree/big{n}")
        fill_random(f"/{src}/tree/big{n}", large_mib)
    run("zfs", "snapshot", "-r", f"{src}/tree@s1")


def tool_argv(tool: str, server: SshServer, port: int, src: str, dst: str, syncoid: str = "syncoid") -> list[str]:
    if tool == "snapferry":
        ssh = server.ssh_command(port, keepalive=True)
        return [sys.executable, "-m", "snapferry", "sync", "-q", "-r", "--compress", "none", "--checkpoint", "8M"] + [
            "--ssh", ssh, "--remote-snapferry", remote_snapferry(), f"{src}/tree", f"root@127.0.0.1:{dst}/{tool}",
        ]  # fmt: skip
    keepalive = ("--sshoption=ServerAliveInterval=1", "--sshoption=ServerAliveCountMax=3")
    return syncoid_argv(syncoid, server, port, f"{src}/tree", f"root@127.0.0.1:{dst}/{tool}", "none", "-r", *keepalive)


def timed(argv: list[str], kill_after: float | None = None) -> tuple[float, int]:
    """(wall seconds, exit status) of one run; killed with its process group after kill_after seconds.

    An ssh ControlMaster that syncoid leaves behind (a killed run does not close it) is closed after
    the run, outside the time."""
    sockets = syncoid_sockets()
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wall = time.monotonic() - started
    close_syncoid_masters(sockets)
    assert proc.stderr is not None
    said = proc.stderr.read().decode(errors="replace").strip()
    if proc.returncode not in (0, -9) and kill_after is None:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {said[-2000:]}")
    return wall, proc.returncode


def trees_match(src: str, dst: str) -> bool:
    def guids(root: str) -> dict[str, str]:
        out = run("zfs", "get", "-H", "-p", "-r", "-o", "name,value", "guid", root).stdout
        return {n[len(root) :]: g for n, g in (line.split("\t") for line in out.splitlines()) if "@s1" in n}

    return guids(src) == guids(dst)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mib", type=int, default=1)
    parser.add_argument("--large-mib", type=int, default=128)
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    if shutil.which("syncoid") is None:
        print("tree_bench: syncoid is not installed (apt-get install sanoid)", file=sys.stderr)
        return 2
    install_sigterm_cleanup()
    results: dict[str, dict[str, float]] = {}
    size = (SMALL * args.small_mib + 2 * args.large_mib) * MiB
    with ScratchPools(args.workdir, "tr") as pools, tempfile.TemporaryDirectory(prefix="sfbench-tree-") as tmp:
        server = start_sshd(Path(tmp))
        syncoid = patched_syncoid(Path(tmp))
        try:
            src = pools.create("s", size * 2 + (2 << 30))
            dst = pools.create("d", size * 4 + (2 << 30))
            make_tree(src, args.small_mib, args.large_mib)
            run("zfs", "create", f"{dst}/p")
            for tool in ("snapferry", "syncoid"):
                proxy = FaultProxy(server.port)
                wall, _ = timed(tool_argv(tool, server, proxy.port, src, f"{dst}/p", syncoid))
                assert trees_match(f"{src}/tree", f"{dst}/p/{tool}"), f"{tool}: the replica differs"
                results[f"{tool}/uninterrupted"] = {"wall_s": wall, "wire_bytes": proxy.up_bytes}
                log(f"{tool:9s} uninterrupted {wall:7.2f} s {proxy.up_bytes / MiB:9.1f} MiB on the wire")
                proxy.close()
                # A fresh parent for the second series: zfs-fuse keeps a just-received tree busy for a while.
                run("zfs", "create", f"{dst}/k")
                proxy = FaultProxy(server.port)
                total, kills = 0.0, 0
                for fraction in (0.25, 0.5, 0.75):
                    spent, rc = timed(tool_argv(tool, server, proxy.port, src, f"{dst}/k", syncoid), kill_after=fraction * wall)
                    total += spent
                    kills += rc == -9
                spent, _ = timed(tool_argv(tool, server, proxy.port, src, f"{dst}/k", syncoid))
                total += spent
                assert trees_match(f"{src}/tree", f"{dst}/k/{tool}"), f"{tool}: the replica differs after kills"
                results[f"{tool}/3 kills"] = {"wall_s": total, "wire_bytes": proxy.up_bytes, "kills": kills}
                log(f"{tool:9s} {kills} kills      {total:7.2f} s {proxy.up_bytes / MiB:9.1f} MiB on the wire")
                proxy.close()
                rename(f"{dst}/k", f"{dst}/k-{tool}")
        finally:
            server.stop()
    print(f"\ntree of {SMALL} x {args.small_mib} MiB + 2 x {args.large_mib} MiB datasets ({size / MiB:.0f} MiB), over ssh on loopback")
    print(f"{'run':16s} {'snapferry s':>12s} {'syncoid s':>10s} {'syncoid/snapferry':>18s} {'wire MiB sf':>12s} {'wire MiB syncoid':>17s}")
    for kind in ("uninterrupted", "3 kills"):
        sf, so = results[f"snapferry/{kind}"], results[f"syncoid/{kind}"]
        print(
            f"{kind:16s} {sf['wall_s']:12.2f} {so['wall_s']:10.2f} {so['wall_s'] / sf['wall_s']:18.2f} "
            f"{sf['wire_bytes'] / MiB:12.1f} {so['wire_bytes'] / MiB:17.1f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"small_mib": args.small_mib, "large_mib": args.large_mib, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
