"""btrfs send-stream commands: the command and attribute tables and the typed Command value (pure, no I/O)."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from typing import NamedTuple
from uuid import UUID

from snapferry.errors import StreamFormatError


class Cmd(IntEnum):
    SUBVOL = 1
    SNAPSHOT = 2
    MKFILE = 3
    MKDIR = 4
    MKNOD = 5
    MKFIFO = 6
    MKSOCK = 7
    SYMLINK = 8
    RENAME = 9
    LINK = 10
    UNLINK = 11
    RMDIR = 12
    SET_XATTR = 13
    REMOVE_XATTR = 14
    WRITE = 15
    CLONE = 16
    TRUNCATE = 17
    CHMOD = 18
    CHOWN = 19
    UTIMES = 20
    END = 21
    UPDATE_EXTENT = 22
    # Protocol 2
    FALLOCATE = 23
    FILEATTR = 24
    ENCODED_WRITE = 25


class Attr(IntEnum):
    UUID = 1
    CTRANSID = 2
    INO = 3
    SIZE = 4
    MODE = 5
    UID = 6
    GID = 7
    RDEV = 8
    CTIME = 9
    MTIME = 10
    ATIME = 11
    OTIME = 12
    XATTR_NAME = 13
    XATTR_DATA = 14
    PATH = 15
    PATH_TO = 16
    PATH_LINK = 17
    FILE_OFFSET = 18
    DATA = 19
    CLONE_UUID = 20
    CLONE_CTRANSID = 21
    CLONE_PATH = 22
    CLONE_OFFSET = 23
    CLONE_LEN = 24
    # Protocol 2
    FALLOCATE_MODE = 25
    FILEATTR = 26
    UNENCODED_FILE_LEN = 27
    UNENCODED_LEN = 28
    UNENCODED_OFFSET = 29
    COMPRESSION = 30
    ENCRYPTION = 31


# Protocol 3 (fs-verity) exists only in kernels built with CONFIG_BTRFS_DEBUG; naming it makes the refusal clear.
CMD_ENABLE_VERITY = 26
FIRST_V2_CMD = Cmd.FALLOCATE

# Fixed sizes: integers, a 16-byte UUID, a timespec (le64 seconds + le32 nanoseconds); None = any length.
_U32 = (Attr.FALLOCATE_MODE, Attr.COMPRESSION, Attr.ENCRYPTION)
_U64 = (
    Attr.CTRANSID,
    Attr.INO,
    Attr.SIZE,
    Attr.MODE,
    Attr.UID,
    Attr.GID,
    Attr.RDEV,
    Attr.FILE_OFFSET,
    Attr.CLONE_CTRANSID,
    Attr.CLONE_OFFSET,
    Attr.CLONE_LEN,
    Attr.FILEATTR,
    Attr.UNENCODED_FILE_LEN,
    Attr.UNENCODED_LEN,
    Attr.UNENCODED_OFFSET,
)
_UUIDS = (Attr.UUID, Attr.CLONE_UUID)
_TIMES = (Attr.CTIME, Attr.MTIME, Attr.ATIME, Attr.OTIME)
ATTR_SIZE: dict[Attr, int | None] = (
    {a: None for a in Attr} | {a: 4 for a in _U32} | {a: 8 for a in _U64} | {a: 16 for a in _UUIDS} | {a: 12 for a in _TIMES}
)


class Spec(NamedTuple):
    required: tuple[Attr, ...]
    optional: tuple[Attr, ...] = ()


_P = Attr.PATH
# What each command carries, as the kernel sends it and btrfs receive reads it (dev-send-stream.rst).
# The kernel also sends RDEV and MODE with MKFIFO and MKSOCK, which receive ignores, and with
# protocol 2 OTIME with UTIMES (seen from kernel 6.18).
SPECS: dict[Cmd, Spec] = {
    Cmd.SUBVOL: Spec((_P, Attr.UUID, Attr.CTRANSID)),
    Cmd.SNAPSHOT: Spec((_P, Attr.UUID, Attr.CTRANSID, Attr.CLONE_UUID, Attr.CLONE_CTRANSID)),
    Cmd.MKFILE: Spec((_P, Attr.INO)),
    Cmd.MKDIR: Spec((_P, Attr.INO)),
    Cmd.MKNOD: Spec((_P, Attr.INO, Attr.MODE, Attr.RDEV)),
    Cmd.MKFIFO: Spec((_P, Attr.INO), (Attr.MODE, Attr.RDEV)),
    Cmd.MKSOCK: Spec((_P, Attr.INO), (Attr.MODE, Attr.RDEV)),
    Cmd.SYMLINK: Spec((_P, Attr.INO, Attr.PATH_LINK)),
    Cmd.RENAME: Spec((_P, Attr.PATH_TO)),
    Cmd.LINK: Spec((_P, Attr.PATH_LINK)),
    Cmd.UNLINK: Spec((_P,)),
    Cmd.RMDIR: Spec((_P,)),
    Cmd.SET_XATTR: Spec((_P, Attr.XATTR_NAME, Attr.XATTR_DATA)),
    Cmd.REMOVE_XATTR: Spec((_P, Attr.XATTR_NAME)),
    Cmd.WRITE: Spec((_P, Attr.FILE_OFFSET, Attr.DATA)),
    Cmd.CLONE: Spec((_P, Attr.FILE_OFFSET, Attr.CLONE_LEN, Attr.CLONE_UUID, Attr.CLONE_CTRANSID, Attr.CLONE_PATH, Attr.CLONE_OFFSET)),
    Cmd.TRUNCATE: Spec((_P, Attr.SIZE)),
    Cmd.CHMOD: Spec((_P, Attr.MODE)),
    Cmd.CHOWN: Spec((_P, Attr.UID, Attr.GID)),
    Cmd.UTIMES: Spec((_P, Attr.ATIME, Attr.MTIME, Attr.CTIME), (Attr.OTIME,)),
    Cmd.END: Spec(()),
    Cmd.UPDATE_EXTENT: Spec((_P, Attr.FILE_OFFSET, Attr.SIZE)),
    Cmd.FALLOCATE: Spec((_P, Attr.FALLOCATE_MODE, Attr.FILE_OFFSET, Attr.SIZE)),
    Cmd.FILEATTR: Spec((_P, Attr.FILEATTR)),
    Cmd.ENCODED_WRITE: Spec(
        (_P, Attr.FILE_OFFSET, Attr.UNENCODED_FILE_LEN, Attr.UNENCODED_LEN, Attr.UNENCODED_OFFSET, Attr.DATA),
        (Attr.COMPRESSION, Attr.ENCRYPTION),
    ),
}


class Compression(IntEnum):
    """BTRFS_ENCODED_IO_COMPRESSION_*: what ENCODED_WRITE data is compressed with."""

    NONE = 0
    ZLIB = 1
    ZSTD = 2
    LZO_4K = 3
    LZO_8K = 4
    LZO_16K = 5
    LZO_32K = 6
    LZO_64K = 7


@dataclass(frozen=True)
class Timespec:
    sec: int
    nsec: int

    @property
    def ns(self) -> int:
        """Nanoseconds since the epoch, as os.utime(ns=...) wants them."""
        return self.sec * 1_000_000_000 + self.nsec


_TIMESPEC = struct.Struct("<QI")
AttrValue = bytes | bytearray | memoryview | int | Timespec | UUID | str


def encode_value(attr: Attr, value: AttrValue) -> bytes:
    """The raw attribute bytes for a Python value (ints sized by the attribute; str as UTF-8)."""
    size = ATTR_SIZE[attr]
    if isinstance(value, Timespec):
        return _TIMESPEC.pack(value.sec, value.nsec)
    if isinstance(value, UUID):
        return value.bytes
    if isinstance(value, int):
        if size not in (4, 8):
            raise ValueError(f"{attr.name} is not an integer attribute")
        return value.to_bytes(size, "little")
    return value.encode() if isinstance(value, str) else bytes(value)


def _missing(kind: Cmd, attr: Attr) -> StreamFormatError:
    return StreamFormatError(f"{kind.name} command has no {attr.name} attribute")


@dataclass(frozen=True)
class Command:
    """One decoded command: its kind and its attributes in stream order (raw bytes, validated).

    The typed properties read the attributes a receiver needs; one the command lacks raises
    StreamFormatError. `data` and `xattr_data` are views into the command's buffer, not copies.
    """

    kind: Cmd
    attrs: Mapping[Attr, bytes | memoryview]

    @classmethod
    def build(cls, kind: Cmd, **values: AttrValue) -> Command:
        """A command from keyword values named after the attributes, e.g. build(Cmd.WRITE, path=b"f", file_offset=0, data=b"x")."""
        attrs = {Attr[name.upper()]: encode_value(Attr[name.upper()], value) for name, value in values.items()}
        command = cls(kind, attrs)
        command.validate()
        return command

    def validate(self, version: int = 2) -> None:
        """Raise StreamFormatError unless the attributes are exactly what this kind of command carries."""
        spec = SPECS[self.kind]
        for attr, raw in self.attrs.items():
            if attr not in spec.required and attr not in spec.optional:
                raise StreamFormatError(f"{self.kind.name} command carries an unexpected {attr.name} attribute")
            size = ATTR_SIZE[attr]
            if size is not None and len(raw) != size:
                raise StreamFormatError(f"{attr.name} attribute of {len(raw)} bytes in a {self.kind.name} command (expected {size})")
        for attr in spec.required:
            if attr not in self.attrs:
                raise _missing(self.kind, attr)
        if version >= 2 and Attr.DATA in self.attrs and tuple(self.attrs)[-1] != Attr.DATA:
            raise StreamFormatError(f"DATA is not the last attribute of a {self.kind.name} command (protocol 2 requires it)")

    def raw(self, attr: Attr) -> bytes | memoryview:
        try:
            return self.attrs[attr]
        except KeyError:
            raise _missing(self.kind, attr) from None

    def _int(self, attr: Attr) -> int:
        return int.from_bytes(self.raw(attr), "little")

    def _bytes(self, attr: Attr) -> bytes:
        return bytes(self.raw(attr))

    def _view(self, attr: Attr) -> memoryview:
        return memoryview(self.raw(attr))

    def _time(self, attr: Attr) -> Timespec:
        return Timespec(*_TIMESPEC.unpack(self.raw(attr)))

    def _uuid(self, attr: Attr) -> UUID:
        return UUID(bytes=bytes(self.raw(attr)))

    @cached_property
    def path(self) -> bytes:
        """Raw bytes as the sender holds them, relative to the subvolume (b"" is its root): confine with safe_path_parts."""
        return self._bytes(Attr.PATH)

    @property
    def path_to(self) -> bytes:
        return self._bytes(Attr.PATH_TO)

    @property
    def path_link(self) -> bytes:
        return self._bytes(Attr.PATH_LINK)

    @property
    def clone_path(self) -> bytes:
        return self._bytes(Attr.CLONE_PATH)

    @property
    def xattr_name(self) -> bytes:
        return self._bytes(Attr.XATTR_NAME)

    @property
    def ctransid(self) -> int:
        return self._int(Attr.CTRANSID)

    @property
    def ino(self) -> int:
        return self._int(Attr.INO)

    @property
    def mode(self) -> int:
        return self._int(Attr.MODE)

    @property
    def uid(self) -> int:
        return self._int(Attr.UID)

    @property
    def gid(self) -> int:
        return self._int(Attr.GID)

    @property
    def rdev(self) -> int:
        return self._int(Attr.RDEV)

    @property
    def size(self) -> int:
        return self._int(Attr.SIZE)

    @property
    def file_offset(self) -> int:
        return self._int(Attr.FILE_OFFSET)

    @property
    def clone_ctransid(self) -> int:
        return self._int(Attr.CLONE_CTRANSID)

    @property
    def clone_offset(self) -> int:
        return self._int(Attr.CLONE_OFFSET)

    @property
    def clone_len(self) -> int:
        return self._int(Attr.CLONE_LEN)

    @property
    def fallocate_mode(self) -> int:
        return self._int(Attr.FALLOCATE_MODE)

    @property
    def fileattr(self) -> int:
        return self._int(Attr.FILEATTR)

    @property
    def unencoded_file_len(self) -> int:
        return self._int(Attr.UNENCODED_FILE_LEN)

    @property
    def unencoded_len(self) -> int:
        return self._int(Attr.UNENCODED_LEN)

    @property
    def unencoded_offset(self) -> int:
        return self._int(Attr.UNENCODED_OFFSET)

    @property
    def uuid(self) -> UUID:
        return self._uuid(Attr.UUID)

    @property
    def clone_uuid(self) -> UUID:
        return self._uuid(Attr.CLONE_UUID)

    @property
    def atime(self) -> Timespec:
        return self._time(Attr.ATIME)

    @property
    def mtime(self) -> Timespec:
        return self._time(Attr.MTIME)

    @property
    def ctime(self) -> Timespec:
        return self._time(Attr.CTIME)

    @property
    def otime(self) -> Timespec:
        return self._time(Attr.OTIME)

    @property
    def data(self) -> memoryview:
        """The file data of WRITE or ENCODED_WRITE: a view into the command buffer."""
        return self._view(Attr.DATA)

    @property
    def xattr_data(self) -> memoryview:
        return self._view(Attr.XATTR_DATA)

    @property
    def compression(self) -> int:
        """0 (none) when absent, as btrfs receive takes it."""
        return self._int(Attr.COMPRESSION) if Attr.COMPRESSION in self.attrs else Compression.NONE

    @property
    def encryption(self) -> int:
        return self._int(Attr.ENCRYPTION) if Attr.ENCRYPTION in self.attrs else 0
