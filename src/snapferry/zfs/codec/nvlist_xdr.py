"""Packed nvlists in libnvpair's XDR encoding, the one `zfs send -R` headers use: decode and encode (pure)."""

from __future__ import annotations

import struct
from typing import cast

from snapferry.errors import NvlistError
from snapferry.zfs.codec.nvlist import ARRAY_ELEMENTS, MAX_DEPTH, NV_VERSION, SCALARS, NvList, NvPair, NvType, NvValue

ENCODE_XDR = 1
_INT32_MAX = (1 << 31) - 1
# Every XDR item is a whole number of 4-byte big-endian units; a value narrower than 32 bits (char,
# short, boolean_t) takes one unit, sign-extended if its C type is signed.
_UNIT = {
    NvType.BOOLEAN_VALUE: "i",
    NvType.BYTE: "i",
    NvType.INT8: "i",
    NvType.UINT8: "i",
    NvType.INT16: "i",
    NvType.UINT16: "I",
    NvType.INT32: "i",
    NvType.UINT32: "I",
    NvType.INT64: "q",
    NvType.UINT64: "Q",
    NvType.HRTIME: "q",
}
# libnvpair packs every char type with xdr_char, which reads a C `char`: signed on the x86 hosts that
# send streams, so a byte above 127 goes out sign-extended. Both extensions are read back.
_CHARS = (NvType.BYTE, NvType.INT8, NvType.UINT8)
_BYTES_ARRAYS = (NvType.BYTE_ARRAY, NvType.UINT8_ARRAY)
# sizeof(nvpair_t) and sizeof(nvlist_t): the decoded (native) size each pair states is built from them.
_NVPAIR_SIZE = 16
_NVLIST_SIZE = 24
# The smallest XDR embedded list: version, nvflag and the two-zero end mark.
_MIN_LIST = 16


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _align8(n: int) -> int:
    return (n + 7) & ~7


# --- sizes ----------------------------------------------------------------------------------------------
# Each packed pair states two sizes: its XDR size as nvs_xdr_nvp_size computes it, and its native
# nvpair_t size. Both are recomputed from the decoded pair and must match, so that every list this
# module accepts re-encodes to the same bytes. (nvs_xdr_nvp_size counts an array's 4-byte element
# count even when an empty array writes no value at all; that quirk is kept.)


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _xdr_string_size(raw: bytes) -> int:
    return 4 + _align4(len(raw))


def _list_size(nvl: NvList) -> int:
    return 8 + sum(_pair_sizes(pair)[0] for pair in nvl.pairs) + 8


def _pair_sizes(pair: NvPair) -> tuple[int, int]:
    """(XDR size, native size) of a pair whose value has been checked against its type."""
    kind, value = pair.type, pair.value
    head = 4 + 4 + _xdr_string_size(_raw(pair.name)) + 4 + 4
    native_head = _align8(_NVPAIR_SIZE + len(_raw(pair.name)) + 1)
    if kind is NvType.BOOLEAN:
        return head, native_head
    if kind in SCALARS:
        return head + struct.calcsize(_UNIT[kind]), native_head + _align8(struct.calcsize(SCALARS[kind][0]))
    if kind in _BYTES_ARRAYS:
        count = len(cast(bytes, value))
        body = _align4(count) if kind is NvType.BYTE_ARRAY else 4 + 4 * count
        return head + body, native_head + _align8(count)
    if kind in ARRAY_ELEMENTS:
        numbers = cast(tuple[int, ...], value)
        element = ARRAY_ELEMENTS[kind]
        xdr_size = 4 + struct.calcsize(_UNIT[element]) * len(numbers)
        return head + xdr_size, native_head + _align8(struct.calcsize(SCALARS[element][0]) * len(numbers))
    if kind is NvType.STRING:
        raw = _raw(cast(str, value))
        return head + _xdr_string_size(raw), native_head + _align8(len(raw) + 1)
    if kind is NvType.STRING_ARRAY:
        raws = [_raw(text) for text in cast(tuple[str, ...], value)]
        return head + sum(_xdr_string_size(r) for r in raws), native_head + _align8(8 * len(raws) + sum(len(r) + 1 for r in raws))
    if kind is NvType.NVLIST:
        return head + _list_size(cast(NvList, value)), native_head + _NVLIST_SIZE
    lists = cast(tuple[NvList, ...], value)
    return head + sum(_list_size(sub) for sub in lists), native_head + _align8((8 + _NVLIST_SIZE) * len(lists))


