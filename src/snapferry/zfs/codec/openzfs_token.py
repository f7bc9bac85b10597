"""OpenZFS's own receive_resume_token: decode, encode and describe it as `zfs send -nv -t` does (pure)."""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import cast

from snapferry.errors import MalformedOpenZfsToken, NvlistError
from snapferry.zfs.codec import nvlist
from snapferry.zfs.codec.nvlist import NvList, NvPair, NvType

TOKEN_VERSION = 1
# OpenZFS compresses the packed nvlist with gzip_compress(..., 6): deflateInit at level 6 with
# zlib's default window and memory level, as Python's zlib.compress(data, 6); it reproduces every
# fixture token. A kernel whose deflate differs (hardware offload) makes other bytes, same content.
ZLIB_LEVEL = 6
# Real tokens unpack to a few hundred bytes (more only with many redaction snapshots); the bound
# keeps a forged length from making decode allocate or inflate without limit.
MAX_PACKED = 1 << 20
_MAX_TEXT = 2 * MAX_PACKED + 64
_MASK64 = (1 << 64) - 1
_AGAIN = "(copy it again from `zfs get receive_resume_token`)"
_HEX = re.compile(r"[0-9a-fA-F]+")
_DECIMAL = re.compile(r"[0-9]+")

# The pairs this module interprets, in the order get_receive_resume_token adds them to the nvlist;
# savedok is not the kernel's but what `zfs send -S` adds after decoding, so it comes last.
_U64_FIELDS = ("fromguid", "object", "offset", "bytes", "toguid")
_FLAGS = ("largeblockok", "embedok", "compressok", "rawok", "savedok")
_ARRAY_FIELDS = ("redact_snaps", "book_redact_snaps")
_KERNEL_ORDER: tuple[str, ...] = (*_U64_FIELDS, "toname", *_FLAGS[:-1], *_ARRAY_FIELDS, "savedok")
_TYPES: dict[str, NvType] = {
    **dict.fromkeys(_U64_FIELDS, NvType.UINT64),
    "toname": NvType.STRING,
    **dict.fromkeys(_FLAGS, NvType.BOOLEAN),
    **dict.fromkeys(_ARRAY_FIELDS, NvType.UINT64_ARRAY),
}


# Spelled at module level: inside OpenZfsToken, `object` and `bytes` name its fields.
Fields = dict[str, object]


def _malformed(reason: str, hint: str = _AGAIN) -> MalformedOpenZfsToken:
    return MalformedOpenZfsToken(f"malformed OpenZFS resume token: {reason} {hint}")


@dataclass(frozen=True)
class OpenZfsToken:
    """What a receive_resume_token holds: where `zfs send -t` resumes, and with which send options.

    `extra` keeps the pairs this class does not interpret (each name once, none of the names above),
    so that nothing is lost. `order` records the pair names in the token's own order so that encode
    and describe keep it; it is not compared, and names it lacks go in the kernel's order after it.
    """

    object: int
    offset: int
    bytes: int
    toguid: int
    toname: str
    fromguid: int | None = None
    largeblockok: bool = False
    embedok: bool = False
    compressok: bool = False
    rawok: bool = False
    savedok: bool = False
    redact_snaps: tuple[int, ...] | None = None
    book_redact_snaps: tuple[int, ...] | None = None
    extra: tuple[NvPair, ...] = ()
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        numbers = [self.object, self.offset, self.bytes, self.toguid, 0 if self.fromguid is None else self.fromguid]
        numbers += [*(self.redact_snaps or ()), *(self.book_redact_snaps or ())]
        if not all(type(n) is int and 0 <= n <= _MASK64 for n in numbers):
            raise ValueError("OpenZfsToken: guids, offsets and snapshot lists hold unsigned 64-bit integers")
        if not isinstance(self.toname, str) or "\0" in self.toname:
            raise ValueError(f"OpenZfsToken: toname {self.toname!r} is not a C string")
        names = [pair.name for pair in self.extra]
        if len(set(names)) != len(names) or set(names) & set(_TYPES):
            raise ValueError(f"OpenZfsToken: extra pairs {names} repeat a name or shadow a field")

    @classmethod
    def decode(cls, text: str) -> OpenZfsToken:
        """The same as the module's decode(text)."""
        return decode(text)

    def encode(self) -> str:
        """The same as the module's encode(self)."""
        return encode(self)

    def describe(self) -> str:
        """The same as the module's describe(self)."""
        return describe(self)

    @property
    def fields(self) -> Fields:
        """Every pair the token packs, by name and in its order; a flag that is set maps to True."""
        return {pair.name: True if pair.type is NvType.BOOLEAN else pair.value for pair in to_nvlist(self).pairs}

    def as_json(self) -> Fields:
        """`fields` with JSON types: numbers stay numbers, byte arrays become hex, nested lists objects."""
        return {name: _jsonable(value) for name, value in self.fields.items()}


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, NvList):
        return {pair.name: True if pair.type is NvType.BOOLEAN else _jsonable(pair.value) for pair in value.pairs}
    return value


