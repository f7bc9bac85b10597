"""OpenZFS's receive_resume_token and packed nvlists (snapferry.zfs.codec.openzfs_token, .nvlist): fixtures, round trips, fuzz."""

from __future__ import annotations

import random
import re
import struct
import zlib
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapferry.errors import MalformedOpenZfsToken, MalformedToken, NvlistError, Refused, StreamFormatError
from snapferry.zfs.codec import nvlist
from snapferry.zfs.codec.nvlist import MAX_DEPTH, NvList, NvPair, NvType
from snapferry.zfs.codec.openzfs_token import OpenZfsToken, decode, describe, encode, to_nvlist
from snapferry_testkit.shared_data import OPENZFS_DATA

TOKENS = sorted(OPENZFS_DATA.glob("zfs-*/*.token"))
DECODED = sorted(OPENZFS_DATA.glob("zfs-*/*.token.decoded.txt"))
RESUME_STREAMS = sorted(OPENZFS_DATA.glob("zfs-*/*.resume.stream"))
needs_fixtures = pytest.mark.skipif(not TOKENS, reason="OpenZFS fixtures not available")
AGAIN = "(copy it again from `zfs get receive_resume_token`)"
U64 = (1 << 64) - 1
# A zlib-ng build deflates differently: the text changes, what it decodes to does not.
same_zlib = pytest.mark.skipif("ng" in zlib.ZLIB_RUNTIME_VERSION, reason="zlib-ng deflates differently from zlib")

EXPECTED = {
    "zfs-2.3.2/full_s1.token": OpenZfsToken(object=2, offset=0x380000, bytes=0x3A2D58, toguid=0x281323C9828C3B78, toname="tank/src@s1"),
    "zfs-2.3.2/incr_s1_s2.token": OpenZfsToken(
        object=0x3B,
        offset=0x1C0000,
        bytes=0x1FD930,
        toguid=0x5469136D44C71B0E,
        toname="tank/src@s2",
        fromguid=0x281323C9828C3B78,
        embedok=True,
        compressok=True,
    ),
    "zfs-2.3.2/abort.token": OpenZfsToken(object=2, offset=0, bytes=0x8C8, toguid=0x281323C9828C3B78, toname="tank/src@s1"),
    "zfs-2.1.11/full_s1.token": OpenZfsToken(object=2, offset=0x380000, bytes=0x3A2D58, toguid=0x6098D5D8D39C18EC, toname="tank/src@s1"),
    "zfs-2.1.11/incr_s1_s2.token": OpenZfsToken(
        object=4,
        offset=0x1E0000,
        bytes=0x211DC0,
        toguid=0x6D2F25BAD3F5D4D0,
        toname="tank/src@s2",
        fromguid=0x6098D5D8D39C18EC,
        embedok=True,
        compressok=True,
    ),
    "zfs-2.1.11/abort.token": OpenZfsToken(object=1, offset=0, bytes=0x6E0, toguid=0x6098D5D8D39C18EC, toname="tank/src@s1"),
}