# --- decoding -------------------------------------------------------------------------------------------


def decode_xdr(buf: bytes) -> NvList:
    """Unpack a whole XDR-packed nvlist (header byte 0 is 1), refusing bytes after its end.

    Every malformed input raises NvlistError; work and memory stay proportional to len(buf).
    """
    if len(buf) < 4:
        raise NvlistError(f"{len(buf)} bytes are too few for a packed nvlist")
    if buf[0] != ENCODE_XDR:
        raise NvlistError(f"encoding {buf[0]} is not XDR")
    # The second byte is the sender's host byte order, which XDR (always big-endian) does not use.
    if buf[1] > 1:
        raise NvlistError(f"unknown byte order {buf[1]}")
    decoder = _Decoder(buf)
    decoder.pos = 4
    nvl = decoder.embedded(0, "the top-level list")
    if decoder.pos != len(buf):
        raise NvlistError(f"{len(buf) - decoder.pos} bytes follow its end at byte {decoder.pos}")
    return nvl


class _Decoder:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, size: int, what: str) -> int:
        """The position of the next `size` bytes, which must be there; moves past them."""
        start = self.pos
        if size > len(self.buf) - start:
            raise NvlistError(f"it ends at byte {len(self.buf)}, inside {what}")
        self.pos = start + size
        return start

    def unpack(self, code: str, what: str) -> int:
        start = self.take(struct.calcsize(code), what)
        return cast(int, struct.unpack_from(">" + code, self.buf, start)[0])

    def opaque(self, size: int, what: str) -> bytes:
        """`size` bytes and their zero padding to a 4-byte unit."""
        start = self.take(_align4(size), what)
        if any(self.buf[start + size : start + _align4(size)]):
            raise NvlistError(f"{what} has non-zero padding")
        return self.buf[start : start + size]

    def string(self, what: str) -> bytes:
        size = self.unpack("I", what)
        if size > len(self.buf) - self.pos:
            raise NvlistError(f"{what} claims {size} bytes, with {len(self.buf) - self.pos} left")
        raw = self.opaque(size, what)
        if 0 in raw:
            raise NvlistError(f"{what} contains a NUL")
        return raw

    def embedded(self, depth: int, where: str) -> NvList:
        version = self.unpack("i", f"the header of {where}")
        nvflag = self.unpack("I", f"the header of {where}")
        if version != NV_VERSION:
            raise NvlistError(f"{where} has nvlist version {version}, not {NV_VERSION}")
        pairs: list[NvPair] = []
        while True:
            start = self.pos
            encoded = self.unpack("i", "a list (its end mark is missing)")
            decoded = self.unpack("i", "a list (its end mark is missing)")
            if decoded == 0:
                if encoded != 0:
                    raise NvlistError(f"the end mark at byte {start} has an encoded size of {encoded}, not 0")
                return NvList(tuple(pairs), nvflag)
            pair = self.pair(start, depth)
            sizes = _pair_sizes(pair)
            if (encoded, decoded) != sizes:
                raise NvlistError(
                    f"pair {pair.name!r} at byte {start} states sizes {encoded}/{decoded}, its contents make {sizes[0]}/{sizes[1]}"
                )
            pairs.append(pair)

    def pair(self, start: int, depth: int) -> NvPair:
        raw_name = self.string(f"the name of the pair at byte {start}")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise NvlistError(f"the name of the pair at byte {start} is not UTF-8") from None
        type_code, nelem = self.unpack("i", f"pair {name!r}"), self.unpack("i", f"pair {name!r}")
        try:
            kind = NvType(type_code)
        except ValueError:
            raise NvlistError(f"pair {name!r} at byte {start} has unsupported data type {type_code}") from None
        where = f"pair {name!r} ({kind.name}) at byte {start}"
        array = kind in ARRAY_ELEMENTS or kind in (NvType.STRING_ARRAY, NvType.NVLIST_ARRAY)
        wanted = "any number of elements" if array else ("no value" if kind is NvType.BOOLEAN else "one element")
        if (array and nelem < 0) or (not array and nelem != (0 if kind is NvType.BOOLEAN else 1)):
            raise NvlistError(f"{where} has {nelem} elements, wants {wanted}")
        return NvPair(name, kind, self.value(kind, nelem, where, depth))

    def value(self, kind: NvType, nelem: int, where: str, depth: int) -> NvValue:
        if kind is NvType.BOOLEAN:
            return None
        if kind in SCALARS:
            return self.number(kind, where)
        if kind is NvType.STRING:
            return self.string(where).decode("utf-8", "surrogateescape")
        # libnvpair writes nothing at all for an array of no elements, not even its count.
        if nelem == 0:
            return b"" if kind in _BYTES_ARRAYS else ()
        # Each element takes at least this many bytes: check that they can be there before looping on nelem.
        least = 1 if kind is NvType.BYTE_ARRAY else (_MIN_LIST if kind is NvType.NVLIST_ARRAY else 4)
        if nelem > (len(self.buf) - self.pos) // least:
            raise NvlistError(f"{where} has {nelem} elements, more than the {len(self.buf) - self.pos} bytes left can hold")
        if kind is NvType.BYTE_ARRAY:
            return self.opaque(nelem, where)
        if kind in ARRAY_ELEMENTS:
            count = self.unpack("I", where)
            if count != nelem:
                raise NvlistError(f"{where} has {nelem} elements but an array count of {count}")
            numbers = [self.number(ARRAY_ELEMENTS[kind], where) for _ in range(nelem)]
            return bytes(numbers) if kind is NvType.UINT8_ARRAY else tuple(numbers)
        if kind is NvType.STRING_ARRAY:
            return tuple(self.string(where).decode("utf-8", "surrogateescape") for _ in range(nelem))
        if depth >= MAX_DEPTH:
            raise NvlistError(f"{where} nests lists more than {MAX_DEPTH} deep")
        lists = tuple(self.embedded(depth + 1, where) for _ in range(1 if kind is NvType.NVLIST else nelem))
        return lists[0] if kind is NvType.NVLIST else lists

    def number(self, kind: NvType, where: str) -> int | bool:
        number = self.unpack(_UNIT[kind], where)
        _, low, high = SCALARS[kind]
        if kind in _CHARS and -128 <= number <= 255:
            number &= 0xFF
            if kind is NvType.INT8 and number > 127:
                number -= 256
        if not low <= number <= high:
            raise NvlistError(f"{where} holds {number}, out of range for {kind.name}")
        return number == 1 if kind is NvType.BOOLEAN_VALUE else number


