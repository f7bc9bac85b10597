"""Applies btrfs send-stream commands to a real btrfs filesystem, confined to subvolumes under one receive root."""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from snapferry.btrfs.codec.commands import Attr, Cmd, Command
from snapferry.btrfs.codec.extent import decode_extent
from snapferry.btrfs.codec.stream import BtrfsStreamReader, safe_path_parts
from snapferry.btrfs.engine import ioctl as ioc
from snapferry.btrfs.engine.paths import ConfinedPaths, shown
from snapferry.core.streamio import Readable
from snapferry.errors import BtrfsApplyError, OutOfSpace, SnapferryError, StreamFormatError, UnsafeStream

MAX_FILE_SIZE = (1 << 63) - 1  # MAX_LFS_FILESIZE: what the kernel accepts as an offset or a size
# Decompressing ENCODED_WRITE data ourselves: btrfs extents hold at most 128 KiB uncompressed; the bound stops a bomb.
MAX_UNENCODED_LEN = 16 << 20
# How deep below the receive root snapshot parents and clone sources are looked for.
PARENT_SEARCH_DEPTH = 4
_CAPABILITY = b"security.capability"
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
_UNSUPPORTED = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
_TIMESPEC = struct.Struct("<QI").unpack
# The commands that make a new inode, which the kernel sends under a temporary name and renames next.
CREATES = frozenset((Cmd.MKFILE, Cmd.MKDIR, Cmd.MKNOD, Cmd.MKFIFO, Cmd.MKSOCK, Cmd.SYMLINK))


__all__ = ["BtrfsApplier", "BtrfsApplyError", "UnsafeStream"]


@dataclass
class _Subvol:
    path: bytes  # its name under the receive root
    fd: int
    uuid: UUID
    ctransid: int
    paths: ConfinedPaths = field(init=False)

    def __post_init__(self) -> None:
        self.paths = ConfinedPaths(self.fd)

    def close(self) -> None:
        self.paths.forget_all()
        os.close(self.fd)


