"""Real zfs-fuse test bed: file-backed pools with unique names, data writers, manifests, the CLI."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_counter = itertools.count()


def sh(*argv: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(argv, input=input, capture_output=True, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc


def destroy(*args: str) -> None:
    """`zfs destroy ARGS`, tried again for a moment while zfs-fuse calls it busy (a mount or a send that just ended)."""
    while_busy("destroy", *args)


def while_busy(*args: str, attempts: int = 10) -> None:
    """`zfs ARGS`, tried again while zfs-fuse calls the dataset busy."""
    for attempt in range(attempts):
        proc = sh("zfs", *args, check=False)
        if proc.returncode == 0:
            return
        if b"busy" not in proc.stderr or attempt == attempts - 1:
            raise AssertionError(f"zfs {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
        time.sleep(0.2 * (attempt + 1))


def zfs_answers() -> bool:
    return subprocess.run(["zpool", "list"], capture_output=True, check=False).returncode == 0


def daemon_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "zfs-fuse"], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def clear_stale_mounts() -> None:
    """After the daemon dies its FUSE mounts stay behind; a real restart would drop them."""
    with open("/proc/mounts") as mounts:
        stale = [line.split()[1] for line in mounts if " fuse.zfs " in line]
    for mountpoint in sorted(stale, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)


def start_daemon() -> None:
    if zfs_answers():
        return
    clear_stale_mounts()
    subprocess.run(["zfs-fuse"], check=True)
    for _ in range(100):
        if zfs_answers():
            return
        time.sleep(0.1)
    raise RuntimeError("zfs-fuse did not start")


def reboot_daemon(pool_dirs: list[Path], pools: list[str]) -> None:
    """kill -9 the zfs-fuse daemon and bring it back as a rebooted host would."""
    for pid in daemon_pids():
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not daemon_pids():
            break
        time.sleep(0.05)
    start_daemon()
    for directory, pool in zip(pool_dirs, pools, strict=True):
        if sh("zpool", "list", pool, check=False).returncode != 0:
            sh("zpool", "import", "-d", str(directory), pool)
    sh("zfs", "mount", "-a", check=False)


@dataclass
class Pool:
    name: str
    directory: Path

    def destroy(self) -> None:
        for attempt in range(10):
            if sh("zpool", "destroy", "-f", self.name, check=False).returncode == 0:
                break
            if sh("zpool", "list", self.name, check=False).returncode != 0:
                break
            time.sleep(0.3 * (attempt + 1))
        shutil.rmtree(self.directory, ignore_errors=True)


def create_pool(base: Path, role: str, size: str = "1G") -> Pool:
    name = f"sft{os.getpid()}{role}{next(_counter)}"
    directory = base / name
    directory.mkdir(parents=True)
    image = directory / "vdev.img"
    sh("truncate", "-s", size, str(image))
    sh("zpool", "create", "-m", f"/{name}", name, str(image))
    return Pool(name, directory)


def mountpoint(dataset: str) -> Path:
    return Path(sh("zfs", "get", "-H", "-o", "value", "mountpoint", dataset).stdout.decode().strip())


def write_tree(root: Path, seed: int, megabytes: int = 8, small_files: int = 40) -> None:
    """Random data (incompressible), a text file, and small files: the shapes of real datasets."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(max(1, megabytes // 4)):
        (root / f"blob{i}.bin").write_bytes(rng.randbytes(4 << 20))
    (root / "numbers.txt").write_text("\n".join(str(rng.random()) for _ in range(20000)))
    sub = root / "small"
    sub.mkdir(exist_ok=True)
    for i in range(small_files):
        (sub / f"f{i}.txt").write_bytes(rng.randbytes(rng.randrange(1, 3000)))


def change_tree(root: Path, seed: int) -> None:
    """Deletes, overwrites in place, appends and adds: an incremental with every kind of record."""
    rng = random.Random(seed)
    (root / "small" / f"f{seed % 40}.txt").unlink()
    with open(root / "blob0.bin", "r+b") as blob:
        blob.seek(1 << 20)
        blob.write(rng.randbytes(300_000))
    with open(root / "numbers.txt", "a") as text:
        text.write("changed\n")
    (root / f"new{seed}.bin").write_bytes(rng.randbytes(3 << 20))


def manifest(root: Path) -> dict[str, str]:
    result = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            result[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def snapshot(dataset_at_snap: str) -> tuple[int, dict[str, str]]:
    """Take a snapshot; return its guid and the manifest of what it holds."""
    dataset = dataset_at_snap.partition("@")[0]
    sh("zfs", "snapshot", dataset_at_snap)
    return guid(dataset_at_snap), manifest(mountpoint(dataset))


def guid(name: str) -> int:
    return int(sh("zfs", "get", "-H", "-p", "-o", "value", "guid", name).stdout.decode().strip())


def snapshot_names(dataset: str) -> list[str]:
    out = sh("zfs", "get", "-H", "-r", "-d", "1", "-o", "name", "type", dataset, check=False).stdout.decode()
    return [line.partition("@")[2] for line in out.split() if "@" in line]


def exists(dataset: str) -> bool:
    return sh("zfs", "get", "-H", "type", dataset, check=False).returncode == 0


SNAPFERRY = [sys.executable, "-m", "snapferry"]


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str


def snapferry(*args: str, input: bytes | None = None) -> Result:
    proc = subprocess.run([*SNAPFERRY, *args], input=input, capture_output=True, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr.decode())


def send_bytes(*args: str) -> bytes:
    result = snapferry("send", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def receive(dataset: str, data: bytes, *extra: str, checkpoint: str = "1M") -> Result:
    return snapferry("receive", "-s", "--checkpoint", checkpoint, *extra, dataset, input=data)


def token(dataset: str) -> str:
    result = snapferry("token", dataset)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def resume(dataset: str, checkpoint: str = "1M") -> Result:
    """snapferry send -t $(snapferry token DST) | snapferry receive -s DST"""
    continuation = snapferry("send", "-t", token(dataset))
    assert continuation.returncode == 0, continuation.stderr
    return receive(dataset, continuation.stdout, checkpoint=checkpoint)


def piece_names(dataset: str) -> list[str]:
    return [n for n in snapshot_names(dataset) if n.startswith("snapferry-")]


@dataclass
class Bed:
    src: Pool
    dst: Pool

    def dataset(self, name: str) -> str:
        return f"{self.src.name}/{name}"

    def target(self, name: str) -> str:
        return f"{self.dst.name}/{name}"


def iter_offsets(total: int, picks: list[int]) -> Iterator[int]:
    yield from (p if p >= 0 else total + p for p in picks)


def two_snapshot_source(bed: Bed, seed: int, megabytes: int) -> dict[str, object]:
    """A dataset with @s1 (full) and @s2 (changes): guids, manifests and both snapferry streams."""
    fs = bed.dataset("data")
    sh("zfs", "create", fs)
    root = mountpoint(fs)
    write_tree(root, seed=seed, megabytes=megabytes)
    guid1, files1 = snapshot(f"{fs}@s1")
    change_tree(root, seed=seed + 1)
    guid2, files2 = snapshot(f"{fs}@s2")
    return {
        "fs": fs,
        "guid1": guid1,
        "files1": files1,
        "guid2": guid2,
        "files2": files2,
        "full": send_bytes(f"{fs}@s1"),
        "incr": send_bytes("-i", "@s1", f"{fs}@s2"),
    }
