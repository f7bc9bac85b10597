"""The btrfs and VFS ioctls a receiver needs: their numbers, argument structs and thin fd-based wrappers."""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from uuid import UUID

# Numbers from include/uapi/linux/btrfs.h and linux/fs.h, as _IO*(type, nr, size) computes them on x86_64/arm64.
BTRFS_IOC_SUBVOL_CREATE = 0x5000940E  # _IOW(0x94, 14, struct btrfs_ioctl_vol_args): 4096 bytes
BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417  # _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2): 4096 bytes
BTRFS_IOC_SUBVOL_GETFLAGS = 0x80089419  # _IOR(0x94, 25, __u64)
BTRFS_IOC_SUBVOL_SETFLAGS = 0x4008941A  # _IOW(0x94, 26, __u64)
BTRFS_IOC_SET_RECEIVED_SUBVOL = 0xC0C89425  # _IOWR(0x94, 37, struct btrfs_ioctl_received_subvol_args): 200 bytes
BTRFS_IOC_GET_SUBVOL_INFO = 0x81F8943C  # _IOR(0x94, 60, struct btrfs_ioctl_get_subvol_info_args): 504 bytes
BTRFS_IOC_ENCODED_WRITE = 0x40809440  # _IOW(0x94, 64, struct btrfs_ioctl_encoded_io_args): 128 bytes
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602

BTRFS_SUBVOL_RDONLY = 1 << 1  # in SUBVOL_GETFLAGS/SETFLAGS
BTRFS_ROOT_SUBVOL_RDONLY = 1 << 0  # the same in the root item's flags, as GET_SUBVOL_INFO reports them
# A subvolume's root directory always has this inode number (BTRFS_FIRST_FREE_OBJECTID).
SUBVOL_ROOT_INO = 256
_VOL_NAME_MAX = 4039  # vol_args_v2.name is 4040 bytes with its NUL; vol_args.name 4088

_VOL_ARGS = struct.Struct("<q4088s")
_VOL_ARGS_V2 = struct.Struct("<qQQ32x4040s")
_RECEIVED = struct.Struct("<16sQQQI4xQI4xQ128x")
_TIMESPEC = "QI4x"
_SUBVOL_INFO = struct.Struct("<Q256sQQQQ16s16s16sQQQQ" + _TIMESPEC * 4 + "64x")
_ENCODED = struct.Struct("<QQqQQQQII64x")
_IOVEC = struct.Struct("<QQ")
_CLONE_RANGE = struct.Struct("<qQQQ")
_U64 = struct.Struct("<Q")
_LONG = struct.Struct("@l")

assert _VOL_ARGS.size == _VOL_ARGS_V2.size == 4096 and _RECEIVED.size == 200
assert _SUBVOL_INFO.size == 504 and _ENCODED.size == 128 and _CLONE_RANGE.size == 32

# BTRFS_INODE_* flags as send's FILEATTR carries them (the inode item's flags), mapped to the FS_*_FL
# bits FS_IOC_SETFLAGS takes. Flags with no FS_*_FL equivalent (PREALLOC, ROOT_ITEM_INIT, ...) have no entry.
BTRFS_INODE_TO_FS_FL = {
    1 << 1: 0x00800000,  # NODATACOW -> FS_NOCOW_FL
    1 << 3: 0x00000400,  # NOCOMPRESS -> FS_NOCOMP_FL
    1 << 5: 0x00000008,  # SYNC -> FS_SYNC_FL
    1 << 6: 0x00000010,  # IMMUTABLE -> FS_IMMUTABLE_FL
    1 << 7: 0x00000020,  # APPEND -> FS_APPEND_FL
    1 << 8: 0x00000040,  # NODUMP -> FS_NODUMP_FL
    1 << 9: 0x00000080,  # NOATIME -> FS_NOATIME_FL
    1 << 10: 0x00010000,  # DIRSYNC -> FS_DIRSYNC_FL
    1 << 11: 0x00000004,  # COMPRESS -> FS_COMPR_FL
}
# Every FS_*_FL bit the mapping can produce: the bits a FILEATTR replaces; others on the inode stay.
FS_FL_MANAGED = sum(BTRFS_INODE_TO_FS_FL.values())
FS_FL_SEALING = 0x00000010 | 0x00000020  # immutable and append-only: forbid later writes and utimes


def fs_flags_from_btrfs(btrfs_flags: int) -> int:
    return sum(fs for bit, fs in BTRFS_INODE_TO_FS_FL.items() if btrfs_flags & bit)


def _name(name: bytes, limit: int) -> bytes:
    if not name or b"/" in name or b"\0" in name or len(name) > limit:
        raise ValueError(f"bad subvolume name {name!r}")
    return name


def subvol_create(parent_fd: int, name: bytes) -> None:
    """A new empty subvolume `name` in the directory parent_fd."""
    fcntl.ioctl(parent_fd, BTRFS_IOC_SUBVOL_CREATE, bytearray(_VOL_ARGS.pack(0, _name(name, 4087))))


def snapshot_create(parent_fd: int, name: bytes, source_fd: int) -> None:
    """A writable snapshot of the subvolume open as source_fd, named `name` in the directory parent_fd."""
    fcntl.ioctl(parent_fd, BTRFS_IOC_SNAP_CREATE_V2, bytearray(_VOL_ARGS_V2.pack(source_fd, 0, 0, _name(name, _VOL_NAME_MAX))))


@dataclass(frozen=True)
class SubvolInfo:
    treeid: int
    uuid: UUID
    received_uuid: UUID
    ctransid: int
    stransid: int
    rtransid: int
    flags: int
    parent_uuid: UUID  # the subvolume this one is a snapshot of
    otransid: int  # the transaction that created it: orders snapshots
    otime: int = 0  # when it was created, unix seconds

    @property
    def readonly(self) -> bool:
        return bool(self.flags & BTRFS_ROOT_SUBVOL_RDONLY)


