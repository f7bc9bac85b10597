"""snapferry's btrfs applier against stock `btrfs receive` on real btrfs: the same trees, either way round."""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapferry.btrfs.engine.apply import BtrfsApplier
from snapferry.errors import BtrfsApplyError, StreamFormatError
from snapferry_testkit.btrfs_testbed import (
    NS,
    assert_same_tree,
    encoded_extents,
    fs_flags,
    mkfs,
    require_btrfs,
    run,
    snapshot_pair,
    stock_sends,
    subvol,
)

# A file capability (vfs_cap_data revision 2, effective, CAP_NET_RAW permitted): chown clears it, receive restores it.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)

# --- the source trees ------------------------------------------------------------------------------


def _times(path: Path, sec: int, nsec: int) -> None:
    os.utime(path, ns=(sec * NS + nsec + 7, sec * NS + nsec), follow_symlinks=False)


def _populate(src: Path) -> None:
    """Every kind of inode and attribute, with shared extents already inside the first snapshot."""
    (src / "data").write_bytes(os.urandom(300_000) + b"tail")
    with open(src / "sparse", "wb") as f:
        f.truncate(20 << 20)
        f.seek(5_000_000)
        f.write(b"hello" * 1000)
        f.seek(12 << 20)
        f.write(os.urandom(70_000))
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "sub" / "f").write_text("hi\n")
    (src / "hardlink").hardlink_to(src / "data")
    (src / "dir" / "hardlink2").hardlink_to(src / "data")
    (src / "link").symlink_to("data")
    (src / "dangling").symlink_to("/nowhere/at/all")
    (src / "empty").touch()
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", stat.S_IFCHR | 0o640, os.makedev(1, 3))
    os.mknod(src / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))
    run("cp", "--reflink=always", src / "data", src / "data_reflink")
    (src / "capped").write_bytes(b"#!/bin/sh\n")
    os.setxattr(src / "data", "user.k", b"v1")
    os.setxattr(src / "dir", "user.d", b"x" * 300)
    os.chown(src / "capped", 0, 0)
    os.setxattr(src / "capped", "security.capability", CAPABILITY)
    os.chown(src / "dir" / "sub" / "f", 1234, 5678)
    os.chmod(src / "dir" / "sub" / "f", 0o4750)
    os.chown(src / "dir" / "sub", 42, 43)
    os.chmod(src / "dir" / "sub", 0o2775)
    os.chmod(src / "dir", 0o1777)
    os.lchown(src / "link", 7, 8)
    run("chattr", "+d", src / "empty")
    for i, path in enumerate(sorted(src.rglob("*"), key=lambda p: -len(p.parts))):
        _times(path, 1_600_000_000 + i * 1000, 123_456_789 + i)
    _times(src, 1_650_000_000, 1)


def _change(src: Path) -> None:
    """What an incremental carries: clones, renames, deletes, overwrites, swaps, holes, metadata changes."""
    run("cp", "--reflink=always", src / "data", src / "data_clone2")
    with open(src / "data", "r+b") as f:
        f.seek(100_000)
        f.write(b"overwritten" * 1000)
        f.seek(0, 2)
        f.write(b"appended" * 700)
    (src / "dir" / "sub" / "f").rename(src / "dir" / "moved")
    (src / "hardlink").unlink()
    (src / "dir").rename(src / "dir2")
    os.removexattr(src / "data", "user.k")
    os.setxattr(src / "data", "user.new", b"n")
    (src / "link").rename(src / "tmp")
    (src / "dangling").rename(src / "link")
    (src / "tmp").rename(src / "dangling")
    (src / "empty").unlink()
    (src / "empty").mkdir()
    os.truncate(src / "sparse", 13 << 20)
    with open(src / "sparse", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"new data in a hole")
    (src / "dir2" / "sub").rmdir()
    (src / "late_link").hardlink_to(src / "data_reflink")
    os.chown(src / "blk", 99, 98)
    os.chmod(src / "null", 0o604)
    _times(src / "data", 1_700_000_000, 999_999_999)
    _times(src / "dir2" / "moved", 1_700_000_001, 5)


def _compressible(src: Path, extra: bool) -> None:
    (src / "text").write_text("snapferry compressible line\n" * (60000 if extra else 40000))
    (src / "odd").write_bytes(b"z" * 5000 + os.urandom(3000) + b"q" * 70_000)
    if extra:
        with open(src / "odd", "r+b") as f:
            f.seek(4096)
            f.write(b"a" * 9000)