def rel(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def fixture_text(name: str) -> str:
    return (OPENZFS_DATA / name).read_text().strip()


def word_sum(data: bytes, order: Literal["little", "big"] = "little") -> int:
    """Written apart from the module: fletcher-4's a, over whole 32-bit words only."""
    return sum(int.from_bytes(data[i : i + 4], order) for i in range(0, len(data) - 3, 4)) & U64


def wrap(packed: bytes, *, compressed: bytes | None = None, length: int | None = None, order: Literal["little", "big"] = "little") -> str:
    """Token text around `packed` (or around any `compressed` bytes), with a correct checksum."""
    body = zlib.compress(packed, 6) if compressed is None else compressed
    return f"1-{word_sum(body, order):x}-{len(packed) if length is None else length:x}-{body.hex()}"


def packed_of(text: str) -> bytes:
    return zlib.decompress(bytes.fromhex(text.rsplit("-", 1)[1]))


# --- the fixtures -----------------------------------------------------------------------------------


@needs_fixtures
def test_every_fixture_is_expected() -> None:
    assert sorted(map(rel, TOKENS)) == sorted(EXPECTED)


@needs_fixtures
@pytest.mark.parametrize("path", TOKENS, ids=rel)
def test_fixture_decodes_to_its_fields(path: Path) -> None:
    token = decode(path.read_text())
    assert token == EXPECTED[rel(path)]
    assert token.extra == ()


@needs_fixtures
@pytest.mark.parametrize("path", DECODED, ids=rel)
def test_describe_is_zfs_send_nv_t(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    end = 2
    while lines[end].startswith("\t"):
        end += 1
    assert lines[:2] == ["resume token contents:\n", "nvlist version: 0\n"]
    assert lines[end].startswith(("full send of ", "send from "))  # the estimate, which is not ours
    token = decode((path.parent / path.name.removesuffix(".decoded.txt")).read_text())
    assert describe(token) == "".join(lines[:end])
    assert token.describe() == describe(token)


@needs_fixtures
@same_zlib
@pytest.mark.parametrize("path", TOKENS, ids=rel)
def test_encode_gives_back_the_fixture_byte_for_byte(path: Path) -> None:
    text = path.read_text().strip()
    assert encode(decode(text)) == text
    assert decode(text).encode() == text


@needs_fixtures
@pytest.mark.parametrize("path", TOKENS, ids=rel)
def test_checksum_is_the_64_bit_sum_of_whole_words(path: Path) -> None:
    _, ck, length, payload = path.read_text().strip().split("-")
    compressed = bytes.fromhex(payload)
    assert int(ck, 16) == word_sum(compressed)
    assert int(length, 16) == len(zlib.decompress(compressed))
    assert compressed[:2] == b"\x78\x9c"


@needs_fixtures
def test_checksum_is_not_truncated_and_ignores_the_tail() -> None:
    _, ck, _, payload = fixture_text("zfs-2.1.11/incr_s1_s2.token").split("-")
    assert int(ck, 16) > 0xFFFFFFFF and len(bytes.fromhex(payload)) % 4 == 2


@needs_fixtures
def test_fields_and_json() -> None:
    token = decode(fixture_text("zfs-2.3.2/incr_s1_s2.token"))
    assert OpenZfsToken.decode(fixture_text("zfs-2.3.2/incr_s1_s2.token")) == token
    assert token.fields == {
        "fromguid": 0x281323C9828C3B78,
        "object": 0x3B,
        "offset": 0x1C0000,
        "bytes": 0x1FD930,
        "toguid": 0x5469136D44C71B0E,
        "toname": "tank/src@s2",
        "embedok": True,
        "compressok": True,
    }
    assert list(token.as_json()) == list(token.fields) and token.as_json()["fromguid"] == 0x281323C9828C3B78
    assert decode(fixture_text("zfs-2.3.2/full_s1.token")).fields.get("fromguid") is None


@pytest.mark.skipif(not RESUME_STREAMS, reason="OpenZFS fixtures not available")
@pytest.mark.parametrize("path", RESUME_STREAMS, ids=rel)
def test_begin_payload_prints_as_zstream_dump_does(path: Path) -> None:
    with path.open("rb") as stream:
        header = stream.read(312)
        payload = stream.read(struct.unpack_from("<I", header, 4)[0])
    nvl = nvlist.decode(payload)
    assert [(p.name, p.type) for p in nvl] == [("resume_object", NvType.UINT64), ("resume_offset", NvType.UINT64)]
    assert nvlist.encode(nvl) == payload
    dump = (path.parent / f"{path.name}.dump.txt").read_text()
    assert f"\n\n{nvlist.format_nvlist(nvl)}OBJECT " in dump


# --- nvlists ----------------------------------------------------------------------------------------

EVERY_TYPE = NvList(
    (
        NvPair("b", NvType.BOOLEAN),
        NvPair("bv", NvType.BOOLEAN_VALUE, False),
        NvPair("byte", NvType.BYTE, 7),
        NvPair("i8", NvType.INT8, -3),
        NvPair("u8", NvType.UINT8, 255),
        NvPair("i16", NvType.INT16, -300),
        NvPair("u16", NvType.UINT16, 300),
        NvPair("i32", NvType.INT32, -70000),
        NvPair("u32", NvType.UINT32, 70000),
        NvPair("i64", NvType.INT64, -1),
        NvPair("u64", NvType.UINT64, U64),
        NvPair("hr", NvType.HRTIME, -1),
        NvPair("s", NvType.STRING, "tank/a b"),
        NvPair("ba", NvType.BYTE_ARRAY, b"\x01\xff"),
        NvPair("u8a", NvType.UINT8_ARRAY, b"\x01\xff"),
        NvPair("boola", NvType.BOOLEAN_ARRAY, (True, False)),
        NvPair("u64a", NvType.UINT64_ARRAY, (1, 255)),
        NvPair("i64a", NvType.INT64_ARRAY, (-1,)),
        NvPair("empty", NvType.UINT64_ARRAY, ()),
        NvPair("sa", NvType.STRING_ARRAY, ("x", "y")),
        NvPair("nested", NvType.NVLIST, NvList((NvPair("inner", NvType.UINT64, 1),))),
        NvPair("arr", NvType.NVLIST_ARRAY, (NvList(), NvList((NvPair("k", NvType.STRING, "v"),), nvflag=0))),
        NvPair("after", NvType.UINT64, 2),
    )
)


def test_every_type_round_trips_in_both_byte_orders() -> None:
    for big in (False, True):
        packed = nvlist.encode(EVERY_TYPE, big_endian=big)
        assert packed[:4] == (b"\0\0\0\0" if big else b"\0\1\0\0")
        assert nvlist.decode(packed) == EVERY_TYPE
    assert EVERY_TYPE.get("u8") == NvPair("u8", NvType.UINT8, 255) and EVERY_TYPE.get("nope") is None


def test_format_nvlist_follows_libnvpair() -> None:
    # As nvlist_print prints: after an embedded list's "(end …)" line and after an empty array,
    # libnvpair still writes its end-of-member newline.
    assert nvlist.format_nvlist(EVERY_TYPE) == (
        "nvlist version: 0\n"
        "\tb = 1\n\tbv = 0\n\tbyte = 0x07\n\ti8 = -3\n\tu8 = 0xff\n\ti16 = -300\n\tu16 = 0x12c\n"
        "\ti32 = -70000\n\tu32 = 0x11170\n\ti64 = -1\n\tu64 = 0xffffffffffffffff\n\thr = 0xffffffffffffffff\n"
        "\ts = tank/a b\n\tba = 0x01 0xff\n\tu8a = 0x1 0xff\n\tboola = 1 0\n\tu64a = 0x1 0xff\n\ti64a = -1\n"
        "\n"
        "\tsa = x y\n"
        "\tnested = (embedded nvlist)\n\tnvlist version: 0\n\t\tinner = 0x1\n\t(end nested)\n"
        "\n"
        "\tarr = (array of embedded nvlists)\n"
        "\t(start arr[0])\n\tnvlist version: 0\n\t(end arr[0])\n"
        "\t(start arr[1])\n\tnvlist version: 0\n\t\tk = v\n\t(end arr[1])\n"
        "\n"
        "\tafter = 0x2\n"
    )


def chain(depth: int) -> bytes:
    """A packed nvlist of `depth` lists nested in one another, built by hand."""
    pair = struct.pack("<ihhii", 48, 2, 0, 1, NvType.NVLIST) + b"n\0" + bytes(6) + struct.pack("<iIQIi", 0, 1, 0, 0, 0)
    return b"\0\1\0\0" + struct.pack("<iI", 0, 1) + pair * depth + b"\0\0\0\0" * (depth + 1)


def test_nesting_limit() -> None:
    deepest = NvList()
    for _ in range(MAX_DEPTH):
        deepest = NvList((NvPair("n", NvType.NVLIST, deepest),))
    assert nvlist.encode(deepest) == chain(MAX_DEPTH)
    assert nvlist.decode(chain(MAX_DEPTH)) == deepest
    with pytest.raises(NvlistError, match=f"nests lists more than {MAX_DEPTH} deep"):
        nvlist.decode(chain(MAX_DEPTH + 1))
    with pytest.raises(ValueError, match=f"nests lists more than {MAX_DEPTH} deep"):
        nvlist.encode(NvList((NvPair("n", NvType.NVLIST, deepest),)))
    with pytest.raises(NvlistError):
        nvlist.decode(chain(100_000)[: 12 + 48 * 100_000])


def one_pair(size: int, name_sz: int, nelem: int, kind: int, rest: bytes = b"") -> bytes:
    return b"\0\1\0\0" + struct.pack("<iI", 0, 1) + struct.pack("<ihhii", size, name_sz, 0, nelem, kind) + rest


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "0 bytes are too few for a packed nvlist"),
        (b"\1\1\0\0" + bytes(12), "it ends at byte 16, inside a list (its end mark is missing)"),
        (b"\7\1\0\0" + bytes(12), "unknown encoding 7"),
        (b"\0\2\0\0" + bytes(12), "unknown byte order 2"),
        (b"\0\1\0\0" + struct.pack("<iI", 1, 0) + bytes(4), "nvlist version 1 is not 0"),
        (b"\0\1\0\0" + bytes(8), "12 bytes are too few for a packed nvlist"),
        (b"\0\1\0\0" + bytes(16), "4 bytes follow its end at byte 16"),
        (one_pair(24, 2, 1, 27, b"x\0" + bytes(6)) + bytes(8), "pair 'x' at byte 12 has unsupported data type 27"),
        (one_pair(1 << 30, 2, 1, 8), "the pair at byte 12 claims 1073741824 bytes, with 16 left"),
        (one_pair(32, 2, 0x7FFFFFFF, 16, b"x\0" + bytes(14)), "needs 17179869176 bytes for its 2147483647 elements, has 8"),
        (one_pair(32, 2, -1, 16, b"x\0" + bytes(14)), "has -1 elements, wants any number of elements"),
        (one_pair(32, 2, 2, 8, b"x\0" + bytes(14)), "has 2 elements, wants one element"),
        (one_pair(32, 2, 1, 21, b"x\0" + bytes(6) + b"\2" + bytes(7)), "holds 2, not a boolean"),
        (one_pair(32, 2, 1, 9, b"x\0" + bytes(6) + b"abcdefgh"), "has a string without its terminating NUL"),
        (one_pair(40, 2, 1, 9, b"x\0" + bytes(6) + b"ab\0" + bytes(13)), "has 16 bytes for a 3-byte value"),
        (one_pair(24, 2, 1, 8, b"xy" + bytes(6)), "is not one NUL-terminated string"),
        (one_pair(24, 0, 1, 8, bytes(8)), "has a name size of 0 in a 24-byte pair"),
        (one_pair(24, 2, 0, 1, b"x\0" + bytes(6)), "it ends at byte 36, inside a list (its end mark is missing)"),
    ],
)
def test_malformed_nvlists(data: bytes, reason: str) -> None:
    with pytest.raises(NvlistError) as info:
        nvlist.decode(data)
    assert reason in info.value.reason and str(info.value) == f"malformed nvlist: {info.value.reason}"
    assert isinstance(info.value, StreamFormatError)


