"""The compound BEGIN that starts a `zfs send -R` stream: its nvlist read as a ReplicationHeader, and its records rebuilt (pure)."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import cast

from snapferry.core.streamio import Readable, read_exact
from snapferry.errors import StreamFormatError, StreamIntegrityError, StreamTruncated
from snapferry.zfs.codec import nvlist
from snapferry.zfs.codec.fletcher import Fletcher4
from snapferry.zfs.codec.nvlist import NvList, NvPair, NvType
from snapferry.zfs.codec.nvlist_xdr import ENCODE_XDR, encode_xdr
from snapferry.zfs.codec.records import COMPOUNDSTREAM, HEADER_SIZE, MAX_BEGIN_PAYLOAD, Begin, RecordType, end_checksum, end_header

# libzfs names each file system in `fss` by its guid printed with "0x%llx".
_GUID_KEY = re.compile(r"0x[0-9a-f]{1,16}")

PropValue = str | int


@dataclass(frozen=True)
class FileSystem:
    """One file system of the tree, as the header describes it.

    `snaps` maps snapshot name to guid in the header's own order. That is not a creation order in
    general: zfs-fuse lists tp/x's snapshots a, b, c (created in that order) as c, b, a. Where the
    order matters, the substreams give it. `origin` is the guid of a clone's origin snapshot.
    """

    guid: int
    name: str
    parent_from_snap_guid: int
    props: Mapping[str, PropValue]
    snaps: Mapping[str, int]
    snapprops: Mapping[str, Mapping[str, PropValue]]
    origin: int | None
    nvlist: NvList


@dataclass(frozen=True)
class ReplicationHeader:
    """The packed nvlist of a compound BEGIN. `nvlist` is kept as sent, so an unmodified header re-packs byte for byte."""

    tosnap: str
    fromsnap: str | None
    recursive: bool
    raw: bool
    filesystems: tuple[FileSystem, ...]
    nvlist: NvList
    big_endian_host: bool = False

    @classmethod
    def from_payload(cls, payload: bytes | bytearray | memoryview) -> ReplicationHeader:
        """Read a compound BEGIN's payload; anything but an XDR nvlist laid out as libzfs lays it out raises StreamFormatError."""
        data = bytes(payload)
        if data[:1] != bytes([ENCODE_XDR]):
            raise StreamFormatError("the compound BEGIN's payload is not an XDR-encoded nvlist: corrupt stream")
        return cls.from_nvlist(nvlist.decode(data), big_endian_host=data[1] == 0)

    @classmethod
    def from_nvlist(cls, nvl: NvList, *, big_endian_host: bool = False) -> ReplicationHeader:
        tosnap = _string(nvl, "tosnap", "the -R header")
        if tosnap is None:
            raise StreamFormatError("the -R header names no tosnap: corrupt stream")
        fss = _nvlist(nvl, "fss", "the -R header")
        if fss is None:
            raise StreamFormatError("the -R header has no fss list: corrupt stream")
        filesystems = []
        seen: set[int] = set()
        for pair in fss:
            if not _GUID_KEY.fullmatch(pair.name):
                raise StreamFormatError(f"the -R header's fss holds {pair.name!r}, not a file system guid: corrupt stream")
            guid = int(pair.name, 16)
            if guid in seen:
                raise StreamFormatError(f"the -R header lists file system {pair.name} twice: corrupt stream")
            seen.add(guid)
            if pair.type is not NvType.NVLIST:
                raise StreamFormatError(f"file system {pair.name} in the -R header is a {pair.type.name}, not an NVLIST: corrupt stream")
            filesystems.append(_filesystem(guid, pair.name, _as_nvlist(pair)))
        return cls(
            tosnap=tosnap,
            fromsnap=_string(nvl, "fromsnap", "the -R header"),
            recursive=not _flag(nvl, "not_recursive"),
            raw=_flag(nvl, "raw"),
            filesystems=tuple(filesystems),
            nvlist=nvl,
            big_endian_host=big_endian_host,
        )

    def to_payload(self) -> bytes:
        """The XDR payload, as libzfs packs it; the bytes read for an unmodified header."""
        return encode_xdr(self.nvlist, big_endian_host=self.big_endian_host)

    def filesystem(self, guid: int) -> FileSystem | None:
        return next((fs for fs in self.filesystems if fs.guid == guid), None)

    def without_filesystems(self, guids: Iterable[int]) -> ReplicationHeader:
        """The same header without the named file systems (their fss entries dropped, the rest kept in order)."""
        dropped = set(guids)
        keep = tuple(fs for fs in self.filesystems if fs.guid not in dropped)
        fss_pairs = tuple(NvPair(f"0x{fs.guid:x}", NvType.NVLIST, fs.nvlist) for fs in keep)
        pairs = tuple(NvPair("fss", NvType.NVLIST, NvList(fss_pairs, _as_nvlist(p).nvflag)) if p.name == "fss" else p for p in self.nvlist)
        return replace(self, filesystems=keep, nvlist=NvList(pairs, self.nvlist.nvflag))