# --- encoding -------------------------------------------------------------------------------------------


def encode_xdr(nvl: NvList, *, big_endian_host: bool = False) -> bytes:
    """Pack `nvl` as nvlist_pack(NV_ENCODE_XDR) does on a little-endian (or, if asked, big-endian) host.

    Values that cannot be packed (wrong Python type, out of range, a NUL in a string, lists nested
    deeper than MAX_DEPTH, a pair over 2 GiB) raise ValueError.
    """
    out = bytearray([ENCODE_XDR, 0 if big_endian_host else 1, 0, 0])
    _encode_list(nvl, 0, out)
    return bytes(out)


def _encode_list(nvl: NvList, depth: int, out: bytearray) -> None:
    if not isinstance(nvl, NvList):
        raise ValueError(f"{nvl!r} is not an NvList")
    if not 0 <= nvl.nvflag <= 0xFFFFFFFF:
        raise ValueError(f"nvflag {nvl.nvflag} does not fit in 32 bits")
    out += struct.pack(">iI", NV_VERSION, nvl.nvflag)
    for pair in nvl.pairs:
        kind = NvType(pair.type)
        checked = NvPair(pair.name, kind, pair.value)
        body = _encode_value(checked, depth)
        encoded, decoded = _pair_sizes(checked)
        if encoded > _INT32_MAX or decoded > _INT32_MAX:
            raise ValueError(f"pair {pair.name!r} is too large for an nvpair")
        out += struct.pack(">ii", encoded, decoded)
        out += _string(pair.name, f"the name {pair.name!r}")
        out += struct.pack(">ii", kind, _nelem(checked))
        out += body
    out += bytes(8)