@pytest.mark.parametrize(
    "pair",
    [
        NvPair("x", NvType.UINT8, 256),
        NvPair("x", NvType.BOOLEAN_VALUE, 1),
        NvPair("x", NvType.BOOLEAN, 0),
        NvPair("x", NvType.STRING, "a\0b"),
        NvPair("a\0", NvType.BOOLEAN),
        NvPair("x", NvType.STRING, "\ud800"),
        NvPair("x", NvType.NVLIST, (NvList(),)),
        NvPair("x", NvType.UINT64_ARRAY, [1]),  # type: ignore[arg-type]
        NvPair("x", NvType.BYTE_ARRAY, (1,)),
    ],
)
def test_unpackable_values_raise_value_error(pair: NvPair) -> None:
    with pytest.raises(ValueError):
        nvlist.encode(NvList((pair,)))


# Hypothesis strategies: every supported type, nested a few levels.
names = st.text(st.characters(exclude_characters="\0", codec="utf-8"), max_size=10)
RANGES = {
    NvType.BYTE: (0, 0xFF),
    NvType.INT8: (-128, 127),
    NvType.UINT8: (0, 0xFF),
    NvType.INT16: (-(1 << 15), (1 << 15) - 1),
    NvType.UINT16: (0, 0xFFFF),
    NvType.INT32: (-(1 << 31), (1 << 31) - 1),
    NvType.UINT32: (0, 0xFFFFFFFF),
    NvType.INT64: (-(1 << 63), (1 << 63) - 1),
    NvType.UINT64: (0, U64),
    NvType.HRTIME: (-(1 << 63), (1 << 63) - 1),
}
ARRAY_OF = {
    NvType.INT8_ARRAY: NvType.INT8,
    NvType.INT16_ARRAY: NvType.INT16,
    NvType.UINT16_ARRAY: NvType.UINT16,
    NvType.INT32_ARRAY: NvType.INT32,
    NvType.UINT32_ARRAY: NvType.UINT32,
    NvType.INT64_ARRAY: NvType.INT64,
    NvType.UINT64_ARRAY: NvType.UINT64,
}