@dataclass
class Sources:
    base: Path
    streams: dict[str, Path]
    snaps: dict[str, Path]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sources]:
    require_btrfs()
    base = tmp_path_factory.mktemp("apply")
    with ExitStack() as stack:
        mnt = mkfs(stack, base, "source", "relatime").mnt
        snapshot_pair(mnt / "src", mnt / "snap1", mnt / "snap2", _populate, _change)
        # Only extents written while compression is on are compressed.
        run("mount", "-o", "remount,compress=zstd", mnt)
        snapshot_pair(mnt / "csrc", mnt / "csnap1", mnt / "csnap2", lambda p: _compressible(p, False), lambda p: _compressible(p, True))
        compressed: dict[str, list[str | Path]] = {
            "full_c": ["--compressed-data", mnt / "csnap1"],
            "incr_c": ["--compressed-data", "-p", mnt / "csnap1", mnt / "csnap2"],
        }
        streams = stock_sends(base, mnt / "snap1", mnt / "snap2", compressed)
        snaps = {n: mnt / n for n in ("snap1", "snap2", "csnap1", "csnap2")}
        yield Sources(base, streams, snaps)


def _ferry(root: Path, stream: Path, **options: bool) -> Path:
    with BtrfsApplier(root, **options) as applier, open(stream, "rb") as f:
        return applier.apply_stream(f)


GROUPS = {
    "v1": ("full_v1", "incr_v1", "snap1", "snap2"),
    "v2": ("full_v2", "incr_v2", "snap1", "snap2"),
    "compressed": ("full_c", "incr_c", "csnap1", "csnap2"),
}


@pytest.mark.parametrize("group", list(GROUPS))
def test_differential_against_btrfs_receive(sources: Sources, group: str) -> None:
    full, incr, first, second = GROUPS[group]
    with ExitStack() as stack:
        stock = mkfs(stack, sources.base, f"stock_{group}").mnt
        ferry = mkfs(stack, sources.base, f"ferry_{group}").mnt
        (stock / "s").mkdir()
        for name in (full, incr):
            run("btrfs", "receive", "-q", "-f", sources.streams[name], stock / "s")
            got = _ferry(ferry, sources.streams[name])
            assert got == ferry / Path(sources.snaps[first if name == full else second].name)
        for snap in (first, second):
            source, by_stock, by_ferry = sources.snaps[snap], stock / "s" / snap, ferry / snap
            assert_same_tree(by_stock, by_ferry)
            assert_same_tree(source, by_ferry)
            s, f = subvol(by_stock), subvol(by_ferry)
            assert f.received_uuid == s.received_uuid == subvol(source).uuid
            assert f.stransid == s.stransid and f.readonly and s.readonly
        if group != "compressed":
            assert os.getxattr(ferry / first / "capped", "security.capability") == CAPABILITY  # restored after CHOWN
            assert os.stat(ferry / first / "dir" / "sub" / "f").st_mode & 0o7777 == 0o4750
        if group != "compressed":
            # Kernel 6.18 sent no FILEATTR for a chattr +d file, so stock receive (which ignores FILEATTR) agrees here.
            assert not fs_flags(ferry / first / "empty") & 0x40
        if group == "compressed":
            # The same streams again without BTRFS_IOC_ENCODED_WRITE: decompressed and written plainly.
            (ferry / "plain").mkdir()
            for name in (full, incr):
                _ferry(ferry / "plain", sources.streams[name], encoded_write=False)
            for snap in (first, second):
                assert_same_tree(ferry / snap, ferry / "plain" / snap)
            # The target is mounted without compression: only an encoded write keeps the extents compressed.
            assert encoded_extents(ferry / first / "text") == encoded_extents(stock / "s" / first / "text") > 0
            assert encoded_extents(ferry / "plain" / first / "text") == 0
        # Stock receive of the incremental on top of snapferry's full, and the other way round.
        (ferry / "x").mkdir()
        run("btrfs", "receive", "-q", "-f", sources.streams[incr], ferry / "x")
        assert_same_tree(stock / "s" / second, ferry / "x" / second)
        run("btrfs", "subvolume", "delete", "-c", stock / "s" / second)
        got = _ferry(stock, sources.streams[incr])
        assert got == stock / second and subvol(got).readonly
        assert_same_tree(ferry / second, stock / second)


def test_snapshot_parent_must_be_under_the_receive_root(sources: Sources) -> None:
    # The parent is on the same filesystem, beside the receive root: stock receive would take it, snapferry does not.
    root = sources.snaps["snap1"].parent / "elsewhere"
    root.mkdir()
    with BtrfsApplier(root) as applier, open(sources.streams["incr_v1"], "rb") as f, pytest.raises(StreamFormatError) as e:
        applier.apply_stream(f)
    assert str(e.value) == (
        f"SNAPSHOT: no subvolume under {root} was received as {subvol(sources.snaps['snap1']).uuid} (receive the parent snapshot first)"
    )
    assert list(root.iterdir()) == []


