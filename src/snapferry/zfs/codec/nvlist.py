"""Packed nvlists: their types, the native encoding (either byte order), and printing as nvlist_print does (pure).

The XDR encoding lives in nvlist_xdr; decode() and encode() here take either.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Union, cast

from snapferry.errors import NvlistError

NV_VERSION = 0
NV_UNIQUE_NAME = 0x1
# The OpenZFS kernel refuses to pack or unpack lists nested deeper than this (nvpair_max_recursion),
# so nothing a pool or a send stream holds goes further; it also keeps our recursion shallow.
MAX_DEPTH = 20

_ENCODE_NATIVE = 0
_ENCODE_XDR = 1
_MASK64 = (1 << 64) - 1
_INT32_MAX = (1 << 31) - 1
# nvpair_t as it is copied into the stream: nvp_size, nvp_name_sz, nvp_reserve, nvp_value_elem, nvp_type.
_PAIR_HEAD = "ihhii"
_PAIR_HEAD_SIZE = 16
# A pair's NVLIST value is the embedded list's nvlist_t: nvl_version, nvl_nvflag, nvl_priv (a pointer,
# zeroed when packed), nvl_flag, nvl_pad; the list's own pairs follow the pair in the stream.
_EMBEDDED = "iIQIi"
_EMBEDDED_SIZE = 24
# An NVLIST_ARRAY or STRING_ARRAY value starts with one (zeroed) 64-bit pointer per element.
_POINTER_SIZE = 8
# The smallest pair: a one-byte name (just its NUL) and no value.
_MIN_PAIR = 24


class NvType(IntEnum):
    """libnvpair's data_type_t; DOUBLE (27) exists only in userland lists and is not supported."""

    BOOLEAN = 1
    BYTE = 2
    INT16 = 3
    UINT16 = 4
    INT32 = 5
    UINT32 = 6
    INT64 = 7
    UINT64 = 8
    STRING = 9
    BYTE_ARRAY = 10
    INT16_ARRAY = 11
    UINT16_ARRAY = 12
    INT32_ARRAY = 13
    UINT32_ARRAY = 14
    INT64_ARRAY = 15
    UINT64_ARRAY = 16
    STRING_ARRAY = 17
    HRTIME = 18
    NVLIST = 19
    NVLIST_ARRAY = 20
    BOOLEAN_VALUE = 21
    INT8 = 22
    UINT8 = 23
    BOOLEAN_ARRAY = 24
    INT8_ARRAY = 25
    UINT8_ARRAY = 26


# Per type, the Python value: BOOLEAN None; BOOLEAN_VALUE bool; integers and HRTIME int; STRING str;
# NVLIST NvList; BYTE_ARRAY and UINT8_ARRAY bytes; BOOLEAN_ARRAY tuple[bool, ...]; other integer
# arrays tuple[int, ...]; STRING_ARRAY tuple[str, ...]; NVLIST_ARRAY tuple[NvList, ...].
NvValue = Union[None, bool, int, str, bytes, "NvList", tuple[int, ...], tuple[str, ...], tuple["NvList", ...]]

# Fixed-size values: struct code (boolean_t is a C enum, 4 bytes) and the inclusive range.
SCALARS: dict[NvType, tuple[str, int, int]] = {
    NvType.BOOLEAN_VALUE: ("i", 0, 1),
    NvType.BYTE: ("B", 0, 0xFF),
    NvType.INT8: ("b", -(1 << 7), (1 << 7) - 1),
    NvType.UINT8: ("B", 0, 0xFF),
    NvType.INT16: ("h", -(1 << 15), (1 << 15) - 1),
    NvType.UINT16: ("H", 0, 0xFFFF),
    NvType.INT32: ("i", -(1 << 31), (1 << 31) - 1),
    NvType.UINT32: ("I", 0, 0xFFFFFFFF),
    NvType.INT64: ("q", -(1 << 63), (1 << 63) - 1),
    NvType.UINT64: ("Q", 0, _MASK64),
    NvType.HRTIME: ("q", -(1 << 63), (1 << 63) - 1),
}
ARRAY_ELEMENTS: dict[NvType, NvType] = {
    NvType.BOOLEAN_ARRAY: NvType.BOOLEAN_VALUE,
    NvType.BYTE_ARRAY: NvType.BYTE,
    NvType.INT8_ARRAY: NvType.INT8,
    NvType.UINT8_ARRAY: NvType.UINT8,
    NvType.INT16_ARRAY: NvType.INT16,
    NvType.UINT16_ARRAY: NvType.UINT16,
    NvType.INT32_ARRAY: NvType.INT32,
    NvType.UINT32_ARRAY: NvType.UINT32,
    NvType.INT64_ARRAY: NvType.INT64,
    NvType.UINT64_ARRAY: NvType.UINT64,
}
_BYTES_ARRAYS = (NvType.BYTE_ARRAY, NvType.UINT8_ARRAY)


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class NvPair:
    """One name/value pair; see NvValue for which Python type each NvType's value has."""

    name: str
    type: NvType
    value: NvValue = None