def leaf_value(kind: NvType) -> st.SearchStrategy[nvlist.NvValue]:
    if kind in RANGES:
        return st.integers(*RANGES[kind])
    if kind in ARRAY_OF:
        return st.lists(st.integers(*RANGES[ARRAY_OF[kind]]), max_size=4).map(tuple)
    strategies: dict[NvType, st.SearchStrategy[nvlist.NvValue]] = {
        NvType.BOOLEAN: st.none(),
        NvType.BOOLEAN_VALUE: st.booleans(),
        NvType.STRING: names,
        NvType.BYTE_ARRAY: st.binary(max_size=12),
        NvType.UINT8_ARRAY: st.binary(max_size=12),
        NvType.BOOLEAN_ARRAY: st.lists(st.booleans(), max_size=4).map(tuple),
        NvType.STRING_ARRAY: st.lists(names, max_size=3).map(tuple),
    }
    return strategies[kind]


LEAF_TYPES = [t for t in NvType if t not in (NvType.NVLIST, NvType.NVLIST_ARRAY)]
leaf_pairs = st.sampled_from(LEAF_TYPES).flatmap(lambda kind: st.builds(NvPair, names, st.just(kind), leaf_value(kind)))
nvflags = st.sampled_from([0, 1, 2, 0xFFFFFFFF])