class BtrfsApplier:
    """Applies one stream at a time as `btrfs receive DIR` would, with receive_root as DIR.

    Every path is resolved component by component from the subvolume's directory fd without following
    symlinks, so a stream cannot write, link or reflink outside the subvolume it creates. Snapshot
    parents and clone sources are only taken from subvolumes under receive_root.
    One file is held open for writing: the one a MKFILE created (following its RENAME) or the last one
    written. Commands on that name use the fd (fchown, fchmod, futimens) instead of a path; any other
    command that may change what a name means closes it.
    ENCODED_WRITE data goes in still compressed through BTRFS_IOC_ENCODED_WRITE; where the kernel
    refuses that ioctl (or `encoded_write=False`), zlib and zstd data is decompressed and written plainly
    and LZO is refused. FILEATTR, which stock `btrfs receive` ignores, is applied with FS_IOC_SETFLAGS;
    immutable and append-only wait until END so that the stream's later commands still work.
    `resume_from` (a checkpoint of a partial subvolume): the first SUBVOL or SNAPSHOT command re-creates
    the subvolume as a writable snapshot of it instead, and the commands after the checkpoint follow.
    """

    def __init__(
        self, receive_root: Path, *, encoded_write: bool = True, max_file_size: int = MAX_FILE_SIZE, resume_from: Path | None = None
    ) -> None:
        self.receive_root = receive_root
        self._resume_from = resume_from
        self._encoded_write = encoded_write
        self._max_size = max_file_size
        self._root_fd = os.open(receive_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._subvol: _Subvol | None = None
        self._write: tuple[bytes, int] | None = None
        self._capability: tuple[bytes, bytes] | None = None
        self._sealing: dict[bytes, int] = {}
        self._handlers: dict[Cmd, Callable[[Command], None]] = {
            kind: getattr(self, f"_do_{kind.name.lower()}") for kind in Cmd if kind not in (Cmd.SUBVOL, Cmd.SNAPSHOT, Cmd.END)
        }
        self.finished: list[Path] = []

    def close(self) -> None:
        self._drop_write()
        if self._subvol is not None:
            self._subvol.close()
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
        handler = self._handlers.get(kind)
        subvol = self._subvol
        if handler is None or subvol is None:
            self._apply_other(command)
            return
        paths = subvol.paths
        try:
            handler(command)
        except OSError as e:
            path = command.path
            if kind == Cmd.RENAME:
                path += b" -> " + command.path_to
            elif kind == Cmd.LINK:
                path += b" -> " + command.path_link
            raise self._os_error(kind, path, e) from None
        finally:
            if paths.pending:
                paths.end_command()

    def _apply_other(self, command: Command) -> None:
        kind = command.kind
        if kind in (Cmd.SUBVOL, Cmd.SNAPSHOT):
            self._begin(command)
            return
        if self._subvol is None:
            raise StreamFormatError(f"{kind.name} command before any SUBVOL or SNAPSHOT command")
        self._end()

    def _os_error(self, kind: Cmd, path: bytes, e: OSError) -> SnapferryError:
        text = f"{kind.name} {shown(path)}: {e.strerror or e}"
        if e.errno in _OUT_OF_SPACE:
            return OutOfSpace(f"out of space receiving btrfs stream: {text}")
        return BtrfsApplyError(f"cannot apply {text}")

    @staticmethod
    def _proc(fd: int) -> str:
        # For calls with no *at form (xattrs, chmod): the magic link names exactly this inode, symlinks included.
        return f"/proc/self/fd/{fd}"

    def _writer(self, kind: Cmd, raw: bytes) -> int:
        if self._write is not None and self._write[0] == raw:
            return self._write[1]
        self._drop_write()
        fd = self._paths.open(kind, raw, os.O_WRONLY)
        self._write = (raw, fd)
        return fd

    def _drop_write(self) -> None:
        if self._write is not None:
            os.close(self._write[1])
            self._write = None

    def _bound(self, kind: Cmd, raw: bytes, what: str, end: int) -> None:
        if end > self._max_size:
            raise UnsafeStream(f"refused {kind.name} {shown(raw)}: {what} reaches byte {end}, over the limit of {self._max_size}")

    # --- subvolumes -----------------------------------------------------------------------------

    def _begin(self, command: Command) -> None:
        if self._subvol is not None:
            raise StreamFormatError(f"{command.kind.name} command while subvolume {shown(self._subvol.path)} is still open")
        name = command.path
        if len(safe_path_parts(name)) != 1:
            raise UnsafeStream(f"refused {command.kind.name} {shown(name)}: a received subvolume's name must be one path component")
        try:
            if self._resume_from is not None:
                checkpoint = os.open(self._resume_from, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    ioc.snapshot_create(self._root_fd, name, checkpoint)
                finally:
                    os.close(checkpoint)
                self._resume_from = None
            elif command.kind == Cmd.SUBVOL:
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

    @property
    def _paths(self) -> ConfinedPaths:
        assert self._subvol is not None
        return self._subvol.paths

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
                fd = self._paths.open(Cmd.FILEATTR, raw, os.O_RDONLY, regular=False)
                try:
                    ioc.set_fs_flags(fd, ioc.get_fs_flags(fd) | flags)
                finally:
                    os.close(fd)
            ioc.set_received_subvol(sub.fd, sub.uuid, sub.ctransid)
            ioc.set_readonly(sub.fd)
        except OSError as e:
            raise self._os_error(Cmd.END, sub.path, e) from None
        sub.close()
        self._subvol = None
        self._sealing.clear()
        self._capability = None
        self.finished.append(self.receive_root / os.fsdecode(sub.path))

    # --- inodes ---------------------------------------------------------------------------------

    def _do_mkfile(self, c: Command) -> None:
        # The new file stays open as the writer: the kernel sends its RENAME, WRITEs, CHOWN, CHMOD and
        # UTIMES next, and an fd of a regular file we created (O_EXCL) needs no further checks.
        self._drop_write()
        path = bytes(c.attrs[Attr.PATH])
        d, name = self._paths.parent(c.kind, path)
        self._write = (path, os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=d))

    def apply_created_as(self, create: Command, rename: Command) -> None:
        """A command that makes an inode (MKFILE, MKDIR, SYMLINK...) and the RENAME of it that follows: made under its new name.

        The kernel sends every new inode under a temporary name and then a RENAME, and rename is the
        dearest of the calls a receive makes on btrfs. Where the new name is taken (a rename would
        replace what is there), cannot be made, or is refused, both are applied as they come, and fail
        as they would.
        """
        moved, made = rename.attrs, create.attrs
        raw_target = moved.get(Attr.PATH_TO) if rename.kind == Cmd.RENAME else None
        subvol = self._subvol
        if subvol is None or create.kind not in CREATES or raw_target is None or bytes(moved[Attr.PATH]) != bytes(made[Attr.PATH]):
            self.apply(create)
            self.apply(rename)
            return
        try:
            # Every one of these calls makes the inode or nothing, so a failed attempt leaves no trace.
            self._handlers[create.kind](Command(create.kind, {**made, Attr.PATH: bytes(raw_target)}))
        except (OSError, StreamFormatError):
            self.apply(create)
            self.apply(rename)
        finally:
            if subvol.paths.pending:
                subvol.paths.end_command()

    def _do_mkdir(self, c: Command) -> None:
        self._drop_write()
        d, name = self._paths.parent(c.kind, c.path)
        os.mkdir(name, 0o700, dir_fd=d)

    def _do_mknod(self, c: Command) -> None:
        self._drop_write()
        d, name = self._paths.parent(c.kind, c.path)
        os.mknod(name, stat.S_IFMT(c.mode) | 0o600, c.rdev, dir_fd=d)

    def _do_mkfifo(self, c: Command) -> None:
        self._drop_write()
        d, name = self._paths.parent(c.kind, c.path)
        os.mkfifo(name, 0o600, dir_fd=d)

    def _do_mksock(self, c: Command) -> None:
        self._drop_write()
        d, name = self._paths.parent(c.kind, c.path)
        os.mknod(name, stat.S_IFSOCK | 0o600, dir_fd=d)

    def _do_symlink(self, c: Command) -> None:
        # The target is stored, never followed by us; it may point anywhere, as in the source.
        self._drop_write()
        d, name = self._paths.parent(c.kind, c.path)
        os.symlink(c.path_link, name, dir_fd=d)

    def _do_rename(self, c: Command) -> None:
        attrs = c.attrs
        source, target = bytes(attrs[Attr.PATH]), bytes(attrs[Attr.PATH_TO])
        # The writer follows its file to the new name; any other rename may move it, so it is closed.
        moving = self._write is not None and self._write[0] == source
        if not moving:
            self._drop_write()
        paths = self._paths
        d1, n1 = paths.parent(c.kind, source)
        d2, n2 = paths.parent(c.kind, target)
        os.rename(n1, n2, src_dir_fd=d1, dst_dir_fd=d2)
        if moving:
            assert self._write is not None
            self._write = (target, self._write[1])
        paths.forget(source)
        paths.forget(target)

    def _do_link(self, c: Command) -> None:
        # PATH is the new name, PATH_LINK the existing inode, both inside the subvolume.
        self._drop_write()
        d1, n1 = self._paths.parent(c.kind, c.path_link)
        d2, n2 = self._paths.parent(c.kind, c.path)
        os.link(n1, n2, src_dir_fd=d1, dst_dir_fd=d2, follow_symlinks=False)

    def _do_unlink(self, c: Command) -> None:
        self._drop_write()
        d, name = self._paths.parent(c.kind, c.path)
        os.unlink(name, dir_fd=d)

    def _do_rmdir(self, c: Command) -> None:
        self._drop_write()
        d, name = self._paths.parent(c.kind, c.path)
        os.rmdir(name, dir_fd=d)
        self._paths.forget(c.path)

    # --- data -----------------------------------------------------------------------------------

    def _do_write(self, c: Command) -> None:
        attrs = c.attrs
        path, data, offset = bytes(attrs[Attr.PATH]), memoryview(attrs[Attr.DATA]), int.from_bytes(attrs[Attr.FILE_OFFSET], "little")
        if offset + len(data) > self._max_size:
            self._bound(c.kind, path, "the write", offset + len(data))
        write = self._write
        fd = write[1] if write is not None and write[0] == path else self._writer(c.kind, path)
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
            raise UnsafeStream(f"refused CLONE {shown(c.path)}: zero length")
        dest = self._writer(c.kind, c.path)
        assert self._subvol is not None
        if c.clone_uuid == self._subvol.uuid:
            src_subvol, owned = self._subvol.fd, False
        else:
            try:
                src_subvol, owned = self._find_subvol(c.kind, c.clone_uuid, c.clone_ctransid), True
            except StreamFormatError as e:
                raise UnsafeStream(f"refused CLONE {shown(c.path)} from {shown(c.clone_path)}: {e}") from None
        try:
            src = self._paths.open(c.kind, c.clone_path, os.O_RDONLY, base_fd=src_subvol)
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
                f"refused ENCODED_WRITE {shown(c.path)}: {length} bytes at {unencoded_offset} of an extent of {unencoded_len} bytes "
                f"(at most {MAX_UNENCODED_LEN})"
            )
        if c.encryption != 0:
            raise StreamFormatError(f"ENCODED_WRITE {shown(c.path)}: encryption {c.encryption} is not supported")
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
            raise StreamFormatError(f"ENCODED_WRITE {shown(c.path)}: {e}") from None
        view = memoryview(plain)[unencoded_offset : unencoded_offset + length]
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], c.file_offset + done)

    # --- metadata -------------------------------------------------------------------------------

    def _do_set_xattr(self, c: Command) -> None:
        fd = self._paths.open_any(c.kind, c.path)
        try:
            os.setxattr(self._proc(fd), c.xattr_name, c.xattr_data)
        finally:
            os.close(fd)
        if c.xattr_name == _CAPABILITY:
            # CHOWN clears file capabilities; the kernel sends them before it, so they are put back after it.
            self._capability = (c.path, bytes(c.xattr_data))

    def _do_remove_xattr(self, c: Command) -> None:
        fd = self._paths.open_any(c.kind, c.path)
        try:
            os.removexattr(self._proc(fd), c.xattr_name)
        finally:
            os.close(fd)

    def _held(self, path: bytes) -> int | None:
        """The writer's fd if it is open on path: a regular file whose metadata calls need no path and no checks."""
        write = self._write
        return write[1] if write is not None and write[0] == path else None

    def _do_chown(self, c: Command) -> None:
        attrs = c.attrs
        path = bytes(attrs[Attr.PATH])
        uid, gid = int.from_bytes(attrs[Attr.UID], "little"), int.from_bytes(attrs[Attr.GID], "little")
        fd = self._held(path)
        if fd is not None:
            os.chown(fd, uid, gid)
        else:
            d, name = self._paths.parent_or_root(c.kind, path)
            os.chown(name, uid, gid, dir_fd=d, follow_symlinks=False)
        if self._capability is not None and self._capability[0] == path:
            fd = self._paths.open_any(c.kind, path)
            try:
                os.setxattr(self._proc(fd), _CAPABILITY, self._capability[1])
            finally:
                os.close(fd)
        self._capability = None

    def _do_chmod(self, c: Command) -> None:
        attrs = c.attrs
        path, mode = bytes(attrs[Attr.PATH]), int.from_bytes(attrs[Attr.MODE], "little") & 0o7777
        held = self._held(path)
        if held is not None:
            os.chmod(held, mode)
            return
        fd = self._paths.open_any(c.kind, path)
        try:
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise UnsafeStream(f"refused CHMOD {shown(path)}: it is a symlink")
            os.chmod(self._proc(fd), mode)
        finally:
            os.close(fd)

    def _do_utimes(self, c: Command) -> None:
        attrs = c.attrs
        path = bytes(attrs[Attr.PATH])
        atime_s, atime_ns = _TIMESPEC(attrs[Attr.ATIME])
        mtime_s, mtime_ns = _TIMESPEC(attrs[Attr.MTIME])
        ns = (atime_s * 1_000_000_000 + atime_ns, mtime_s * 1_000_000_000 + mtime_ns)
        held = self._held(path)
        if held is not None:
            os.utime(held, ns=ns)
            return
        d, name = self._paths.parent_or_root(c.kind, path)
        os.utime(name, ns=ns, dir_fd=d, follow_symlinks=False)

    def _do_fileattr(self, c: Command) -> None:
        flags = ioc.fs_flags_from_btrfs(c.fileattr)
        fd = self._paths.open_any(c.kind, c.path)
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return  # FS_IOC_SETFLAGS needs an open file; special files have no flags to give
        fd = self._paths.open(c.kind, c.path, os.O_RDONLY, regular=False)
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