def subvol_info(fd: int) -> SubvolInfo:
    """What the kernel knows of the subvolume containing fd (unprivileged since Linux 4.18)."""
    buf = bytearray(_SUBVOL_INFO.size)
    fcntl.ioctl(fd, BTRFS_IOC_GET_SUBVOL_INFO, buf)
    f = _SUBVOL_INFO.unpack(buf)
    treeid, flags, uuid, parent, received = f[0], f[5], f[6], f[7], f[8]
    ctransid, otransid, stransid, rtransid = f[9], f[10], f[11], f[12]
    otime = f[15]  # after ctime's seconds and nanoseconds
    return SubvolInfo(
        treeid, UUID(bytes=uuid), UUID(bytes=received), ctransid, stransid, rtransid, flags, UUID(bytes=parent), otransid, otime
    )


def set_received_subvol(fd: int, uuid: UUID, stransid: int) -> int:
    """Stamp the writable subvolume fd as received from `uuid` at `stransid`; the kernel's rtransid comes back."""
    buf = bytearray(_RECEIVED.pack(uuid.bytes, stransid, 0, 0, 0, 0, 0, 0))
    fcntl.ioctl(fd, BTRFS_IOC_SET_RECEIVED_SUBVOL, buf)
    return int(_RECEIVED.unpack(buf)[2])


def set_readonly(fd: int) -> None:
    flags = bytearray(8)
    fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, flags)
    value = _U64.unpack(flags)[0] | BTRFS_SUBVOL_RDONLY
    fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, bytearray(_U64.pack(value)))


def clone_range(dest_fd: int, dest_offset: int, src_fd: int, src_offset: int, length: int) -> None:
    """Reflink length bytes (0: to the source's end) from src_fd to dest_fd: FICLONERANGE, same filesystem only."""
    fcntl.ioctl(dest_fd, FICLONERANGE, bytearray(_CLONE_RANGE.pack(src_fd, src_offset, length, dest_offset)))


def encoded_write(
    fd: int,
    data: bytes | bytearray | memoryview,
    *,
    offset: int,
    length: int,
    unencoded_len: int,
    unencoded_offset: int,
    compression: int,
    encryption: int,
) -> None:
    """Write an already-compressed extent as it is (BTRFS_IOC_ENCODED_WRITE; needs CAP_SYS_ADMIN and fd open for writing)."""
    # The kernel reads the payload through a user pointer, so it must live in memory ctypes owns.
    payload = (ctypes.c_char * len(data)).from_buffer_copy(data)
    iov = (ctypes.c_char * _IOVEC.size).from_buffer_copy(_IOVEC.pack(ctypes.addressof(payload), len(data)))
    args = bytearray(_ENCODED.pack(ctypes.addressof(iov), 1, offset, 0, length, unencoded_len, unencoded_offset, compression, encryption))
    # The result counts encoded bytes, not file bytes; btrfs receive only checks for failure, as here.
    fcntl.ioctl(fd, BTRFS_IOC_ENCODED_WRITE, args)


def get_fs_flags(fd: int) -> int:
    buf = bytearray(_LONG.size)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    return int(_LONG.unpack(buf)[0]) & 0xFFFFFFFF


def set_fs_flags(fd: int, flags: int) -> None:
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, bytearray(_LONG.pack(flags)))


def is_subvolume_root(st: os.stat_result) -> bool:
    """True for a subvolume's top directory (on btrfs)."""
    return st.st_ino == SUBVOL_ROOT_INO and (st.st_mode & 0o170000) == 0o040000


def subvolumes_under(root_fd: int, depth: int) -> Iterator[int]:
    """O_RDONLY fds of the subvolumes below root_fd, breadth first, down to `depth` directories but never into a subvolume.

    The caller owns each fd yielded; the walk's own fds are closed even if the caller stops early.
    """
    level = [os.dup(root_fd)]
    below: list[int] = []
    try:
        for _ in range(depth):
            while level:
                dir_fd = level.pop()
                try:
                    with os.scandir(dir_fd) as entries:
                        names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
                    for name in names:
                        try:
                            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                        except OSError:
                            continue
                        if is_subvolume_root(os.fstat(fd)):
                            yield fd
                        else:
                            below.append(fd)
                finally:
                    os.close(dir_fd)
            level, below = below, []
    finally:
        for fd in level + below:
            os.close(fd)


def find_subvolume(root_fd: int, uuid: UUID, ctransid: int, depth: int) -> int | None:
    """An fd of the subvolume below root_fd received as `uuid`, or else created as it; None if there is none.

    btrfs receive looks up received_uuid first, then the subvolume's own uuid, and ignores the transid
    (common/send-utils.c); here a subvolume whose transid also matches is preferred, in that same order.
    """
    best: tuple[int, int] | None = None  # (rank, fd); lower is better
    for fd in subvolumes_under(root_fd, depth):
        info = subvol_info(fd)
        rank = 9
        if info.received_uuid == uuid:
            rank = 0 if info.stransid == ctransid else 2
        elif info.uuid == uuid:
            rank = 1 if info.ctransid == ctransid else 3
        if best is None or rank < best[0]:
            if best is not None:
                os.close(best[1])
            best = (rank, fd)
        else:
            os.close(fd)
        if best[0] == 0:
            break
    if best is not None and best[0] < 9:
        return best[1]
    if best is not None:
        os.close(best[1])
    return None


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none)."""
    if _libc().fallocate(fd, ctypes.c_int(mode), ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