def nested_pairs(lists: st.SearchStrategy[NvList]) -> st.SearchStrategy[NvPair]:
    return st.one_of(
        st.builds(NvPair, names, st.just(NvType.NVLIST), lists),
        st.builds(NvPair, names, st.just(NvType.NVLIST_ARRAY), st.lists(lists, max_size=3).map(tuple)),
    )


flat_nvlists = st.builds(NvList, st.lists(leaf_pairs, max_size=4).map(tuple), nvflags)
nvlists = st.recursive(
    flat_nvlists,
    lambda lists: st.builds(NvList, st.lists(st.one_of(leaf_pairs, nested_pairs(lists)), max_size=4).map(tuple), nvflags),
    max_leaves=5,
)


@settings(max_examples=150, deadline=None)
@given(nvlists, st.booleans())
def test_random_nvlists_round_trip(nvl: NvList, big: bool) -> None:
    packed = nvlist.encode(nvl, big_endian=big)
    assert nvlist.decode(packed) == nvl
    assert nvlist.encode(nvlist.decode(packed), big_endian=big) == packed
    assert nvlist.format_nvlist(nvlist.decode(packed)) == nvlist.format_nvlist(nvl)


def decodes_or_raises_nvlist_error(data: bytes) -> None:
    try:
        nvl = nvlist.decode(data)
    except NvlistError:
        return
    # Whatever decodes is a sound nvlist: it packs, and unpacks to itself.
    assert nvlist.decode(nvlist.encode(nvl)) == nvl


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"", b"\0\1\0\0", b"\0\1\0\0\0\0\0\0\1\0\0\0", b"\0\0\0\0\0\0\0\0\0\0\0\1"]))
def test_arbitrary_bytes_only_raise_nvlist_error(data: bytes, head: bytes) -> None:
    decodes_or_raises_nvlist_error(head + data)


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """One damage: a byte changed, a cut, bytes inserted or removed, or an int32 field overwritten."""
    buf = bytearray(data)
    at = rnd.randrange(len(buf) + 1)
    how = rnd.randrange(5)
    if how == 0 and at < len(buf):
        buf[at] = rnd.randrange(256)
    elif how == 1:
        del buf[at:]
    elif how == 2:
        buf[at:at] = rnd.randbytes(rnd.randint(1, 8))
    elif how == 3:
        del buf[at : at + rnd.randint(1, 8)]
    else:
        at &= ~3
        buf[at : at + 4] = struct.pack("<i", rnd.choice([0, 1, 2, 7, 8, 24, 0x7FFFFFFF, -1, -(1 << 31), 1 << 16]))
    return bytes(buf)