@dataclass(frozen=True)
class NvList:
    """An nvlist's pairs in their packed order (duplicates kept, as libnvpair keeps them) and its nvflag."""

    pairs: tuple[NvPair, ...] = ()
    nvflag: int = NV_UNIQUE_NAME

    def __iter__(self) -> Iterator[NvPair]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, name: str) -> NvPair | None:
        """The first pair called `name`, if any."""
        return next((pair for pair in self.pairs if pair.name == name), None)


# --- decoding ---------------------------------------------------------------------------------------


def decode(data: bytes | bytearray | memoryview) -> NvList:
    """Unpack a whole packed nvlist, as nvlist_unpack does, but refusing bytes after its end.

    Every malformed input raises NvlistError; work and memory stay proportional to len(data).
    """
    buf = bytes(data)
    if len(buf) < 4 + 8 + 4:
        raise NvlistError(f"{len(buf)} bytes are too few for a packed nvlist")
    encoding, endian = buf[0], buf[1]
    if encoding == _ENCODE_XDR:
        # Imported here: nvlist_xdr builds on this module's types.
        from snapferry.zfs.codec.nvlist_xdr import decode_xdr

        return decode_xdr(buf)
    if encoding != _ENCODE_NATIVE:
        raise NvlistError(f"unknown encoding {encoding}")
    if endian > 1:
        raise NvlistError(f"unknown byte order {endian}")
    decoder = _Decoder(buf, "<" if endian else ">")
    version, nvflag = struct.unpack_from(decoder.order + "iI", buf, 4)
    if version != NV_VERSION:
        raise NvlistError(f"nvlist version {version} is not {NV_VERSION}")
    decoder.pos = 12
    nvl = decoder.pairs(nvflag, 0)
    if decoder.pos != len(buf):
        raise NvlistError(f"{len(buf) - decoder.pos} bytes follow its end at byte {decoder.pos}")
    return nvl


