"""Real btrfs for the tests and chaos runs: loop-mounted filesystems, snapshotted source trees, a tree description to compare by."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapferry.btrfs.engine import ioctl as ioc

SETUP_HINT = "the btrfs tests need root, btrfs-progs and loop devices (scripts/setup.sh installs btrfs-progs)"
NS = 1_000_000_000


def require_btrfs() -> None:
    """Fail, not skip, the calling fixture where btrfs cannot be made: a host meant to run these tests must not pass them unrun."""
    if os.geteuid() != 0 or shutil.which("btrfs") is None or shutil.which("mkfs.btrfs") is None:
        pytest.fail(f"not root or btrfs-progs missing; {SETUP_HINT}")


def run(*args: str | Path, input: bytes | None = None) -> str:
    try:
        done = subprocess.run([str(a) for a in args], input=input, capture_output=True, timeout=60)
    except FileNotFoundError as e:
        pytest.fail(f"{e}; {SETUP_HINT}")
    if done.returncode:
        pytest.fail(f"`{' '.join(map(str, args))}` failed: {done.stderr.decode().strip()}; {SETUP_HINT}")
    return done.stdout.decode()


@dataclass
class Fs:
    mnt: Path


def mkfs(stack: ExitStack, base: Path, name: str, options: str = "noatime", size: int = 384 << 20) -> Fs:
    """A fresh btrfs on a loop device (a sparse image), unmounted and detached when the stack closes."""
    img, mnt = base / f"{name}.img", base / name
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size)
    run("mkfs.btrfs", "-q", "-f", img)
    stack.callback(img.unlink)
    loop = run("losetup", "--find", "--show", img).strip()
    stack.callback(subprocess.run, ["losetup", "-d", loop], check=False)
    run("mount", "-o", options, loop, mnt)
    stack.callback(unmount, mnt)
    return Fs(mnt)


def unmount(mnt: Path) -> None:
    # A lazy unmount still lets the loop device go once the last user is gone (losetup -d then autoclears).
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def segments(fd: int, size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def describe(root: Path) -> dict[str, object]:
    """Everything a receive must reproduce, by path; hardlinks as groups of paths."""
    tree: dict[str, object] = {}
    inodes: dict[int, list[str]] = {}
    paths = [root, *sorted(root.rglob("*"))]
    for path in paths:
        rel = str(path.relative_to(root))
        st = os.lstat(path)
        xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(os.listxattr(path, follow_symlinks=False))}
        entry: dict[str, object] = {
            "type": stat.S_IFMT(st.st_mode),
            "mode": oct(stat.S_IMODE(st.st_mode)),
            "owner": (st.st_uid, st.st_gid),
            "mtime": st.st_mtime_ns,
            "atime": st.st_atime_ns,
            "xattrs": xattrs,
        }
        if stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY)
            try:
                entry["size"] = st.st_size
                entry["sha"] = hashlib.sha256(os.read(fd, st.st_size + 1)).hexdigest()
                entry["data"] = segments(fd, st.st_size)
            finally:
                os.close(fd)
            inodes.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if stat.S_ISDIR(st.st_mode):
            entry.pop("atime")  # listing a directory of a writable source touches it
        tree[rel] = entry
    tree["<hardlinks>"] = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return tree


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = describe(a), describe(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key] == tb[key], f"{key} differs between {a} and {b}"


def encoded_extents(path: Path) -> int:
    return sum("encoded" in line for line in run("filefrag", "-v", path).splitlines())


def subvol(path: Path) -> ioc.SubvolInfo:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return ioc.subvol_info(fd)
    finally:
        os.close(fd)


def fs_flags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return ioc.get_fs_flags(fd)
    finally:
        os.close(fd)


def fill_tree(src: Path) -> None:
    """Enough data for several checkpoints, and every kind of namespace change an incremental can carry."""
    (src / "big").write_bytes(os.urandom(1 << 20))
    for name in "abcd":
        (src / name).write_bytes(name.encode() * 5000)
    (src / "dir").mkdir()
    for i in range(40):
        (src / "dir" / f"f{i}").write_bytes(os.urandom(20_000))
    (src / "hl").hardlink_to(src / "dir" / "f1")
    (src / "sym").symlink_to("a")
    os.setxattr(src / "a", "user.x", b"1")
    os.chown(src / "c", 12, 34)


def change_tree(src: Path) -> None:
    with open(src / "big", "r+b") as f:
        f.write(os.urandom(1 << 20))
    # The swap straddled by a cut in test_btrfs_resume's test_non_idempotent_commands_apply_once.
    (src / "a").rename(src / "tmp")
    (src / "b").rename(src / "a")
    (src / "tmp").rename(src / "b")
    (src / "c2").hardlink_to(src / "c")
    (src / "d").unlink()
    (src / "hl").unlink()
    (src / "dir" / "f3").rename(src / "moved")
    for i in range(10, 25):
        (src / "dir" / f"f{i}").unlink()
    (src / "new").write_bytes(os.urandom(300_000))


def snapshot(live: Path, snap: Path) -> Path:
    """A read-only snapshot of subvolume `live` at `snap`."""
    run("btrfs", "-q", "subvolume", "snapshot", "-r", live, snap)
    return snap


def snapshot_pair(
    live: Path, first: Path, second: Path, fill: Callable[[Path], None] = fill_tree, change: Callable[[Path], None] = change_tree
) -> None:
    """The source of a full and an incremental stream: subvolume `live` made and filled, snapshotted as `first`, changed, as `second`."""
    run("btrfs", "-q", "subvolume", "create", live)
    fill(live)
    snapshot(live, first)
    change(live)
    snapshot(live, second)


def stock_sends(base: Path, first: Path, second: Path, extra: Mapping[str, Sequence[str | Path]] | None = None) -> dict[str, Path]:
    """`btrfs send` into files in `base`, by name: full_v1, incr_v1, full_v2, incr_v2 (`first`, then first -> second,
    in protocols 1 and 2), then `extra` (name -> the send's arguments)."""
    sends: dict[str, Sequence[str | Path]] = {
        "full_v1": [first],
        "incr_v1": ["-p", first, second],
        "full_v2": ["--proto", "2", first],
        "incr_v2": ["--proto", "2", "-p", first, second],
        **(extra or {}),
    }
    for name, args in sends.items():
        run("btrfs", "-q", "send", "-f", base / name, *args)
    return {name: base / name for name in sends}