def damages(data: bytes, rnd: random.Random, count: int = 10) -> list[bytes]:
    """`count` damaged copies of `data`, each with one to three damages."""
    copies = []
    for _ in range(count):
        copy = data
        for _ in range(rnd.randint(1, 3)):
            copy = mutate(copy, rnd)
        copies.append(copy)
    return copies


@settings(max_examples=100, deadline=None)
@given(nvlists, st.randoms(use_true_random=False))
def test_damaged_nvlists_only_raise_nvlist_error(nvl: NvList, rnd: random.Random) -> None:
    for packed in damages(nvlist.encode(nvl), rnd, 30):
        decodes_or_raises_nvlist_error(packed)


# --- tokens -----------------------------------------------------------------------------------------


def test_malformed_openzfs_token_is_a_malformed_token() -> None:
    assert issubclass(MalformedOpenZfsToken, MalformedToken) and issubclass(MalformedOpenZfsToken, Refused)
    assert MalformedOpenZfsToken.exit_code == Refused.exit_code == 4


def damaged(name: str) -> dict[str, str]:
    """Damaged versions of a fixture token, each with the message decode must give."""
    text = fixture_text(name)
    _, ck, length, payload = text.split("-")
    packed = packed_of(text)
    compressed = bytes.fromhex(payload)
    size = len(packed)
    no_toname = nvlist.encode(NvList(tuple(p for p in nvlist.decode(packed) if p.name != "toname")))
    object_text = NvList(tuple(NvPair("object", NvType.STRING, "2") if p.name == "object" else p for p in nvlist.decode(packed)))
    twice = NvList(nvlist.decode(packed).pairs * 2)
    return {
        "": "it is not of the form 1-<checksum>-<length>-<payload>",
        "hello": "it is not of the form 1-<checksum>-<length>-<payload>",
        text + "-00": "it is not of the form 1-<checksum>-<length>-<payload>",
        "x" + text[1:]: "it is not of the form 1-<checksum>-<length>-<payload>",
        "2" + text[1:]: "version 2 is not supported, only 1 (made by a newer OpenZFS?)",
        f"1-0x{ck}-{length}-{payload}": f"its checksum '0x{ck}' is not a 64-bit hex number",
        f"1-{'f' * 17}-{length}-{payload}": f"its checksum '{'f' * 17}' is not a 64-bit hex number",
        f"1-{ck}-100001-{payload}": "its length '100001' is not a hex number up to 0x100000",
        f"1-{ck}- {length}-{payload}": f"its length ' {length}' is not a hex number up to 0x100000",
        f"1-{ck}-{length}-": "its payload is empty",
        f"1-{ck}-{length}-{payload[:10]} {payload[11:]}": "its payload is not all hex digits",
        f"1-{ck}-{length}-{payload}0": "its payload has an odd number of hex digits",
        f"1-{int(ck, 16) ^ 1:x}-{length}-{payload}": "checksum mismatch",
        f"1-{ck}-{len(compressed) - 1:x}-{payload}": f"its payload of {len(compressed)} bytes is longer than its stated length",
        wrap(packed, length=size + 8): f"its payload decompresses to {size:#x} bytes, not its stated length {size + 8:#x}",
        wrap(packed, length=size - 8): f"its payload decompresses to more than its stated length {size - 8:#x}",
        wrap(packed, compressed=compressed + b"\0\0"): "2 bytes follow its payload's zlib stream",
        wrap(packed, compressed=compressed[:-6]): "its payload's zlib stream is cut short",
        wrap(packed, compressed=b"\x78\x9c\xff" + compressed[3:]): "its payload does not decompress (Error -3",
        wrap(packed[:-4]): "its nvlist is damaged: it ends at byte",
        wrap(nvlist.encode(NvList(), big_endian=True)): "checksum mismatch",
        wrap(no_toname): "field 'toname' is missing",
        wrap(nvlist.encode(object_text)): "field 'object' is a STRING, not a UINT64",
        wrap(nvlist.encode(twice)): "field 'object' appears twice",
    }