class _Decoder:
    def __init__(self, buf: bytes, order: str) -> None:
        self.buf = buf
        self.order = order
        self.pos = 0

    def pairs(self, nvflag: int, depth: int) -> NvList:
        buf, order = self.buf, self.order
        pairs: list[NvPair] = []
        while True:
            start = self.pos
            if start + 4 > len(buf):
                raise NvlistError(f"it ends at byte {len(buf)}, inside a list (its end mark is missing)")
            (size,) = struct.unpack_from(order + "i", buf, start)
            if size == 0:
                self.pos = start + 4
                return NvList(tuple(pairs), nvflag)
            if size < _MIN_PAIR or size > len(buf) - start:
                raise NvlistError(f"the pair at byte {start} claims {size} bytes, with {len(buf) - start} left")
            _, name_sz, _, nelem, type_code = struct.unpack_from(order + _PAIR_HEAD, buf, start)
            name_end = start + _PAIR_HEAD_SIZE + name_sz
            if name_sz <= 0 or _align8(_PAIR_HEAD_SIZE + name_sz) > size:
                raise NvlistError(f"the pair at byte {start} has a name size of {name_sz} in a {size}-byte pair")
            if buf.find(0, start + _PAIR_HEAD_SIZE, name_end) != name_end - 1:
                raise NvlistError(f"the name of the pair at byte {start} is not one NUL-terminated string")
            name = buf[start + _PAIR_HEAD_SIZE : name_end - 1].decode("utf-8", "surrogateescape")
            try:
                kind = NvType(type_code)
            except ValueError:
                raise NvlistError(f"pair {name!r} at byte {start} has unsupported data type {type_code}") from None
            self.pos = start + size
            value_start = start + _align8(_PAIR_HEAD_SIZE + name_sz)
            value = self.value(kind, nelem, value_start, start + size, f"pair {name!r} ({kind.name}) at byte {start}", depth)
            pairs.append(NvPair(name, kind, value))

    def value(self, kind: NvType, nelem: int, start: int, end: int, where: str, depth: int) -> NvValue:
        """The value in buf[start:end] (and, for embedded lists, the pairs that follow `end`)."""
        buf, order = self.buf, self.order
        array = kind in ARRAY_ELEMENTS or kind in (NvType.STRING_ARRAY, NvType.NVLIST_ARRAY)
        wanted = "any number of elements" if array else ("no value" if kind is NvType.BOOLEAN else "one element")
        if (array and nelem < 0) or (not array and nelem != (0 if kind is NvType.BOOLEAN else 1)):
            raise NvlistError(f"{where} has {nelem} elements, wants {wanted}")
        # The fixed part of the value must fit before anything is read or allocated from nelem.
        if kind in SCALARS:
            fixed = struct.calcsize(SCALARS[kind][0])
        elif kind in ARRAY_ELEMENTS:
            fixed = nelem * struct.calcsize(SCALARS[ARRAY_ELEMENTS[kind]][0])
        elif kind is NvType.STRING_ARRAY:
            fixed = nelem * _POINTER_SIZE
        elif kind is NvType.NVLIST:
            fixed = _EMBEDDED_SIZE
        elif kind is NvType.NVLIST_ARRAY:
            fixed = nelem * (_POINTER_SIZE + _EMBEDDED_SIZE)
        else:
            fixed = 0
        if _align8(fixed) > end - start:
            raise NvlistError(f"{where} needs {fixed} bytes for its {nelem} elements, has {end - start}")
        value: NvValue
        used = fixed
        if kind is NvType.BOOLEAN:
            value = None
        elif kind in SCALARS:
            (number,) = struct.unpack_from(order + SCALARS[kind][0], buf, start)
            value = self.boolean(number, where) if kind is NvType.BOOLEAN_VALUE else number
        elif kind in _BYTES_ARRAYS:
            value = buf[start : start + nelem]
        elif kind in ARRAY_ELEMENTS:
            numbers = struct.unpack_from(f"{order}{nelem}{SCALARS[ARRAY_ELEMENTS[kind]][0]}", buf, start)
            value = tuple(self.boolean(n, where) for n in numbers) if kind is NvType.BOOLEAN_ARRAY else numbers
        elif kind is NvType.STRING:
            text, after = self.string(start, end, where)
            value, used = text, after - start
        elif kind is NvType.STRING_ARRAY:
            texts = []
            after = start + fixed
            for _ in range(nelem):
                text, after = self.string(after, end, where)
                texts.append(text)
            value, used = tuple(texts), after - start
        else:
            lists = []
            headers = start if kind is NvType.NVLIST else start + nelem * _POINTER_SIZE
            for i in range(nelem):
                version, nvflag, _, _, _ = struct.unpack_from(order + _EMBEDDED, buf, headers + i * _EMBEDDED_SIZE)
                if version != NV_VERSION:
                    raise NvlistError(f"{where} embeds an nvlist of version {version}")
                if depth >= MAX_DEPTH:
                    raise NvlistError(f"{where} nests lists more than {MAX_DEPTH} deep")
                lists.append(self.pairs(nvflag, depth + 1))
            value = lists[0] if kind is NvType.NVLIST else tuple(lists)
        # libnvpair's own check: the pair is exactly as long as its name and value, each padded to 8.
        if _align8(used) != end - start:
            raise NvlistError(f"{where} has {end - start} bytes for a {used}-byte value")
        return value

    def boolean(self, number: int, where: str) -> bool:
        if number not in (0, 1):
            raise NvlistError(f"{where} holds {number}, not a boolean")
        return number == 1

    def string(self, start: int, end: int, where: str) -> tuple[str, int]:
        """The C string at `start` (its NUL before `end`) and the position just after that NUL."""
        nul = self.buf.find(0, start, end)
        if nul < 0:
            raise NvlistError(f"{where} has a string without its terminating NUL")
        return self.buf[start:nul].decode("utf-8", "surrogateescape"), nul + 1