def _filesystem(guid: int, key: str, nvl: NvList) -> FileSystem:
    where = f"file system {key} in the -R header"
    name = _string(nvl, "name", where)
    if name is None:
        raise StreamFormatError(f"{where} has no name: corrupt stream")
    parent = _uint64(nvl, "parentfromsnap", where)
    origin = _uint64(nvl, "origin", where)
    snaps_list = _nvlist(nvl, "snaps", where) or NvList()
    snaps = {}
    for pair in snaps_list:
        if pair.type is not NvType.UINT64:
            raise StreamFormatError(
                f"snapshot {pair.name!r} of {name} in the -R header is a {pair.type.name}, not a UINT64: corrupt stream"
            )
        snaps[pair.name] = cast(int, pair.value)
    snapprops = {}
    for pair in _nvlist(nvl, "snapprops", where) or NvList():
        if pair.type is not NvType.NVLIST:
            raise StreamFormatError(f"the properties of {name}@{pair.name} in the -R header are a {pair.type.name}, not an NVLIST")
        snapprops[pair.name] = _props(_as_nvlist(pair), f"{name}@{pair.name}")
    return FileSystem(
        guid=guid,
        name=name,
        parent_from_snap_guid=0 if parent is None else parent,
        props=_props(_nvlist(nvl, "props", where) or NvList(), name),
        snaps=MappingProxyType(snaps),
        snapprops=MappingProxyType(snapprops),
        origin=origin,
        nvlist=nvl,
    )


def _props(nvl: NvList, owner: str) -> Mapping[str, PropValue]:
    """Property name to value: libzfs sends numeric (and index) properties as UINT64, the rest (user properties too) as STRING."""
    props: dict[str, PropValue] = {}
    for pair in nvl:
        if pair.type not in (NvType.STRING, NvType.UINT64):
            kind = pair.type.name
            raise StreamFormatError(
                f"property {pair.name!r} of {owner} in the -R header is a {kind}, not a STRING or UINT64: corrupt stream"
            )
        props[pair.name] = cast(PropValue, pair.value)
    return MappingProxyType(props)


def _find(nvl: NvList, name: str, kind: NvType, where: str) -> NvPair | None:
    pair = nvl.get(name)
    if pair is not None and pair.type is not kind:
        raise StreamFormatError(f"{name} in {where} is a {pair.type.name}, not a {kind.name}: corrupt stream")
    return pair


def _string(nvl: NvList, name: str, where: str) -> str | None:
    pair = _find(nvl, name, NvType.STRING, where)
    return None if pair is None else str(pair.value)


def _uint64(nvl: NvList, name: str, where: str) -> int | None:
    pair = _find(nvl, name, NvType.UINT64, where)
    return None if pair is None else cast(int, pair.value)


def _nvlist(nvl: NvList, name: str, where: str) -> NvList | None:
    pair = _find(nvl, name, NvType.NVLIST, where)
    return None if pair is None else _as_nvlist(pair)


def _flag(nvl: NvList, name: str) -> bool:
    return _find(nvl, name, NvType.BOOLEAN, "the -R header") is not None


def _as_nvlist(pair: NvPair) -> NvList:
    value = pair.value
    assert isinstance(value, NvList)
    return value


# --- the header's records -------------------------------------------------------------------------------


def compound_begin(toname: str, *, features: int = 0) -> Begin:
    """The BEGIN record libzfs writes before a -R header: only its type, features and the top snapshot's name are set."""
    return Begin((features << 2) | COMPOUNDSTREAM, 0, 0, 0, 0, 0, toname)


def header_records(begin: Begin, payload: bytes) -> bytes:
    """The compound BEGIN with `payload`, then the END whose checksum is the fletcher-4 of the two."""
    if len(payload) > MAX_BEGIN_PAYLOAD or len(payload) % 4:
        raise ValueError(f"a -R header of {len(payload)} bytes cannot be sent (whole words, at most {MAX_BEGIN_PAYLOAD})")
    head = replace(begin, payloadlen=len(payload)).encode() + payload
    return head + bytes(end_header(Fletcher4().update(head), 0))


# What ends a compound stream: an END record with no checksum and no guid.
FINAL_END = RecordType.END.to_bytes(4, "little") + bytes(HEADER_SIZE - 4)