@needs_fixtures
def test_damaged_tokens_say_what_is_wrong() -> None:
    cases = damaged("zfs-2.3.2/full_s1.token")
    assert len(cases) == 24
    for text, reason in cases.items():
        with pytest.raises(MalformedOpenZfsToken) as info:
            decode(text)
        message = str(info.value)
        assert message.startswith(f"malformed OpenZFS resume token: {reason}"), (text, message)
        assert "\n" not in message
        assert message.endswith(AGAIN) or "version" in reason


@needs_fixtures
def test_checksum_mismatch_message() -> None:
    _, ck, length, payload = fixture_text("zfs-2.3.2/abort.token").split("-")
    with pytest.raises(MalformedToken, match=re.escape(f"malformed OpenZFS resume token: checksum mismatch {AGAIN}")):
        decode(f"1-{int(ck, 16) + 1:x}-{length}-{payload}")


@needs_fixtures
def test_whitespace_and_uppercase_are_accepted() -> None:
    text = fixture_text("zfs-2.3.2/incr_s1_s2.token")
    assert decode(f"  {text.upper()}\n") == decode(text)


@needs_fixtures
def test_big_endian_hosts_token_decodes() -> None:
    token = decode(fixture_text("zfs-2.3.2/incr_s1_s2.token"))
    packed = nvlist.encode(to_nvlist(token), big_endian=True)
    assert decode(wrap(packed, order="big")) == token
    with pytest.raises(MalformedOpenZfsToken, match="checksum mismatch"):
        decode(wrap(packed, order="little"))


def test_pairs_keep_their_order_and_unknown_pairs_are_kept() -> None:
    pairs = (
        NvPair("toname", NvType.STRING, "pool/fs@snap"),
        NvPair("future", NvType.NVLIST, NvList((NvPair("x", NvType.UINT8_ARRAY, b"\1\2"),))),
        NvPair("embedok", NvType.BOOLEAN),
        NvPair("toguid", NvType.UINT64, 5),
        NvPair("bytes", NvType.UINT64, 4),
        NvPair("offset", NvType.UINT64, 3),
        NvPair("object", NvType.UINT64, 2),
        NvPair("redact_snaps", NvType.UINT64_ARRAY, (7, 8)),
    )
    text = wrap(nvlist.encode(NvList(pairs)))
    token = decode(text)
    assert token.extra == (pairs[1],) and token.embedok and token.redact_snaps == (7, 8)
    assert encode(token) == text
    assert describe(token).splitlines()[2:4] == ["\ttoname = pool/fs@snap", "\tfuture = (embedded nvlist)"]
    assert token.as_json()["future"] == {"x": "0102"}
    plain = OpenZfsToken(object=2, offset=3, bytes=4, toguid=5, toname="pool/fs@snap", embedok=True, redact_snaps=(7, 8), extra=(pairs[1],))
    assert plain == token and encode(plain) != text
    assert [p.name for p in to_nvlist(plain)] == ["object", "offset", "bytes", "toguid", "toname", "embedok", "redact_snaps", "future"]


