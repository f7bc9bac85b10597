"""ZFS send stream records: layout constants, BEGIN/END encoding and payload sizes (pure, no I/O)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum

from snapferry.codec.fletcher import Fletcher4
from snapferry.errors import StreamFormatError

HEADER_SIZE = 312
# Modern OpenZFS stores the running stream checksum in the last 32 bytes of every non-BEGIN
# header; pool-v23 streams leave those bytes zero and no v23 record struct reaches them.
STAMP_OFFSET = 280
STAMP_SIZE = 32

BEGIN_MAGIC = 0x2F5BACBAC
BEGIN_MAGIC_SWAPPED = int.from_bytes(BEGIN_MAGIC.to_bytes(8, "little"), "big")

SUBSTREAM = 1
COMPOUNDSTREAM = 2
FEATURE_DEDUP = 1 << 0
FEATURE_DEDUPPROPS = 1 << 1
FLAG_CLONE = 1 << 0

MAX_TONAME = 256
# Bounds checked before any allocation: SPA_MAXBLOCKSIZE is 16 MiB; a BEGIN nvlist for a
# single (non -R) stream is a few KiB; a bonus buffer is at most one 16 KiB dnode.
MAX_BLOCK = 16 << 20
MAX_BEGIN_PAYLOAD = 1 << 20
MAX_BONUS = 1 << 16
MAX_EMBEDDED = 112


class RecordType(IntEnum):
    BEGIN = 0
    OBJECT = 1
    FREEOBJECTS = 2
    WRITE = 3
    FREE = 4
    END = 5
    WRITE_BYREF = 6
    SPILL = 7
    WRITE_EMBEDDED = 8
    OBJECT_RANGE = 9
    REDACT = 10


_BEGIN = struct.Struct("<IIQQQIIQQ256s")
_END = struct.Struct("<II32sQ")


def _round8(n: int) -> int:
    return (n + 7) & ~7


def record_type(header: bytes | bytearray | memoryview, offset: int) -> RecordType:
    (raw,) = struct.unpack_from("<I", header, 0)
    try:
        return RecordType(raw)
    except ValueError:
        raise StreamFormatError(f"unknown record type {raw} at byte {offset}: not a ZFS send stream, or corrupt") from None


def payload_size(kind: RecordType, header: bytes | bytearray | memoryview, offset: int) -> int:
    """Bytes that follow this record's header, validated against format limits."""
    if kind == RecordType.BEGIN:
        (size,) = struct.unpack_from("<I", header, 4)
        limit = MAX_BEGIN_PAYLOAD
    elif kind == RecordType.OBJECT:
        bonuslen, raw_bonuslen = struct.unpack_from("<I4xI", header, 28)
        size = raw_bonuslen if raw_bonuslen else _round8(bonuslen)
        limit = MAX_BONUS
    elif kind == RecordType.WRITE:
        (logical,) = struct.unpack_from("<Q", header, 32)
        compression = header[50]
        (compressed,) = struct.unpack_from("<Q", header, 96)
        size = compressed if compression else logical
        limit = MAX_BLOCK
    elif kind == RecordType.SPILL:
        length, compressed = struct.unpack_from("<Q16xQ", header, 16)
        size = compressed if compressed else length
        limit = MAX_BLOCK
    elif kind == RecordType.WRITE_EMBEDDED:
        (psize,) = struct.unpack_from("<I", header, 52)
        size = _round8(psize)
        limit = MAX_EMBEDDED
    else:
        return 0
    if size > limit:
        raise StreamFormatError(f"{kind.name} record at byte {offset} claims a {size}-byte payload (limit {limit}): corrupt stream")
    if size % 4:
        raise StreamFormatError(f"{kind.name} record at byte {offset} has a payload of {size} bytes, not whole words: corrupt stream")
    return int(size)


@dataclass(frozen=True)
class Begin:
    """The fields of a BEGIN record (its nvlist payload, if any, travels separately)."""

    versioninfo: int
    creation_time: int
    objset_type: int
    flags: int
    toguid: int
    fromguid: int
    toname: str
    payloadlen: int = 0

    @property
    def header_type(self) -> int:
        return self.versioninfo & 3

    @property
    def features(self) -> int:
        return self.versioninfo >> 2

    @property
    def is_incremental(self) -> bool:
        return self.fromguid != 0

    @property
    def snapshot_name(self) -> str:
        """The part of toname after '@', which `zfs receive FS` uses as the new snapshot's name."""
        return self.toname.partition("@")[2]

    @classmethod
    def decode(cls, header: bytes | bytearray | memoryview) -> Begin:
        kind, payloadlen, magic, versioninfo, ctime, ostype, flags, toguid, fromguid, name = _BEGIN.unpack_from(header, 0)
        if kind != RecordType.BEGIN:
            raise StreamFormatError(f"stream does not start with a BEGIN record (record type {kind}): not a ZFS send stream")
        if magic == BEGIN_MAGIC_SWAPPED:
            raise StreamFormatError("stream was written by a host of the other byte order; byte-swapped streams are not supported")
        if magic != BEGIN_MAGIC:
            raise StreamFormatError(f"bad magic 0x{magic:x} in BEGIN record: not a ZFS send stream")
        begin = cls(versioninfo, ctime, ostype, flags, toguid, fromguid, name.split(b"\0", 1)[0].decode("utf-8", "replace"), payloadlen)
        begin.check_supported()
        return begin

    def check_supported(self) -> None:
        if self.header_type == COMPOUNDSTREAM:
            raise StreamFormatError("compound stream (zfs send -R) is not supported yet: send each dataset's snapshot separately")
        if self.header_type != SUBSTREAM:
            raise StreamFormatError(f"unknown stream header type {self.header_type} in BEGIN record")
        if self.features & (FEATURE_DEDUP | FEATURE_DEDUPPROPS):
            raise StreamFormatError("deduplicated stream (zfs send -D) is not supported: send without -D")
        if "@" not in self.toname:
            raise StreamFormatError(f"BEGIN record names no snapshot (toname {self.toname!r}): corrupt stream")

    def encode(self) -> bytes:
        name = self.toname.encode()
        if len(name) >= MAX_TONAME:
            raise ValueError(f"snapshot name too long for a stream: {self.toname}")
        return _BEGIN.pack(
            RecordType.BEGIN,
            self.payloadlen,
            BEGIN_MAGIC,
            self.versioninfo,
            self.creation_time,
            self.objset_type,
            self.flags,
            self.toguid,
            self.fromguid,
            name,
        )

    def derive(self, *, toguid: int, fromguid: int, toname: str) -> Begin:
        """A BEGIN for a piece or continuation: same stream kind, new identity.

        Only the first piece of a stream may be a clone; every later one is a plain incremental.
        """
        flags = self.flags if fromguid == self.fromguid else self.flags & ~FLAG_CLONE
        return replace(self, toguid=toguid, fromguid=fromguid, toname=toname, flags=flags)


def end_header(checksum: Fletcher4, toguid: int) -> bytearray:
    """An END record header carrying the checksum of everything before it (stamp left zero)."""
    header = bytearray(HEADER_SIZE)
    _END.pack_into(header, 0, RecordType.END, 0, checksum.to_bytes(), toguid)
    return header


def end_checksum(header: bytes | bytearray | memoryview) -> Fletcher4:
    return Fletcher4.from_bytes(memoryview(header)[8:40])