def _nelem(pair: NvPair) -> int:
    if pair.type is NvType.BOOLEAN:
        return 0
    if pair.type in SCALARS or pair.type in (NvType.STRING, NvType.NVLIST):
        return 1
    return len(cast(tuple[object, ...], pair.value))


def _encode_value(pair: NvPair, depth: int) -> bytes:
    """The pair's packed value, after checking that it fits its type (so _pair_sizes can trust it)."""
    kind, value = pair.type, pair.value
    where = f"pair {pair.name!r} ({kind.name})"
    if kind is NvType.BOOLEAN:
        if value is not None:
            raise ValueError(f"{where} takes no value, got {value!r}")
        return b""
    if kind in SCALARS:
        return _numbers(kind, (value,), where)
    if kind is NvType.STRING:
        return _string(value, where)
    if kind in _BYTES_ARRAYS:
        if not isinstance(value, bytes):
            raise ValueError(f"{where} takes bytes, got {value!r}")
        if not value:
            return b""
        if kind is NvType.BYTE_ARRAY:
            return value.ljust(_align4(len(value)), b"\0")
        return struct.pack(">I", len(value)) + _numbers(NvType.UINT8, tuple(value), where)
    if kind is not NvType.NVLIST and not isinstance(value, tuple):
        raise ValueError(f"{where} takes a tuple, got {value!r}")
    if kind in ARRAY_ELEMENTS:
        body = _numbers(ARRAY_ELEMENTS[kind], cast(tuple[object, ...], value), where)
        return struct.pack(">I", len(cast(tuple[object, ...], value))) + body if value else b""
    if kind is NvType.STRING_ARRAY:
        return b"".join(_string(text, where) for text in cast(tuple[object, ...], value))
    lists = (value,) if kind is NvType.NVLIST else cast(tuple[object, ...], value)
    if not all(isinstance(sub, NvList) for sub in lists):
        raise ValueError(f"{where} takes {'an NvList' if kind is NvType.NVLIST else 'a tuple of NvList'}, got {value!r}")
    if depth >= MAX_DEPTH:
        raise ValueError(f"{where} nests lists more than {MAX_DEPTH} deep")
    out = bytearray()
    for sub in cast(tuple[NvList, ...], lists):
        _encode_list(sub, depth + 1, out)
    return bytes(out)


def _numbers(kind: NvType, values: tuple[object, ...], where: str) -> bytes:
    _, low, high = SCALARS[kind]
    out = bytearray()
    for v in values:
        if not isinstance(v, int) or not low <= v <= high or (kind is NvType.BOOLEAN_VALUE and not isinstance(v, bool)):
            raise ValueError(f"{where} cannot hold {v!r}")
        number = int(v)
        if kind in _CHARS and number > 127:
            number -= 256
        out += struct.pack(">" + _UNIT[kind], number)
    return bytes(out)


def _string(text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{where} takes a str, got {text!r}")
    raw = _raw(text)
    if b"\0" in raw:
        raise ValueError(f"{where} contains a NUL")
    return struct.pack(">I", len(raw)) + raw.ljust(_align4(len(raw)), b"\0")