def test_token_fields_are_checked() -> None:
    with pytest.raises(ValueError):
        OpenZfsToken(object=-1, offset=0, bytes=0, toguid=0, toname="a")
    with pytest.raises(ValueError):
        OpenZfsToken(object=0, offset=0, bytes=0, toguid=0, toname="a\0")
    with pytest.raises(ValueError):
        OpenZfsToken(object=0, offset=0, bytes=0, toguid=0, toname="a", extra=(NvPair("toname", NvType.STRING, "b"),))


u64 = st.integers(0, U64)
snapshot_lists = st.none() | st.lists(u64, max_size=4).map(tuple)
KNOWN = {"fromguid", "object", "offset", "bytes", "toguid", "toname", "largeblockok", "embedok", "compressok", "rawok", "savedok"}
KNOWN |= {"redact_snaps", "book_redact_snaps"}
tokens = st.builds(
    OpenZfsToken,
    object=u64,
    offset=u64,
    bytes=u64,
    toguid=u64,
    toname=names,
    fromguid=st.none() | u64,
    largeblockok=st.booleans(),
    embedok=st.booleans(),
    compressok=st.booleans(),
    rawok=st.booleans(),
    savedok=st.booleans(),
    redact_snaps=snapshot_lists,
    book_redact_snaps=snapshot_lists,
    extra=st.lists(st.one_of(leaf_pairs, nested_pairs(flat_nvlists)), max_size=3, unique_by=lambda p: p.name).map(
        lambda pairs: tuple(p for p in pairs if p.name not in KNOWN)
    ),
)


@settings(max_examples=150, deadline=None)
@given(tokens)
def test_random_tokens_round_trip(token: OpenZfsToken) -> None:
    text = encode(token)
    again = decode(text)
    assert again == token
    assert encode(again) == text
    assert describe(again) == describe(token)


def decodes_or_raises_malformed_token(text: str) -> None:
    try:
        token = decode(text)
    except MalformedToken as exc:
        assert "\n" not in str(exc)
        return
    assert decode(encode(token)) == token


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120) | st.from_regex(r"1-[0-9a-f]{1,12}-[0-9a-f]{1,4}-[0-9a-f]{0,80}", fullmatch=True))
def test_arbitrary_text_only_raises_malformed_token(text: str) -> None:
    decodes_or_raises_malformed_token(text)


@needs_fixtures
@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(EXPECTED)), st.randoms(use_true_random=False))
def test_damaged_fixture_text_only_raises_malformed_token(name: str, rnd: random.Random) -> None:
    text = fixture_text(name)
    for _ in range(10):
        damaged_text = text
        for _ in range(rnd.randint(1, 3)):
            at = rnd.randrange(len(damaged_text) + 1)
            piece = "".join(rnd.choices("0123456789abcdefABCDEFxg- \n", k=rnd.randint(0, 3)))
            cut = rnd.choice([0, 1, len(damaged_text)])
            damaged_text = damaged_text[:at] + piece + damaged_text[at + cut :]
        decodes_or_raises_malformed_token(damaged_text)


@needs_fixtures
@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(EXPECTED)), st.randoms(use_true_random=False))
def test_damage_under_a_valid_checksum_only_raises_malformed_token(name: str, rnd: random.Random) -> None:
    """The checksum stops random damage; these payloads pass it, to reach zlib and the nvlist decoder."""
    text = fixture_text(name)
    packed, compressed = packed_of(text), bytes.fromhex(text.rsplit("-", 1)[1])
    for damaged_packed in damages(packed, rnd):
        decodes_or_raises_malformed_token(wrap(damaged_packed))
    for damaged_compressed in damages(compressed, rnd):
        decodes_or_raises_malformed_token(wrap(packed, compressed=damaged_compressed))
