"""Applies btrfs send-stream commands to a real btrfs filesystem, confined to subvolumes under one receive root."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from snapferry.codec.btrfs_commands import Cmd, Command
from snapferry.codec.btrfs_extent import decode_extent
from snapferry.codec.btrfs_stream import BtrfsStreamReader, safe_path_parts
from snapferry.codec.zfs_stream import Readable
from snapferry.engine import btrfs_ioctl as ioc
from snapferry.errors import OutOfSpace, SnapferryError, StreamFormatError

MAX_FILE_SIZE = (1 << 63) - 1  # MAX_LFS_FILESIZE: what the kernel accepts as an offset or a size
# Decompressing ENCODED_WRITE data ourselves: btrfs extents hold at most 128 KiB uncompressed; the bound stops a bomb.
MAX_UNENCODED_LEN = 16 << 20
# How deep below the receive root snapshot parents and clone sources are looked for.
PARENT_SEARCH_DEPTH = 4
_DIR_CACHE_MAX = 1024  # open directory fds kept between commands
_CAPABILITY = b"security.capability"
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
_UNSUPPORTED = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
_NAMESPACE = (Cmd.RENAME, Cmd.UNLINK, Cmd.RMDIR, Cmd.LINK, Cmd.MKFILE, Cmd.MKDIR, Cmd.MKNOD, Cmd.MKFIFO, Cmd.MKSOCK, Cmd.SYMLINK)


class UnsafeStream(StreamFormatError):
    """The stream tried to reach outside its subvolume: through a symlink, a foreign clone source, an absurd size."""


class BtrfsApplyError(SnapferryError):
    """The filesystem refused a command for a reason that is not lack of space."""


def _shown(path: bytes) -> str:
    return os.fsdecode(path) or "."


@dataclass
class _Subvol:
    path: bytes  # its name under the receive root
    fd: int
    uuid: UUID
    ctransid: int


class BtrfsApplier:
    """Applies one stream at a time as `btrfs receive DIR` would, with receive_root as DIR.

    Every path is resolved component by component from the subvolume's directory fd without following
    symlinks, so a stream cannot write, link or reflink outside the subvolume it creates. Snapshot
    parents and clone sources are only taken from subvolumes under receive_root.
    ENCODED_WRITE data goes in still compressed through BTRFS_IOC_ENCODED_WRITE; where the kernel
    refuses that ioctl (or `encoded_write=False`), zlib and zstd data is decompressed and written plainly
    and LZO is refused. FILEATTR, which stock `btrfs receive` ignores, is applied with FS_IOC_SETFLAGS;
    immutable and append-only wait until END so that the stream's later commands still work.
    """

    def __init__(self, receive_root: Path, *, encoded_write: bool = True, max_file_size: int = MAX_FILE_SIZE) -> None:
        self.receive_root = receive_root
        self._encoded_write = encoded_write
        self._max_size = max_file_size
        self._root_fd = os.open(receive_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._subvol: _Subvol | None = None
        self._write: tuple[bytes, int] | None = None
        self._capability: tuple[bytes, bytes] | None = None
        self._sealing: dict[bytes, int] = {}
        self._dirs: dict[tuple[bytes, ...], int] = {}
        self._handlers: dict[Cmd, Callable[[Command], None]] = {
            kind: getattr(self, f"_do_{kind.name.lower()}") for kind in Cmd if kind not in (Cmd.SUBVOL, Cmd.SNAPSHOT, Cmd.END)
        }
        self._transient: list[int] = []
        self.finished: list[Path] = []

    def close(self) -> None:
        self._drop_write()
        self._forget_all()
        if self._subvol is not None:
            os.close(self._subvol.fd)
            self._subvol = None
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> BtrfsApplier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def apply_stream(self, source: Readable) -> Path:
        """Apply one whole stream up to its END; the received subvolume's path."""
        for item in BtrfsStreamReader(source):
            self.apply(item.command)
        return self.finished[-1]

    # --- dispatch -------------------------------------------------------------------------------

    def apply(self, command: Command) -> None:
        kind = command.kind
        if kind in (Cmd.SUBVOL, Cmd.SNAPSHOT, Cmd.END) or len(self._dirs) > _DIR_CACHE_MAX:
            self._forget_all()
        if kind in (Cmd.SUBVOL, Cmd.SNAPSHOT):
            self._begin(command)
            return
        if self._subvol is None:
            raise StreamFormatError(f"{kind.name} command before any SUBVOL or SNAPSHOT command")
        if kind == Cmd.END:
            self._end()
            return
        if kind in _NAMESPACE:
            self._drop_write()
        try:
            self._handlers[kind](command)
        except OSError as e:
            path = command.path
            if kind == Cmd.RENAME:
                path += b" -> " + command.path_to
            elif kind == Cmd.LINK:
                path += b" -> " + command.path_link
            raise self._os_error(kind, path, e) from None
        finally:
            while self._transient:
                os.close(self._transient.pop())

    def _os_error(self, kind: Cmd, path: bytes, e: OSError) -> SnapferryError:
        text = f"{kind.name} {_shown(path)}: {e.strerror or e}"
        if e.errno in _OUT_OF_SPACE:
            return OutOfSpace(f"out of space receiving btrfs stream: {text}")
        return BtrfsApplyError(f"cannot apply {text}")

    # --- path resolution ------------------------------------------------------------------------

    def _parent(self, kind: Cmd, raw: bytes, base_fd: int | None = None) -> tuple[int, bytes]:
        """An O_PATH fd of the directory holding raw's last component, and that component; never through a symlink.

        The fd is borrowed: valid until the current command is done.
        """
        parts = safe_path_parts(raw)
        if not parts:
            raise StreamFormatError(f"{kind.name} command names the subvolume's root, not an entry in it")
        if base_fd is None:
            return self._directory(kind, raw, parts[:-1]), parts[-1]
        fd = base_fd
        for i, name in enumerate(parts[:-1]):
            fd = self._step(kind, raw, fd, name, parts[: i + 1])
            self._transient.append(fd)
        return fd, parts[-1]

    def _directory(self, kind: Cmd, raw: bytes, parts: tuple[bytes, ...]) -> int:
        """The subvolume's directory at parts, opened once and kept until a rename or rmdir may have moved it.

        Every prefix of a cached directory is cached too, so a directory missing from the cache has no
        cached descendants (see _forget).
        """
        if not parts:
            return self._subvol_fd()
        fd = self._dirs.get(parts)
        if fd is None:
            fd = self._step(kind, raw, self._directory(kind, raw, parts[:-1]), parts[-1], parts)
            self._dirs[parts] = fd
        return fd

    def _step(self, kind: Cmd, raw: bytes, dir_fd: int, name: bytes, where: tuple[bytes, ...]) -> int:
        try:
            return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP) and self._is_symlink(dir_fd, name):
                raise UnsafeStream(f"refused {kind.name} {_shown(raw)}: {_shown(b'/'.join(where))} is a symlink") from None
            raise

    def _forget(self, raw: bytes) -> None:
        """Drop the cached directories at raw and below: it is being renamed or removed."""
        parts = tuple(raw.split(b"/"))
        if parts not in self._dirs:
            return
        for key in [k for k in self._dirs if k[: len(parts)] == parts]:
            os.close(self._dirs.pop(key))

    def _forget_all(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    @staticmethod
    def _is_symlink(dir_fd: int, name: bytes) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def _open(self, kind: Cmd, raw: bytes, flags: int, base_fd: int | None = None, *, regular: bool = True) -> int:
        """Open raw, never through a symlink, with flags; unless it is a regular file (or, with regular=False, a directory), refuse.

        Its type is checked (lstat) before the open, so a stream cannot make us open a fifo (which would
        hang) or a device node it created (which would write to a real disk): the stream's own commands
        cannot change it in between. O_NONBLOCK and the check that the opened inode is the one looked at
        guard against another process swapping the entry meanwhile.
        """
        dir_fd, name = self._parent(kind, raw, base_fd) if raw else (self._subvol_fd() if base_fd is None else base_fd, b".")
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(before.st_mode):
            raise UnsafeStream(f"refused {kind.name} {_shown(raw)}: it is a symlink")
        if not (stat.S_ISREG(before.st_mode) or (not regular and stat.S_ISDIR(before.st_mode))):
            raise UnsafeStream(f"refused {kind.name} {_shown(raw)}: it is not a regular file")
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            os.close(fd)
            raise UnsafeStream(f"refused {kind.name} {_shown(raw)}: it was replaced while being opened")
        return fd

    def _open_any(self, kind: Cmd, raw: bytes, base_fd: int | None = None) -> int:
        """An O_PATH fd of raw itself, even a symlink or the subvolume root (b"")."""
        if not raw:
            return os.dup(self._subvol_fd() if base_fd is None else base_fd)
        dir_fd, name = self._parent(kind, raw, base_fd)
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)

    @staticmethod
    def _proc(fd: int) -> str:
        # For calls with no *at form (xattrs, chmod): the magic link names exactly this inode, symlinks included.
        return f"/proc/self/fd/{fd}"

    def _writer(self, kind: Cmd, raw: bytes) -> int:
        if self._write is not None and self._write[0] == raw:
            return self._write[1]
        self._drop_write()
        fd = self._open(kind, raw, os.O_WRONLY)
        self._write = (raw, fd)
        return fd

    def _drop_write(self) -> None:
        if self._write is not None:
            os.close(self._write[1])
            self._write = None

    def _bound(self, kind: Cmd, raw: bytes, what: str, end: int) -> None:
        if end > self._max_size:
            raise UnsafeStream(f"refused {kind.name} {_shown(raw)}: {what} reaches byte {end}, over the limit of {self._max_size}")

    # --- subvolumes -----------------------------------------------------------------------------

    def _begin(self, command: Command) -> None:
        if self._subvol is not None:
            raise StreamFormatError(f"{command.kind.name} command while subvolume {_shown(self._subvol.path)} is still open")
        name = command.path
        if len(safe_path_parts(name)) != 1:
            raise UnsafeStream(f"refused {command.kind.name} {_shown(name)}: a received subvolume's name must be one path component")
        try:
            if command.kind == Cmd.SUBVOL:
                ioc.subvol_create(self._root_fd, name)
            else:
                parent = self._find_subvol(command.kind, command.clone_uuid, command.clone_ctransid)
                try:
                    ioc.snapshot_create(self._root_fd, name, parent)
                finally:
                    os.close(parent)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._root_fd)
        except OSError as e:
            raise self._os_error(command.kind, name, e) from None
        self._subvol = _Subvol(name, fd, command.uuid, command.ctransid)

    def _find_subvol(self, kind: Cmd, uuid: UUID, ctransid: int) -> int:
        fd = ioc.find_subvolume(self._root_fd, uuid, ctransid, PARENT_SEARCH_DEPTH)
        if fd is None:
            raise StreamFormatError(
                f"{kind.name}: no subvolume under {self.receive_root} was received as {uuid} (receive the parent snapshot first)"
            )
        return fd

    def _end(self) -> None:
        assert self._subvol is not None
        sub = self._subvol
        self._drop_write()
        try:
            for raw, flags in self._sealing.items():
                fd = self._open(Cmd.FILEATTR, raw, os.O_RDONLY, regular=False)
                try:
                    ioc.set_fs_flags(fd, ioc.get_fs_flags(fd) | flags)
                finally:
                    os.close(fd)
            ioc.set_received_subvol(sub.fd, sub.uuid, sub.ctransid)
            ioc.set_readonly(sub.fd)
        except OSError as e:
            raise self._os_error(Cmd.END, sub.path, e) from None
        os.close(sub.fd)
        self._subvol = None
        self._sealing.clear()
        self._capability = None
        self.finished.append(self.receive_root / os.fsdecode(sub.path))

    # --- inodes ---------------------------------------------------------------------------------

    def _do_mkfile(self, c: Command) -> None:
        d, name = self._parent(c.kind, c.path)
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=d))

    def _do_mkdir(self, c: Command) -> None:
        d, name = self._parent(c.kind, c.path)
        os.mkdir(name, 0o700, dir_fd=d)

    def _do_mknod(self, c: Command) -> None:
        d, name = self._parent(c.kind, c.path)
        os.mknod(name, stat.S_IFMT(c.mode) | 0o600, c.rdev, dir_fd=d)

    def _do_mkfifo(self, c: Command) -> None:
        d, name = self._parent(c.kind, c.path)
        os.mkfifo(name, 0o600, dir_fd=d)

    def _do_mksock(self, c: Command) -> None:
        d, name = self._parent(c.kind, c.path)
        os.mknod(name, stat.S_IFSOCK | 0o600, dir_fd=d)

    def _do_symlink(self, c: Command) -> None:
        # The target is stored, never followed by us; it may point anywhere, as in the source.
        d, name = self._parent(c.kind, c.path)
        os.symlink(c.path_link, name, dir_fd=d)

    def _do_rename(self, c: Command) -> None:
        d1, n1 = self._parent(c.kind, c.path)
        d2, n2 = self._parent(c.kind, c.path_to)
        os.rename(n1, n2, src_dir_fd=d1, dst_dir_fd=d2)
        self._forget(c.path)
        self._forget(c.path_to)

    def _do_link(self, c: Command) -> None:
        # PATH is the new name, PATH_LINK the existing inode, both inside the subvolume.
        d1, n1 = self._parent(c.kind, c.path_link)
        d2, n2 = self._parent(c.kind, c.path)
        os.link(n1, n2, src_dir_fd=d1, dst_dir_fd=d2, follow_symlinks=False)

    def _do_unlink(self, c: Command) -> None:
        d, name = self._parent(c.kind, c.path)
        os.unlink(name, dir_fd=d)

    def _do_rmdir(self, c: Command) -> None:
        d, name = self._parent(c.kind, c.path)
        os.rmdir(name, dir_fd=d)
        self._forget(c.path)

    # --- data -----------------------------------------------------------------------------------

    def _do_write(self, c: Command) -> None:
        data, offset = c.data, c.file_offset
        self._bound(c.kind, c.path, "the write", offset + len(data))
        fd = self._writer(c.kind, c.path)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)

    def _do_clone(self, c: Command) -> None:
        safe_path_parts(c.clone_path)
        length = c.clone_len
        self._bound(c.kind, c.path, "the clone", c.file_offset + length)
        self._bound(c.kind, c.path, "the clone source", c.clone_offset + length)
        if length == 0:
            # FICLONERANGE reads 0 as "to the end of the source"; send never means that.
            raise UnsafeStream(f"refused CLONE {_shown(c.path)}: zero length")
        dest = self._writer(c.kind, c.path)
        assert self._subvol is not None
        if c.clone_uuid == self._subvol.uuid:
            src_subvol, owned = self._subvol.fd, False
        else:
            try:
                src_subvol, owned = self._find_subvol(c.kind, c.clone_uuid, c.clone_ctransid), True
            except StreamFormatError as e:
                raise UnsafeStream(f"refused CLONE {_shown(c.path)} from {_shown(c.clone_path)}: {e}") from None
        try:
            src = self._open(c.kind, c.clone_path, os.O_RDONLY, base_fd=src_subvol)
        finally:
            if owned:
                os.close(src_subvol)
        try:
            ioc.clone_range(dest, c.file_offset, src, c.clone_offset, length)
        finally:
            os.close(src)

    def _do_truncate(self, c: Command) -> None:
        self._bound(c.kind, c.path, "the new size", c.size)
        os.ftruncate(self._writer(c.kind, c.path), c.size)

    def _do_update_extent(self, c: Command) -> None:
        # Sent with --no-data: the extent's bytes are not in the stream; like btrfs receive, change nothing.
        self._bound(c.kind, c.path, "the extent", c.file_offset + c.size)

    def _do_fallocate(self, c: Command) -> None:
        self._bound(c.kind, c.path, "the allocation", c.file_offset + c.size)
        fd = self._writer(c.kind, c.path)
        if c.fallocate_mode == 0:
            os.posix_fallocate(fd, c.file_offset, c.size)
        else:
            ioc.fallocate(fd, c.fallocate_mode, c.file_offset, c.size)

    def _do_encoded_write(self, c: Command) -> None:
        length, unencoded_len, unencoded_offset = c.unencoded_file_len, c.unencoded_len, c.unencoded_offset
        self._bound(c.kind, c.path, "the encoded write", c.file_offset + length)
        if unencoded_offset + length > unencoded_len or unencoded_len > MAX_UNENCODED_LEN:
            raise UnsafeStream(
                f"refused ENCODED_WRITE {_shown(c.path)}: {length} bytes at {unencoded_offset} of an extent of {unencoded_len} bytes "
                f"(at most {MAX_UNENCODED_LEN})"
            )
        if c.encryption != 0:
            raise StreamFormatError(f"ENCODED_WRITE {_shown(c.path)}: encryption {c.encryption} is not supported")
        fd = self._writer(c.kind, c.path)
        if self._encoded_write:
            try:
                ioc.encoded_write(
                    fd,
                    c.data,
                    offset=c.file_offset,
                    length=length,
                    unencoded_len=unencoded_len,
                    unencoded_offset=unencoded_offset,
                    compression=c.compression,
                    encryption=0,
                )
                return
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
        try:
            plain = decode_extent(c.compression, c.data, unencoded_len)
        except StreamFormatError as e:
            raise StreamFormatError(f"ENCODED_WRITE {_shown(c.path)}: {e}") from None
        view = memoryview(plain)[unencoded_offset : unencoded_offset + length]
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], c.file_offset + done)

    # --- metadata -------------------------------------------------------------------------------

    def _do_set_xattr(self, c: Command) -> None:
        fd = self._open_any(c.kind, c.path)
        try:
            os.setxattr(self._proc(fd), c.xattr_name, c.xattr_data)
        finally:
            os.close(fd)
        if c.xattr_name == _CAPABILITY:
            # CHOWN clears file capabilities; the kernel sends them before it, so they are put back after it.
            self._capability = (c.path, bytes(c.xattr_data))

    def _do_remove_xattr(self, c: Command) -> None:
        fd = self._open_any(c.kind, c.path)
        try:
            os.removexattr(self._proc(fd), c.xattr_name)
        finally:
            os.close(fd)

    def _do_chown(self, c: Command) -> None:
        d, name = self._parent(c.kind, c.path) if c.path else (self._subvol_fd(), b".")
        os.chown(name, c.uid, c.gid, dir_fd=d, follow_symlinks=False)
        if self._capability is not None and self._capability[0] == c.path:
            fd = self._open_any(c.kind, c.path)
            try:
                os.setxattr(self._proc(fd), _CAPABILITY, self._capability[1])
            finally:
                os.close(fd)
        self._capability = None

    def _do_chmod(self, c: Command) -> None:
        fd = self._open_any(c.kind, c.path)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise UnsafeStream(f"refused CHMOD {_shown(c.path)}: it is a symlink")
            os.chmod(self._proc(fd), c.mode & 0o7777)
        finally:
            os.close(fd)

    def _do_utimes(self, c: Command) -> None:
        d, name = self._parent(c.kind, c.path) if c.path else (self._subvol_fd(), b".")
        os.utime(name, ns=(c.atime.ns, c.mtime.ns), dir_fd=d, follow_symlinks=False)

    def _do_fileattr(self, c: Command) -> None:
        flags = ioc.fs_flags_from_btrfs(c.fileattr)
        fd = self._open_any(c.kind, c.path)
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return  # FS_IOC_SETFLAGS needs an open file; special files have no flags to give
        fd = self._open(c.kind, c.path, os.O_RDONLY, regular=False)
        try:
            current = ioc.get_fs_flags(fd)
            wanted = (current & ~ioc.FS_FL_MANAGED) | (flags & ~ioc.FS_FL_SEALING)
            if wanted != current:
                ioc.set_fs_flags(fd, wanted)
        finally:
            os.close(fd)
        if flags & ioc.FS_FL_SEALING:
            self._sealing[c.path] = flags & ioc.FS_FL_SEALING
        else:
            self._sealing.pop(c.path, None)

    def _subvol_fd(self) -> int:
        assert self._subvol is not None
        return self._subvol.fd