def decode(text: str) -> OpenZfsToken:
    """Decode the text of `zfs get receive_resume_token` (surrounding whitespace allowed).

    Checks what `zfs send -t` checks, more strictly: the form, version 1, the checksum, the stated
    length, that the zlib stream ends exactly, and that the nvlist is sound and has the fields
    `zfs send -t` needs with the right types. Hex digits may be in either case. A token made on a
    big-endian host (checksummed over big-endian words, its nvlist big-endian) decodes too.
    Anything else raises MalformedOpenZfsToken.
    """
    text = text.strip()
    if len(text) > _MAX_TEXT:
        raise _malformed(f"it is {len(text)} characters long, more than any token")
    parts = text.split("-")
    if len(parts) != 4:
        raise _malformed("it is not of the form 1-<checksum>-<length>-<payload>")
    version, ck_text, len_text, payload = parts
    if version != str(TOKEN_VERSION):
        if _DECIMAL.fullmatch(version):
            raise _malformed(f"version {version} is not supported, only {TOKEN_VERSION}", "(made by a newer OpenZFS?)")
        raise _malformed("it is not of the form 1-<checksum>-<length>-<payload>")
    if not _HEX.fullmatch(ck_text) or len(ck_text) > 16:
        raise _malformed(f"its checksum {ck_text[:20]!r} is not a 64-bit hex number")
    if not _HEX.fullmatch(len_text) or len(len_text) > 16 or int(len_text, 16) > MAX_PACKED:
        raise _malformed(f"its length {len_text[:20]!r} is not a hex number up to {MAX_PACKED:#x}")
    if not payload:
        raise _malformed("its payload is empty")
    if not _HEX.fullmatch(payload):
        raise _malformed("its payload is not all hex digits")
    if len(payload) % 2:
        raise _malformed("its payload has an odd number of hex digits")
    checksum, packed_len, compressed = int(ck_text, 16), int(len_text, 16), bytes.fromhex(payload)
    # OpenZFS compresses into a buffer of the packed size, so a real payload is never longer.
    if len(compressed) > packed_len:
        raise _malformed(f"its payload of {len(compressed)} bytes is longer than its stated length {packed_len:#x}")
    if checksum not in (_word_sum(compressed, "<"), _word_sum(compressed, ">")):
        raise _malformed("checksum mismatch")
    packed = _inflate(compressed, packed_len)
    # The checksum covers native words: the nvlist's header says which byte order the host had.
    if checksum != _word_sum(compressed, ">" if packed[1:2] == b"\0" else "<"):
        raise _malformed("checksum mismatch")
    try:
        nvl = nvlist.decode(packed)
    except NvlistError as exc:
        raise _malformed(f"its nvlist is damaged: {exc.reason}") from None
    return from_nvlist(nvl)


def _word_sum(data: bytes, order: str) -> int:
    """Fletcher-4's first accumulator, all a token carries: the sum of the whole 32-bit words, mod 2**64."""
    words: tuple[int, ...] = struct.unpack_from(f"{order}{len(data) // 4}I", data)
    return sum(words) & _MASK64