# --- encoding ---------------------------------------------------------------------------------------


def encode(nvl: NvList, *, big_endian: bool = False, xdr: bool = False) -> bytes:
    """Pack `nvl` as fnvlist_pack does on a little-endian (or, if asked, big-endian) host; in XDR if asked.

    Values that cannot be packed (wrong Python type, out of range, a NUL in a string, lists nested
    deeper than MAX_DEPTH) raise ValueError.
    """
    if xdr:
        from snapferry.zfs.codec.nvlist_xdr import encode_xdr

        return encode_xdr(nvl, big_endian_host=big_endian)
    order = ">" if big_endian else "<"
    out = bytearray([_ENCODE_NATIVE, 0 if big_endian else 1, 0, 0])
    out += struct.pack(order + "iI", NV_VERSION, _nvflag(nvl))
    _encode_pairs(nvl, order, 0, out)
    return bytes(out)


def _nvflag(nvl: NvList) -> int:
    if not isinstance(nvl, NvList):
        raise ValueError(f"{nvl!r} is not an NvList")
    if not 0 <= nvl.nvflag <= 0xFFFFFFFF:
        raise ValueError(f"nvflag {nvl.nvflag} does not fit in 32 bits")
    return nvl.nvflag


def _encode_pairs(nvl: NvList, order: str, depth: int, out: bytearray) -> None:
    for pair in nvl.pairs:
        name = _c_string(pair.name, f"the name {pair.name!r}")
        if len(name) >= 1 << 15:
            raise ValueError(f"the name {pair.name[:40]!r}... does not fit nvp_name_sz, a 16-bit size")
        kind = NvType(pair.type)
        value, nelem, embedded = _encode_value(pair, kind, order)
        size = _align8(_PAIR_HEAD_SIZE + len(name)) + _align8(len(value))
        if size > _INT32_MAX:
            raise ValueError(f"pair {pair.name!r} is too large for an nvpair")
        out += struct.pack(order + _PAIR_HEAD, size, len(name), 0, nelem, kind)
        out += name.ljust(_align8(_PAIR_HEAD_SIZE + len(name)) - _PAIR_HEAD_SIZE, b"\0")
        out += value.ljust(_align8(len(value)), b"\0")
        for sub in embedded:
            if depth >= MAX_DEPTH:
                raise ValueError(f"pair {pair.name!r} nests lists more than {MAX_DEPTH} deep")
            _encode_pairs(sub, order, depth + 1, out)
    out += b"\0\0\0\0"