def test_no_data_stream_matches_btrfs_receive(sources: Sources) -> None:
    with ExitStack() as stack:
        mnt = mkfs(stack, sources.base, "nodata").mnt
        for snap in ("csnap1", "snap1"):
            stream = sources.base / f"nodata_{snap}"
            run("btrfs", "-q", "send", "--no-data", "-f", stream, sources.snaps[snap])
            (mnt / f"stock_{snap}").mkdir()
            (mnt / f"ferry_{snap}").mkdir()
            stock = subprocess.run(["btrfs", "receive", "-q", "-f", stream, mnt / f"stock_{snap}"], capture_output=True, text=True)
            if snap == "csnap1":
                assert stock.returncode == 0, stock.stderr
                got = _ferry(mnt / f"ferry_{snap}", stream)
                assert_same_tree(mnt / f"stock_{snap}" / snap, got)
                # Neither receiver gives UPDATE_EXTENT's files their size: the stream has no TRUNCATE for them.
                assert os.stat(got / "text").st_size == 0
            else:
                # A reflink of data that was never written (--no-data) fails in both receivers alike.
                assert stock.stderr.strip() == "ERROR: failed to clone extents to data_reflink: Invalid argument"
                with pytest.raises(BtrfsApplyError, match=r"^cannot apply CLONE data_reflink: Invalid argument$"):
                    _ferry(mnt / f"ferry_{snap}", stream)


def _shuffle_tree(src: Path, step: int) -> None:
    """Deep directories moved, swapped, removed and re-made under old names, with writes into them afterwards."""
    if step == 0:
        # Inode order decides the stream's order: f1 (written through A) comes before the swap of A and B,
        # g (written through its new path A/g) after it, so a stale cached A would write into the wrong one.
        (src / "f1").write_bytes(b"f1\n")
        (src / "A").mkdir()
        (src / "B").mkdir()
        (src / "g").write_bytes(b"g\n")
        (src / "f1").rename(src / "A" / "f1")
        (src / "g").rename(src / "B" / "g")
        for top in "abc":
            for sub in ("x", "x/y", "x/y/z"):
                (src / top / sub).mkdir(parents=True, exist_ok=True)
                for i in range(3):
                    (src / top / sub / f"f{i}").write_bytes(f"{top}/{sub}/{i}\n".encode() * 500)
        return
    with open(src / "A" / "f1", "ab") as f:
        f.write(b"f1 appended before the swap\n")
    (src / "A").rename(src / "tmp")
    (src / "B").rename(src / "A")
    (src / "tmp").rename(src / "B")
    with open(src / "A" / "g", "ab") as f:
        f.write(b"g appended after the swap\n")
    (src / "a").rename(src / "tmp")
    (src / "b").rename(src / "a")
    (src / "tmp").rename(src / "b")
    (src / "c" / "x").rename(src / "a" / "x" / "y" / "from_c")
    (src / "c" / "x").mkdir()
    (src / "c" / "x" / "new").write_bytes(b"new file in a re-made directory\n")
    for path in (src / "a" / "x" / "y" / "z" / "f0", src / "b" / "x" / "y" / "f1", src / "a" / "x" / "y" / "from_c" / "y" / "z" / "f2"):
        with open(path, "ab") as f:
            f.write(b"appended after the move\n")
    for name in ("f0", "f1", "f2"):
        (src / "b" / "x" / "y" / "z" / name).unlink()
    (src / "b" / "x" / "y" / "z").rmdir()
    (src / "b" / "x" / "y" / "z").mkdir()
    (src / "b" / "x" / "y" / "z" / "again").write_bytes(b"z was removed and made again\n")


def test_directory_shuffles_match_btrfs_receive(sources: Sources) -> None:
    """Directory renames, swaps and re-creations followed by writes into the moved directories (the applier caches directory fds)."""
    with ExitStack() as stack:
        mnt = mkfs(stack, sources.base, "shuffle").mnt
        run("btrfs", "-q", "subvolume", "create", mnt / "src")
        streams = []
        for step in range(2):
            _shuffle_tree(mnt / "src", step)
            run("btrfs", "-q", "subvolume", "snapshot", "-r", mnt / "src", mnt / f"sh{step}")
            parent = ["-p", str(mnt / f"sh{step - 1}")] if step else []
            run("btrfs", "-q", "send", "-f", sources.base / f"shuffle{step}", *parent, mnt / f"sh{step}")
            streams.append(sources.base / f"shuffle{step}")
        (mnt / "stock").mkdir()
        (mnt / "ferry").mkdir()
        for step, stream in enumerate(streams):
            run("btrfs", "receive", "-q", "-f", stream, mnt / "stock")
            _ferry(mnt / "ferry", stream)
            assert_same_tree(mnt / "stock" / f"sh{step}", mnt / "ferry" / f"sh{step}")
            assert_same_tree(mnt / f"sh{step}", mnt / "ferry" / f"sh{step}")
