"""Resolves a btrfs stream's paths inside one subvolume, never through a symlink, with a cache of directory fds."""

from __future__ import annotations

import errno
import os
import stat

from snapferry.btrfs.codec.commands import Cmd
from snapferry.btrfs.codec.stream import NAME_MAX, PATH_MAX, safe_path_parts
from snapferry.errors import StreamFormatError, UnsafeStream

DIR_CACHE_MAX = 1024  # open directory fds kept between commands


def shown(path: bytes) -> str:
    return os.fsdecode(path) or "."


class ConfinedPaths:
    """Paths of one subvolume, resolved component by component from its directory fd.

    Directory fds are kept between commands until a rename or rmdir may have moved them, keyed by
    their path as the stream spells it. Other fds opened while resolving (below a clone source's
    subvolume) are borrowed by the current command and closed by end_command(); `pending` says
    whether end_command() has anything to do.
    """

    def __init__(self, subvol_fd: int) -> None:
        self.subvol_fd = subvol_fd
        # Every key was checked by safe_path_parts, and every prefix of a key is a key too.
        self._dirs: dict[bytes, int] = {}
        self._transient: list[int] = []
        self.pending = False

    def parent(self, kind: Cmd, raw: bytes, base_fd: int | None = None) -> tuple[int, bytes]:
        """An O_PATH fd of the directory holding raw's last component, and that component.

        The fd is borrowed: valid until the current command is done.
        """
        if base_fd is None:
            # The common case, a name in a directory already open: only the name is left to check
            # (the directory's path was checked when it was opened).
            cut = raw.rfind(b"/")
            if cut < 0:
                fd: int | None = self.subvol_fd
            elif cut > 0:
                fd = self._dirs.get(raw[:cut])
            else:
                fd = None
            if fd is not None:
                name = raw[cut + 1 :]
                if name and name != b"." and name != b".." and len(name) <= NAME_MAX and len(raw) < PATH_MAX and b"\0" not in name:
                    return fd, name
        parts = safe_path_parts(raw)
        if not parts:
            raise StreamFormatError(f"{kind.name} command names the subvolume's root, not an entry in it")
        if base_fd is None:
            return self._directory(kind, raw, parts[:-1]), parts[-1]
        fd = base_fd
        for i, name in enumerate(parts[:-1]):
            fd = self._step(kind, raw, fd, name, parts[: i + 1])
            self._transient.append(fd)
            self.pending = True
        return fd, parts[-1]

    def parent_or_root(self, kind: Cmd, raw: bytes, base_fd: int | None = None) -> tuple[int, bytes]:
        """As parent(), but b"" (the root: the subvolume's, or base_fd) is (its fd, b".")."""
        if raw:
            return self.parent(kind, raw, base_fd)
        return (self.subvol_fd if base_fd is None else base_fd), b"."

    def _directory(self, kind: Cmd, raw: bytes, parts: tuple[bytes, ...]) -> int:
        # Every prefix of a cached directory is cached too, so one missing from the cache has no cached
        # descendants (forget() relies on it).
        if not parts:
            return self.subvol_fd
        key = b"/".join(parts)
        fd = self._dirs.get(key)
        if fd is None:
            fd = self._step(kind, raw, self._directory(kind, raw, parts[:-1]), parts[-1], parts)
            self._dirs[key] = fd
            if len(self._dirs) > DIR_CACHE_MAX:
                self.pending = True
        return fd

    def _step(self, kind: Cmd, raw: bytes, dir_fd: int, name: bytes, where: tuple[bytes, ...]) -> int:
        try:
            return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP) and _is_symlink(dir_fd, name):
                raise UnsafeStream(f"refused {kind.name} {shown(raw)}: {shown(b'/'.join(where))} is a symlink") from None
            raise

    def open(self, kind: Cmd, raw: bytes, flags: int, base_fd: int | None = None, *, regular: bool = True) -> int:
        """Open raw with flags; unless it is a regular file (or, with regular=False, a directory), refuse.

        Its type is checked (lstat) before the open, so a stream cannot make us open a fifo (which would
        hang) or a device node it created (which would write to a real disk): the stream's own commands
        cannot change it in between. O_NONBLOCK and the check that the opened inode is the one looked at
        guard against another process swapping the entry meanwhile.
        """
        dir_fd, name = self.parent_or_root(kind, raw, base_fd)
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(before.st_mode):
            raise UnsafeStream(f"refused {kind.name} {shown(raw)}: it is a symlink")
        if not (stat.S_ISREG(before.st_mode) or (not regular and stat.S_ISDIR(before.st_mode))):
            raise UnsafeStream(f"refused {kind.name} {shown(raw)}: it is not a regular file")
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
            os.close(fd)
            raise UnsafeStream(f"refused {kind.name} {shown(raw)}: it was replaced while being opened")
        return fd

    def open_any(self, kind: Cmd, raw: bytes) -> int:
        """An O_PATH fd of raw itself, even a symlink or the subvolume root (b"")."""
        if not raw:
            return os.dup(self.subvol_fd)
        dir_fd, name = self.parent(kind, raw)
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)

    def forget(self, raw: bytes) -> None:
        """Drop the cached directories at raw and below: it is being renamed or removed."""
        if raw not in self._dirs:
            return
        below = raw + b"/"
        for key in [k for k in self._dirs if k == raw or k.startswith(below)]:
            os.close(self._dirs.pop(key))

    def end_command(self) -> None:
        """Close what the command borrowed; keep the cache bounded."""
        while self._transient:
            os.close(self._transient.pop())
        if len(self._dirs) > DIR_CACHE_MAX:
            self.forget_all()
        self.pending = False

    def forget_all(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()


def _is_symlink(dir_fd: int, name: bytes) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