def property_package(
    filesystem: FileSystem, toname: str, toguid: int, *, leave_out: Collection[str] = (), features: int = 0
) -> tuple[bytes, bytes]:
    """What makes one substream into `toname` (guid `toguid`) a one-file-system package, as `zfs send -p` writes it:
    (the records before the substream, the record after it). `zfs receive` then sets the file system's properties,
    less `leave_out`, and the snapshot's own, as *received*, which `zfs set` cannot do. No `fromsnap` is named, so
    zfs receive renames and destroys nothing around it."""
    snapname = toname.partition("@")[2]
    props = NvList(tuple(p for p in _nvlist_or_empty(filesystem.nvlist, "props") if p.name not in leave_out))
    fs_pairs = [
        NvPair("name", NvType.STRING, filesystem.name),
        NvPair("parentfromsnap", NvType.UINT64, filesystem.parent_from_snap_guid),
        NvPair("props", NvType.NVLIST, props),
        NvPair("snaps", NvType.NVLIST, NvList((NvPair(snapname, NvType.UINT64, toguid),))),
    ]
    snapprops = _nvlist_or_empty(filesystem.nvlist, "snapprops").get(snapname)
    if snapprops is not None:
        fs_pairs.append(NvPair("snapprops", NvType.NVLIST, NvList((snapprops,))))
    fss = NvList((NvPair(f"0x{filesystem.guid:x}", NvType.NVLIST, NvList(tuple(fs_pairs))),))
    package = NvList(
        (NvPair("tosnap", NvType.STRING, snapname), NvPair("not_recursive", NvType.BOOLEAN, None), NvPair("fss", NvType.NVLIST, fss))
    )
    return header_records(compound_begin(toname, features=features), encode_xdr(package)), FINAL_END


def _nvlist_or_empty(nvl: NvList, name: str) -> NvList:
    pair = nvl.get(name)
    return _as_nvlist(pair) if pair is not None and pair.type is NvType.NVLIST else NvList()


def read_header(data: bytes | bytearray | memoryview) -> tuple[Begin, ReplicationHeader, int]:
    """The compound BEGIN at the start of `data`, its header, and where its END record ends (the first substream's offset).

    The END's checksum is verified (StreamIntegrityError); a cut raises StreamTruncated; anything else
    that is not a compound header raises StreamFormatError.
    """
    view = memoryview(data)
    if len(view) < HEADER_SIZE:
        raise StreamTruncated(f"input ended inside the compound BEGIN record ({len(view)} of {HEADER_SIZE} bytes)")
    begin = Begin.decode(view[:HEADER_SIZE], supported_only=False)
    if begin.header_type != COMPOUNDSTREAM:
        raise StreamFormatError(f"stream header type {begin.header_type} is not a compound stream (zfs send -R)")
    if begin.payloadlen > MAX_BEGIN_PAYLOAD or begin.payloadlen % 4:
        size = begin.payloadlen
        raise StreamFormatError(
            f"the compound BEGIN claims a {size}-byte payload (whole words, at most {MAX_BEGIN_PAYLOAD}): corrupt stream"
        )
    end_at = HEADER_SIZE + begin.payloadlen
    if len(view) < end_at + HEADER_SIZE:
        raise StreamTruncated(f"input ended inside the -R header at byte {len(view)}, before its END record at byte {end_at}")
    end = view[end_at : end_at + HEADER_SIZE]
    if (kind := int.from_bytes(end[:4], "little")) != RecordType.END:
        raise StreamFormatError(f"the -R header is followed by record type {kind}, not its END: corrupt stream")
    if end_checksum(end) != Fletcher4().update(view[:end_at]):
        raise StreamIntegrityError("the -R header's END checksum does not match its BEGIN record and payload", 0)
    header = ReplicationHeader.from_payload(view[HEADER_SIZE:end_at])
    return begin, header, end_at + HEADER_SIZE


def read_compound_header(source: Readable) -> tuple[bytes, Begin, ReplicationHeader]:
    """read_header() on a stream: the compound BEGIN, its nvlist and its END as they came, and parsed (checked)."""
    head = bytearray(HEADER_SIZE)
    got = read_exact(source, memoryview(head))
    begin = Begin.decode(head, supported_only=False) if got == HEADER_SIZE else None
    rest = bytearray(min(begin.payloadlen, MAX_BEGIN_PAYLOAD + 1) + HEADER_SIZE if begin else 0)
    got += read_exact(source, memoryview(rest))
    data = bytes((head + rest)[:got])
    begin, header, end = read_header(data)
    return data[:end], begin, header