def _encode_value(pair: NvPair, kind: NvType, order: str) -> tuple[bytes, int, list[NvList]]:
    """The pair's packed value, its element count, and the lists whose pairs follow it."""
    value = pair.value
    where = f"pair {pair.name!r} ({kind.name})"
    if kind is NvType.BOOLEAN:
        if value is not None:
            raise ValueError(f"{where} takes no value, got {value!r}")
        return b"", 0, []
    if kind in SCALARS:
        return _pack_numbers(order, kind, (value,), where), 1, []
    if kind in _BYTES_ARRAYS:
        if not isinstance(value, bytes):
            raise ValueError(f"{where} takes bytes, got {value!r}")
        return value, len(value), []
    if kind in ARRAY_ELEMENTS:
        if not isinstance(value, tuple):
            raise ValueError(f"{where} takes a tuple, got {value!r}")
        return _pack_numbers(order, ARRAY_ELEMENTS[kind], value, where), len(value), []
    if kind is NvType.STRING:
        return _c_string(value, where), 1, []
    if kind is NvType.STRING_ARRAY:
        if not isinstance(value, tuple):
            raise ValueError(f"{where} takes a tuple of str, got {value!r}")
        return bytes(_POINTER_SIZE * len(value)) + b"".join(_c_string(s, where) for s in value), len(value), []
    lists = [value] if kind is NvType.NVLIST else value
    if not isinstance(lists, (list, tuple)) or not all(isinstance(sub, NvList) for sub in lists):
        raise ValueError(f"{where} takes {'an NvList' if kind is NvType.NVLIST else 'a tuple of NvList'}, got {value!r}")
    subs = cast(list[NvList], list(lists))
    headers = b"".join(struct.pack(order + _EMBEDDED, NV_VERSION, _nvflag(sub), 0, 0, 0) for sub in subs)
    pointers = b"" if kind is NvType.NVLIST else bytes(_POINTER_SIZE * len(subs))
    return pointers + headers, len(subs), subs


def _pack_numbers(order: str, kind: NvType, values: tuple[object, ...], where: str) -> bytes:
    code, low, high = SCALARS[kind]
    for v in values:
        if not isinstance(v, int) or not low <= v <= high or (kind is NvType.BOOLEAN_VALUE and not isinstance(v, bool)):
            raise ValueError(f"{where} cannot hold {v!r}")
    return struct.pack(f"{order}{len(values)}{code}", *cast(tuple[int, ...], values))


def _c_string(text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{where} takes a str, got {text!r}")
    raw = text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"{where} contains a NUL")
    return raw + b"\0"


# --- printing ---------------------------------------------------------------------------------------


def format_nvlist(nvl: NvList) -> str:
    """The text nvlist_print(3) writes for `nvl` (libnvpair's defaults), quirks included.

    Those quirks: every member is followed by a newline, even an embedded list whose "(end name)"
    line already ended with one, so a blank line follows it; an empty array prints as a bare newline.
    """
    out: list[str] = []
    _print(nvl, 0, out)
    return "".join(out)


def _print(nvl: NvList, indent: int, out: list[str]) -> None:
    out.append("\t" * indent + f"nvlist version: {NV_VERSION}\n")
    tab = "\t" * (indent + 1)
    for pair in nvl.pairs:
        kind, name, value = pair.type, pair.name, pair.value
        if kind is NvType.NVLIST:
            out.append(f"{tab}{name} = (embedded nvlist)\n")
            _print(cast(NvList, value), indent + 1, out)
            out.append(f"{tab}(end {name})\n")
        elif kind is NvType.NVLIST_ARRAY:
            out.append(f"{tab}{name} = (array of embedded nvlists)\n")
            for i, sub in enumerate(cast(tuple[NvList, ...], value)):
                out.append(f"{tab}(start {name}[{i}])\n")
                _print(sub, indent + 1, out)
                out.append(f"{tab}(end {name}[{i}])\n")
        elif kind is NvType.STRING_ARRAY:
            texts = cast(tuple[str, ...], value)
            if texts:
                out.append(f"{tab}{name} = " + " ".join(texts))
        elif kind in ARRAY_ELEMENTS:
            numbers = cast(tuple[int, ...], value)
            if numbers:
                out.append(f"{tab}{name} = " + " ".join(_print_number(ARRAY_ELEMENTS[kind], n) for n in numbers))
        elif kind is NvType.STRING:
            out.append(f"{tab}{name} = {cast(str, value)}")
        else:
            out.append(f"{tab}{name} = {_print_number(kind, 1 if value is None else cast(int, value))}")
        out.append("\n")


def _print_number(kind: NvType, n: int) -> str:
    if kind is NvType.BYTE:
        return f"0x{n:02x}"
    if kind in (NvType.UINT8, NvType.UINT16, NvType.UINT32, NvType.UINT64, NvType.HRTIME):
        # HRTIME is signed but printed with %llx, i.e. as its 64-bit two's complement.
        return f"0x{n & _MASK64:x}"
    return str(int(n))
