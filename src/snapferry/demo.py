"""`snapferry demo`: a transfer between two throwaway file-backed pools (or loop-mounted btrfs), cut twice, resumed, verified."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from snapferry.btrfs.engine.command import subvolume_at
from snapferry.errors import SnapferryError, ZfsCommandError
from snapferry.zfs.engine.command import Zfs

SNAPFERRY = [sys.executable, "-m", "snapferry"]
CHECKPOINT = "4M"


def _ensure_zfs(zfs: Zfs, console: Console) -> None:
    """A first-time user may have zfs-fuse installed but not running: start it."""
    if subprocess.run(["zpool", "list"], capture_output=True, check=False).returncode == 0:
        return
    if shutil.which("zfs-fuse") is None:
        raise ZfsCommandError("no ZFS here: install it first (see the README's setup command)")
    console.print("starting the zfs-fuse daemon")
    subprocess.run(["zfs-fuse"], check=True)
    for _ in range(100):
        if subprocess.run(["zpool", "list"], capture_output=True, check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise ZfsCommandError("zfs-fuse did not start")


def _write_data(root: Path) -> None:
    rng = random.Random(2026)
    for i in range(6):
        (root / f"video{i}.bin").write_bytes(rng.randbytes(6 << 20))
    (root / "notes.txt").write_text("\n".join(f"line {i}: {rng.random()}" for i in range(50_000)))
    (root / "docs").mkdir()
    for i in range(200):
        (root / "docs" / f"doc{i}.txt").write_bytes(rng.randbytes(rng.randrange(10, 20_000)))


def _manifest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _pipe(console: Console, sender: list[str], receiver: list[str], cut_at: int | None) -> tuple[int, int, str]:
    """sender | receiver, the link dropping after `cut_at` bytes; returns bytes moved, rc, stderr."""
    shown = " ".join("$TOKEN" if a.startswith(("sf1-", "sf1b-")) else a for a in sender[3:]) + " | snapferry " + " ".join(receiver[3:])
    console.print(f"[bold]$ snapferry {shown}[/]" + (f"   [dim](link drops after {cut_at:,} bytes)[/]" if cut_at else ""))
    send = subprocess.Popen([*sender, "-q"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    recv = subprocess.Popen([*receiver, "-q"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert send.stdout is not None and recv.stdin is not None
    moved = 0
    while cut_at is None or moved < cut_at:
        chunk = os.read(send.stdout.fileno(), 1 << 20)
        if not chunk:
            break
        if cut_at is not None:
            chunk = chunk[: cut_at - moved]
        recv.stdin.write(chunk)
        moved += len(chunk)
    recv.stdin.close()
    send.kill()
    send.wait()
    assert recv.stderr is not None
    message = recv.stderr.read().decode().strip()
    recv.wait()
    console.print(f"  exit {recv.returncode}: {message.splitlines()[-1] if message else 'ok'}", highlight=False)
    return moved, recv.returncode, message


def _cut_twice(console: Console, snapshot: str, receive: list[str], token_of: str, data_size: int) -> int:
    """Send, cut at 40 %; resume, cut again; resume to the end. The bytes sent in all."""
    sent, rc, _ = _pipe(console, [*SNAPFERRY, "send", snapshot], receive, cut_at=data_size * 2 // 5)
    total_sent = sent
    for cut in (data_size // 4, None):
        token = subprocess.run([*SNAPFERRY, "token", token_of], capture_output=True, text=True, check=True).stdout.strip()
        console.print(f"[bold]$ TOKEN=$(snapferry token {token_of})[/]   [dim]# {token[:40]}...[/]")
        # A btrfs token names no path: the snapshot is given again.
        path = [snapshot] if snapshot.startswith("/") else []
        sent, rc, message = _pipe(console, [*SNAPFERRY, "send", "-t", token, *path], receive, cut)
        total_sent += sent
    if rc != 0:
        raise SnapferryError(f"the demo transfer did not complete: {message}")
    return total_sent


def run_demo(zfs_command: Sequence[str] | None = None, quiet: bool = False) -> int:
    console = Console(stderr=False, quiet=quiet, soft_wrap=True)
    zfs = Zfs(zfs_command)
    _ensure_zfs(zfs, console)
    workdir = Path(tempfile.mkdtemp(prefix="snapferry-demo-"))
    tag = f"sfdemo{os.getpid()}"
    pools = [f"{tag}src", f"{tag}dst"]
    created: list[str] = []
    try:
        for pool in pools:
            image = workdir / f"{pool}.img"
            subprocess.run(["truncate", "-s", "1G", str(image)], check=True)
            subprocess.run(["zpool", "create", "-m", f"/{pool}", pool, str(image)], check=True, capture_output=True)
            created.append(pool)
        src, dst = f"{pools[0]}/data", f"{pools[1]}/data"
        console.print(f"[bold]Two file-backed pools in {workdir}: {pools[0]} (source) and {pools[1]} (destination)[/]")
        zfs.run("cannot create the demo dataset", "create", src)
        root = Path(f"/{src}")
        _write_data(root)
        expected = _manifest(root)
        zfs.run("cannot snapshot", "snapshot", f"{src}@demo")
        data_size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        console.print(f"Dataset {src}@demo: {len(expected)} files, {data_size / 2**20:.0f} MiB\n")

        receive = [*SNAPFERRY, "receive", "-s", "--checkpoint", CHECKPOINT, dst]
        total_sent = _cut_twice(console, f"{src}@demo", receive, dst, data_size)

        actual = _manifest(Path(f"/{dst}"))
        same_guid = zfs.guid(f"{src}@demo") == zfs.guid(f"{dst}@demo")
        console.print()
        console.print(f"files identical: {actual == expected} ({len(actual)} files compared by sha256)")
        console.print(f"snapshot guid identical: {same_guid}")
        console.print(f"bytes sent in 3 attempts: {total_sent:,} for {data_size:,} bytes of data")
        return 0 if actual == expected and same_guid else 1
    finally:
        for pool in reversed(created):
            for _ in range(10):
                if subprocess.run(["zpool", "destroy", "-f", pool], capture_output=True, check=False).returncode == 0:
                    break
                time.sleep(0.5)
        shutil.rmtree(workdir, ignore_errors=True)


def run_btrfs_demo(quiet: bool = False) -> int:
    """The same on two loop-mounted btrfs file systems in image files: snapferry's own receiver and its checkpoints."""
    console = Console(stderr=False, quiet=quiet, soft_wrap=True)
    if shutil.which("mkfs.btrfs") is None:
        raise SnapferryError("no btrfs-progs here: install them first (see the README's setup command)")
    workdir = Path(tempfile.mkdtemp(prefix="snapferry-demo-"))
    loops: list[str] = []
    mounted: list[Path] = []
    try:
        for name in ("src", "dst"):
            image, mnt = workdir / f"{name}.img", workdir / name
            subprocess.run(["truncate", "-s", "512M", str(image)], check=True)
            subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
            attached = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True)
            loops.append(attached.stdout.strip())
            mnt.mkdir()
            subprocess.run(["mount", loops[-1], str(mnt)], check=True)
            mounted.append(mnt)
        src, dst = mounted
        console.print(f"[bold]Two loop-mounted btrfs in {workdir}: {src} (source) and {dst} (destination)[/]")
        subprocess.run(["btrfs", "-q", "subvolume", "create", str(src / "data")], check=True)
        _write_data(src / "data")
        expected = _manifest(src / "data")
        (src / "snaps").mkdir()
        snapshot = src / "snaps" / "demo"
        subprocess.run(["btrfs", "-q", "subvolume", "snapshot", "-r", str(src / "data"), str(snapshot)], check=True)
        data_size = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())
        console.print(f"Read-only snapshot {snapshot}: {len(expected)} files, {data_size / 2**20:.0f} MiB\n")

        receive = [*SNAPFERRY, "receive", "-s", "--checkpoint", CHECKPOINT, str(dst)]
        total_sent = _cut_twice(console, str(snapshot), receive, str(dst / "demo"), data_size)

        actual = _manifest(dst / "demo")
        source, copy = subvolume_at(snapshot), subvolume_at(dst / "demo")
        uuid = source.uuid
        received = copy.received_uuid == source.uuid and copy.readonly
        console.print()
        console.print(f"files identical: {actual == expected} ({len(actual)} files compared by sha256)")
        console.print(f"received as the source snapshot (Received UUID {uuid}), read-only: {received}")
        console.print(f"bytes sent in 3 attempts: {total_sent:,} for {data_size:,} bytes of data")
        return 0 if actual == expected and received else 1
    finally:
        for mnt in reversed(mounted):
            if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", str(mnt)], check=False)
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