def _inflate(compressed: bytes, packed_len: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        packed = inflater.decompress(compressed, packed_len + 1)
    except zlib.error as exc:
        raise _malformed(f"its payload does not decompress ({exc})") from None
    if len(packed) > packed_len:
        raise _malformed(f"its payload decompresses to more than its stated length {packed_len:#x}")
    if not inflater.eof:
        raise _malformed("its payload's zlib stream is cut short")
    if inflater.unused_data:
        raise _malformed(f"{len(inflater.unused_data)} bytes follow its payload's zlib stream")
    if len(packed) != packed_len:
        raise _malformed(f"its payload decompresses to {len(packed):#x} bytes, not its stated length {packed_len:#x}")
    return packed


def from_nvlist(nvl: NvList) -> OpenZfsToken:
    """The token an unpacked token nvlist stands for; MalformedOpenZfsToken if fields are missing or mistyped."""
    pairs: dict[str, NvPair] = {}
    for pair in nvl.pairs:
        if pair.name in pairs:
            raise _malformed(f"field {pair.name!r} appears twice")
        wanted = _TYPES.get(pair.name)
        if wanted is not None and pair.type is not wanted:
            raise _malformed(f"field {pair.name!r} is a {pair.type.name}, not a {wanted.name}")
        pairs[pair.name] = pair
    for name in ("object", "offset", "bytes", "toguid", "toname"):
        if name not in pairs:
            raise _malformed(f"field {name!r} is missing")

    def u64(name: str) -> int:
        return cast(int, pairs[name].value)

    def array(name: str) -> tuple[int, ...] | None:
        return cast(tuple[int, ...], pairs[name].value) if name in pairs else None

    toname = cast(str, pairs["toname"].value)
    return OpenZfsToken(
        object=u64("object"),
        offset=u64("offset"),
        bytes=u64("bytes"),
        toguid=u64("toguid"),
        toname=toname,
        fromguid=u64("fromguid") if "fromguid" in pairs else None,
        largeblockok="largeblockok" in pairs,
        embedok="embedok" in pairs,
        compressok="compressok" in pairs,
        rawok="rawok" in pairs,
        savedok="savedok" in pairs,
        redact_snaps=array("redact_snaps"),
        book_redact_snaps=array("book_redact_snaps"),
        extra=tuple(pair for pair in nvl.pairs if pair.name not in _TYPES),
        order=tuple(pairs),
    )


def to_nvlist(token: OpenZfsToken) -> NvList:
    """The nvlist the token packs: its pairs in token.order, then any others in the kernel's order, extras last."""
    present: dict[str, NvPair] = {}
    for name in _KERNEL_ORDER:
        value = getattr(token, name)
        if name in _FLAGS:
            if value:
                present[name] = NvPair(name, NvType.BOOLEAN)
        elif value is not None:
            present[name] = NvPair(name, _TYPES[name], value)
    present.update((pair.name, pair) for pair in token.extra)
    names = [name for name in dict.fromkeys(token.order) if name in present]
    placed = set(names)
    names += [name for name in present if name not in placed]
    return NvList(tuple(present[name] for name in names))


def encode(token: OpenZfsToken) -> str:
    """The token text OpenZFS would show for `token` (as a little-endian host makes it).

    For the tokens OpenZFS makes, decode then encode gives back the same text byte for byte, with
    Python's zlib at ZLIB_LEVEL; a zlib build that deflates differently (zlib-ng) changes the payload
    but not what it decodes to. A token whose nvlist does not compress, which OpenZFS would store
    raw and then fail to read back, raises ValueError, as do values that cannot be packed.
    """
    packed = nvlist.encode(to_nvlist(token))
    compressed = zlib.compress(packed, ZLIB_LEVEL)
    if len(compressed) > len(packed) or len(packed) > MAX_PACKED:
        raise ValueError(f"this token's {len(packed)}-byte nvlist does not make a token OpenZFS can read")
    return f"{TOKEN_VERSION}-{_word_sum(compressed, '<'):x}-{len(packed):x}-{compressed.hex()}"


def describe(token: OpenZfsToken) -> str:
    """The "resume token contents:" block that `zfs send -nv -t TOKEN` prints, byte for byte."""
    return "resume token contents:\n" + nvlist.format_nvlist(to_nvlist(token))
