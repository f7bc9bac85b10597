"""XDR nvlists and the `zfs send -R` compound header: the zfs-fuse samples read and re-packed byte for byte, damage refused cleanly."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapferry.errors import NvlistError, StreamFormatError, StreamIntegrityError, StreamTruncated
from snapferry.zfs.codec import nvlist
from snapferry.zfs.codec.nvlist import MAX_DEPTH, NvList, NvPair, NvType
from snapferry.zfs.codec.nvlist_xdr import decode_xdr, encode_xdr
from snapferry.zfs.codec.records import HEADER_SIZE, Begin
from snapferry.zfs.codec.replication import FINAL_END, ReplicationHeader, compound_begin, header_records, property_package, read_header
from tests.test_openzfs_token import damages, nvlists

DATA = Path(__file__).parent / "data" / "zfs-fuse-R"
FULL = (DATA / "r_full.header").read_bytes()
INCR = (DATA / "r_incr.header").read_bytes()

TP_X, TP_X_Y = 0xFF9E896738DBD8B2, 0xBAB06B550A4B657D
X_SNAPS = {"c": 0xF27F2AC93BCC18A0, "b": 0xFA827D76006F5A43, "a": 0x9E4547492B76A62C}
Y_SNAPS = {"a": 0x244F633FC6267A04, "c": 0x2E28D23A3EE8DF6B}


def payload_of(records: bytes) -> bytes:
    (size,) = struct.unpack_from("<I", records, 4)
    return records[HEADER_SIZE : HEADER_SIZE + size]


# --- the zfs-fuse samples -------------------------------------------------------------------------------


@pytest.mark.parametrize(("records", "fromsnap", "y_parent"), [(FULL, None, X_SNAPS["c"]), (INCR, "a", X_SNAPS["a"])], ids=["full", "incr"])
def test_zfs_fuse_header_reads(records: bytes, fromsnap: str | None, y_parent: int) -> None:
    begin, header, end = read_header(records + b"substreams follow")
    assert end == len(records)
    assert begin == Begin(2, 0, 0, 0, 0, 0, "tp/x@c", len(payload_of(records)))
    assert (header.tosnap, header.fromsnap, header.recursive, header.raw, header.big_endian_host) == ("c", fromsnap, True, False, False)
    assert [pair.name for pair in header.nvlist] == ([] if fromsnap is None else ["fromsnap"]) + ["tosnap", "fss"]
    x, y = header.filesystems
    assert (x.guid, x.name, x.parent_from_snap_guid, x.origin) == (TP_X, "tp/x", 0, None)
    assert (y.guid, y.name, y.parent_from_snap_guid, y.origin) == (TP_X_Y, "tp/x/y", y_parent, None)
    # Numeric properties travel as UINT64 (compression=on is 1), user properties as a plain STRING.
    assert dict(x.props) == {"compression": 1}
    assert dict(y.props) == {"snapferry:test": "hello"}
    assert list(x.snaps.items()) == list(X_SNAPS.items())
    assert list(y.snaps.items()) == list(Y_SNAPS.items())
    assert {k: dict(v) for k, v in x.snapprops.items()} == {"c": {}, "b": {}, "a": {}}
    assert [p.name for p in x.nvlist] == ["name", "parentfromsnap", "props", "snaps", "snapprops"]
    assert header.filesystem(TP_X_Y) is y
    assert header.filesystem(1) is None


@pytest.mark.parametrize("records", [FULL, INCR], ids=["full", "incr"])
def test_zfs_fuse_header_repacks_byte_for_byte(records: bytes) -> None:
    payload = payload_of(records)
    assert payload[:4] == b"\1\1\0\0"
    assert nvlist.encode(nvlist.decode(payload), xdr=True) == payload
    begin, header, _ = read_header(records)
    assert header.to_payload() == payload
    assert ReplicationHeader.from_payload(payload) == header
    assert header_records(begin, header.to_payload()) == records
    assert header_records(compound_begin("tp/x@c"), payload) == records


def test_without_filesystems_drops_their_entries_only() -> None:
    _, header, _ = read_header(FULL)
    smaller = header.without_filesystems([TP_X_Y])
    assert [fs.name for fs in smaller.filesystems] == ["tp/x"]
    again = ReplicationHeader.from_payload(smaller.to_payload())
    assert again == smaller
    assert again.filesystems[0] == header.filesystems[0]
    assert header.without_filesystems([]).to_payload() == payload_of(FULL)


def test_big_endian_sender_kept() -> None:
    payload = bytearray(payload_of(FULL))
    payload[1] = 0
    header = ReplicationHeader.from_payload(bytes(payload))
    assert header.big_endian_host
    assert header.to_payload() == bytes(payload)


# --- refusals of the header -----------------------------------------------------------------------------


def header_payload(*pairs: NvPair) -> bytes:
    return encode_xdr(NvList(pairs))


def fs(*pairs: NvPair) -> NvPair:
    return NvPair("fss", NvType.NVLIST, NvList((NvPair("0x1f", NvType.NVLIST, NvList(pairs)),)))


TOSNAP = NvPair("tosnap", NvType.STRING, "s")
NAME = NvPair("name", NvType.STRING, "p/fs")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (nvlist.encode(NvList((TOSNAP,))), "^the compound BEGIN's payload is not an XDR-encoded nvlist: corrupt stream$"),
        (b"", "^the compound BEGIN's payload is not an XDR-encoded nvlist"),
        (b"\1\1\0\0", "^malformed nvlist: 4 bytes are too few for a packed nvlist$"),
        (header_payload(fs(NAME)), "^the -R header names no tosnap: corrupt stream$"),
        (header_payload(TOSNAP), "^the -R header has no fss list: corrupt stream$"),
        (header_payload(NvPair("tosnap", NvType.UINT64, 1)), "^tosnap in the -R header is a UINT64, not a STRING: corrupt stream$"),
        (
            header_payload(TOSNAP, NvPair("fss", NvType.NVLIST, NvList((NvPair("fs", NvType.NVLIST, NvList()),)))),
            "holds 'fs', not a file system guid",
        ),
        (
            header_payload(TOSNAP, NvPair("fss", NvType.NVLIST, NvList((NvPair("0x1", NvType.UINT64, 1),)))),
            "file system 0x1 in the -R header is a UINT64",
        ),
        (header_payload(TOSNAP, fs()), "^file system 0x1f in the -R header has no name: corrupt stream$"),
        (
            header_payload(TOSNAP, fs(NAME, NvPair("snaps", NvType.NVLIST, NvList((NvPair("a", NvType.STRING, "x"),))))),
            "snapshot 'a' of p/fs",
        ),
        (
            header_payload(TOSNAP, fs(NAME, NvPair("props", NvType.NVLIST, NvList((NvPair("q", NvType.INT32, 1),))))),
            "property 'q' of p/fs .* INT32",
        ),
        (header_payload(TOSNAP, fs(NAME, NvPair("snapprops", NvType.NVLIST, NvList((NvPair("a", NvType.UINT64, 1),))))), "p/fs@a"),
        (header_payload(TOSNAP, fs(NAME, NvPair("origin", NvType.STRING, "x"))), "^origin in file system 0x1f .* not a UINT64"),
        (
            header_payload(TOSNAP, NvPair("not_recursive", NvType.BOOLEAN_VALUE, True), fs(NAME)),
            "^not_recursive in the -R header is a BOOLEAN_VALUE",
        ),
    ],
    ids=lambda v: "" if isinstance(v, bytes) else v,
)
def test_bad_headers_refused(payload: bytes, message: str) -> None:
    with pytest.raises(StreamFormatError, match=message) as info:
        ReplicationHeader.from_payload(payload)
    assert "\n" not in str(info.value)


def test_twice_listed_file_system_refused() -> None:
    entry = NvPair("0x1f", NvType.NVLIST, NvList((NAME,)))
    with pytest.raises(StreamFormatError, match="^the -R header lists file system 0x1f twice"):
        ReplicationHeader.from_payload(header_payload(TOSNAP, NvPair("fss", NvType.NVLIST, NvList((entry, entry)))))


def test_read_header_refusals() -> None:
    with pytest.raises(StreamTruncated, match=r"^input ended inside the compound BEGIN record \(100 of 312 bytes\)$"):
        read_header(FULL[:100])
    with pytest.raises(StreamTruncated, match="^input ended inside the -R header at byte 1500, before its END record at byte 1396$"):
        read_header(FULL[:1500])
    bad_sum = bytearray(FULL)
    bad_sum[400] ^= 1
    with pytest.raises(StreamIntegrityError, match="^the -R header's END checksum does not match"):
        read_header(bytes(bad_sum))
    plain = bytearray(FULL)
    plain[8 + 8] = 1  # versioninfo: a substream
    with pytest.raises(StreamFormatError, match="^stream header type 1 is not a compound stream"):
        read_header(bytes(plain))
    with pytest.raises(StreamFormatError, match="followed by record type 3, not its END"):
        read_header(FULL[:1396] + b"\3" + FULL[1397:])


def test_a_minimal_header_builds_and_reads() -> None:
    payload = header_payload(TOSNAP, NvPair("not_recursive", NvType.BOOLEAN), NvPair("raw", NvType.BOOLEAN), fs(NAME))
    records = header_records(compound_begin("p/fs@s", features=1 << 22), payload)
    begin, header, end = read_header(records)
    assert (begin.send_flags, end, header.recursive, header.raw) == ("c", len(records), False, True)
    assert header.filesystems[0].props == {} and header.filesystems[0].snaps == {}
    with pytest.raises(ValueError, match="cannot be sent"):
        header_records(begin, b"abc")


# --- the XDR encoding ------------------------------------------------------------------------------------


def test_xdr_layout_of_each_kind_of_value() -> None:
    """The bytes libnvpair writes: sizes (XDR, native), name, type, nelem, value; chars sign-extended; nothing for an empty array."""
    packed = encode_xdr(
        NvList(
            (
                NvPair("b", NvType.BOOLEAN),
                NvPair("u8", NvType.UINT8, 200),
                NvPair("e", NvType.UINT64_ARRAY, ()),
                NvPair("ba", NvType.BYTE_ARRAY, b"\1\2\3\4\5"),
                NvPair("sa", NvType.STRING_ARRAY, ("ab", "")),
            )
        )
    )
    assert packed == b"".join(
        [
            b"\1\1\0\0",
            struct.pack(">iI", 0, 1),
            struct.pack(">ii", 24, 24) + struct.pack(">I", 1) + b"b\0\0\0" + struct.pack(">ii", 1, 0),
            struct.pack(">ii", 28, 32) + struct.pack(">I", 2) + b"u8\0\0" + struct.pack(">ii", 23, 1) + struct.pack(">i", -56),
            # nvs_xdr_nvp_size counts the element count (4 bytes) that the empty array does not write.
            struct.pack(">ii", 28, 24) + struct.pack(">I", 1) + b"e\0\0\0" + struct.pack(">ii", 16, 0),
            struct.pack(">ii", 32, 32) + struct.pack(">I", 2) + b"ba\0\0" + struct.pack(">ii", 10, 5) + b"\1\2\3\4\5\0\0\0",
            struct.pack(">ii", 36, 48)
            + struct.pack(">I", 2)
            + b"sa\0\0"
            + struct.pack(">ii", 17, 2)
            + struct.pack(">I", 2)
            + b"ab\0\0"
            + bytes(4),
            bytes(8),
        ]
    )
    assert decode_xdr(packed).get("u8") == NvPair("u8", NvType.UINT8, 200)


def test_zero_extended_chars_read_too() -> None:
    """A sender whose C char is unsigned writes 200 as 0x000000c8; it reads back, and re-packs sign-extended."""
    nvl = NvList((NvPair("u8", NvType.UINT8, 200), NvPair("i8", NvType.INT8, -3)))
    packed = encode_xdr(nvl)
    unsigned = packed.replace(struct.pack(">i", -56), struct.pack(">i", 200)).replace(struct.pack(">i", -3), struct.pack(">i", 253))
    assert unsigned != packed
    assert decode_xdr(unsigned) == nvl


def xdr_pair(name: bytes, kind: int, nelem: int, value: bytes, sizes: tuple[int, int] = (99, 99)) -> bytes:
    return (
        struct.pack(">ii", *sizes)
        + struct.pack(">I", len(name))
        + name.ljust((len(name) + 3) & ~3, b"\0")
        + struct.pack(">ii", kind, nelem)
        + value
    )


HEAD = b"\1\1\0\0" + struct.pack(">iI", 0, 1)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\1\1\0\0" + bytes(4), "8 bytes are too few for a packed nvlist"),
        (b"\1\1\0\0" + bytes(12), r"it ends at byte 16, inside a list \(its end mark is missing\)$"),
        (b"\1\2\0\0" + bytes(16), "unknown byte order 2"),
        (b"\1\1\0\0" + struct.pack(">iI", 1, 0) + bytes(8), "the top-level list has nvlist version 1, not 0"),
        (HEAD + bytes(8) + bytes(3), "3 bytes follow its end at byte 20"),
        (HEAD + struct.pack(">ii", 5, 0), "the end mark at byte 12 has an encoded size of 5, not 0"),
        (HEAD + xdr_pair(b"x", 27, 1, bytes(8)), "pair 'x' at byte 12 has unsupported data type 27"),
        (HEAD + xdr_pair(b"\xff", 8, 1, bytes(8)), "the name of the pair at byte 12 is not UTF-8"),
        (HEAD + xdr_pair(b"a\0b", 8, 1, bytes(8)), "the name of the pair at byte 12 contains a NUL$"),
        (HEAD + struct.pack(">iiI", 1, 1, 0x7FFFFFFF), "the name of the pair at byte 12 claims 2147483647 bytes, with 0 left$"),
        (HEAD + xdr_pair(b"x", 8, 2, bytes(16)), r"pair 'x' \(UINT64\) at byte 12 has 2 elements, wants one element"),
        (
            HEAD + xdr_pair(b"x", 16, 0x7FFFFFFF, bytes(8)),
            r"pair 'x' \(UINT64_ARRAY\) at byte 12 has 2147483647 elements, more than the 8 bytes left can hold$",
        ),
        (
            HEAD + xdr_pair(b"x", 16, 2, struct.pack(">I", 3) + bytes(16)),
            r"pair 'x' \(UINT64_ARRAY\) at byte 12 has 2 elements but an array count of 3$",
        ),
        (
            HEAD + xdr_pair(b"x", 21, 1, struct.pack(">i", 2)),
            r"pair 'x' \(BOOLEAN_VALUE\) at byte 12 holds 2, out of range for BOOLEAN_VALUE$",
        ),
        (HEAD + xdr_pair(b"x", 4, 1, struct.pack(">i", -1)), r"pair 'x' \(UINT16\) at byte 12 holds 4294967295, out of range for UINT16$"),
        (HEAD + xdr_pair(b"x", 9, 1, struct.pack(">I", 1) + b"ab\0\0") + bytes(8), r"pair 'x' \(STRING\) at byte 12 has non-zero padding$"),
        (HEAD + xdr_pair(b"x", 8, 1, bytes(8), (36, 32)) + bytes(8), "pair 'x' at byte 12 states sizes 36/32, its contents make 32/32"),
        (HEAD + xdr_pair(b"x", 19, 1, struct.pack(">iI", 3, 0)), r"pair 'x' \(NVLIST\) at byte 12 has nvlist version 3, not 0"),
    ],
    ids=lambda v: "" if isinstance(v, bytes) else v,
)
def test_damaged_xdr_refused(data: bytes, reason: str) -> None:
    with pytest.raises(NvlistError, match=f"^malformed nvlist: {reason}"):
        nvlist.decode(data)


def nested(depth: int) -> NvList:
    nvl = NvList((NvPair("leaf", NvType.UINT64, 1),))
    for _ in range(depth):
        nvl = NvList((NvPair("n", NvType.NVLIST, nvl),))
    return nvl


def test_depth_limit() -> None:
    deepest = nested(MAX_DEPTH)
    assert decode_xdr(encode_xdr(deepest)) == deepest
    with pytest.raises(ValueError, match=f"nests lists more than {MAX_DEPTH} deep"):
        encode_xdr(NvList((NvPair("n", NvType.NVLIST, deepest),)))
    # One level more, by hand: a pair around the deepest list's own version, flag and pairs.
    inner = encode_xdr(deepest)[4:]
    size = 4 + 4 + 8 + 4 + 4 + len(inner)
    deeper = b"\1\1\0\0" + struct.pack(">iI", 0, 1) + xdr_pair(b"n", 19, 1, inner, (size, 48)) + bytes(8)
    with pytest.raises(NvlistError, match=f"nests lists more than {MAX_DEPTH} deep$"):
        nvlist.decode(deeper)


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (NvPair("x", NvType.STRING, "a\0b"), "contains a NUL"),
        (NvPair("x", NvType.UINT8, 256), "cannot hold 256"),
        (NvPair("x", NvType.BOOLEAN_VALUE, 1), "cannot hold 1"),
        (NvPair("x", NvType.NVLIST, "no"), "takes an NvList"),
        (NvPair("x", NvType.INT32_ARRAY, [1]), "takes a tuple"),
        (NvPair("x", NvType.BYTE_ARRAY, (1,)), "takes bytes"),
        (NvPair("x", NvType.BOOLEAN, 0), "takes no value"),
    ],
)
def test_encode_refuses_what_cannot_be_packed(pair: NvPair, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_xdr(NvList((pair,)))


@settings(max_examples=200, deadline=None)
@given(nvlists, st.booleans())
def test_random_nvlists_round_trip_through_xdr(nvl: NvList, big: bool) -> None:
    packed = nvlist.encode(nvl, xdr=True, big_endian=big)
    assert packed[:2] == bytes([1, 0 if big else 1])
    assert nvlist.decode(packed) == nvl
    assert encode_xdr(decode_xdr(packed), big_endian_host=big) == packed
    # The native encoding of the same list decodes to it too: both encodings carry the same lists.
    assert nvlist.decode(nvlist.encode(nvl)) == nvl


def decodes_canonically_or_raises(data: bytes) -> None:
    try:
        nvl = nvlist.decode(data)
    except NvlistError as exc:
        assert "\n" not in str(exc)
        return
    # Whatever decodes was packed as libnvpair packs: it re-packs to the same bytes (up to a char's sign extension).
    assert nvlist.decode(encode_xdr(nvl, big_endian_host=data[1] == 0)) == nvl


@settings(max_examples=150, deadline=None)
@given(nvlists, st.randoms(use_true_random=False))
def test_damaged_xdr_only_raises_nvlist_error(nvl: NvList, rnd: random.Random) -> None:
    for packed in damages(encode_xdr(nvl), rnd, 30):
        decodes_canonically_or_raises(b"\1" + packed[1:])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"\1\1\0\0", b"\1\1\0\0\0\0\0\0\0\0\0\1", b"\1\0\0\0\0\0\0\0\0\0\0\0"]))
def test_arbitrary_xdr_bytes_only_raise_nvlist_error(data: bytes, head: bytes) -> None:
    decodes_canonically_or_raises(head + data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([FULL, INCR]), st.randoms(use_true_random=False))
def test_damaged_headers_only_raise_stream_format_errors(records: bytes, rnd: random.Random) -> None:
    """Damage to the payload with the END checksum made right again: the nvlist and header checks must catch it."""
    payload = payload_of(records)
    begin = Begin.decode(records[:HEADER_SIZE], supported_only=False)
    for damaged in damages(payload, rnd, 10):
        damaged = damaged[: len(damaged) & ~3]
        try:
            header = ReplicationHeader.from_payload(damaged)
        except StreamFormatError as exc:
            assert "\n" not in str(exc)
            continue
        assert read_header(header_records(begin, header.to_payload()))[1] == header


def test_zfs_fuse_clone_and_snapshot_properties() -> None:
    """A clone names its origin snapshot by guid (after parentfromsnap); a snapshot's user property sits in snapprops as a STRING."""
    records = (DATA / "r_clone.header").read_bytes()
    _, header, end = read_header(records)
    assert end == len(records) and header.to_payload() == payload_of(records)
    root, a, c = header.filesystems
    assert [fs.name for fs in header.filesystems] == ["xdrtest1", "xdrtest1/a", "xdrtest1/c"]
    assert list(a.snaps) == ["s2", "s1"]  # not creation order: s1 was made first
    assert {k: dict(v) for k, v in a.snapprops.items()} == {"s2": {}, "s1": {"snapferry:u": "v"}}
    assert (root.origin, a.origin, c.origin) == (None, None, a.snaps["s1"])
    assert [p.name for p in c.nvlist] == ["name", "parentfromsnap", "origin", "props", "snaps", "snapprops"]
    assert dict(c.props) == {} and list(c.snaps) == ["s2"]


def test_a_property_package_carries_one_file_system_and_one_snapshot() -> None:
    """The records that make a substream a `zfs send -p` package: one file system, its properties less those left
    out, the one snapshot with its own properties, no fromsnap (so zfs receive renames nothing), and a final END."""
    _, header, _ = read_header(FULL)
    x = header.filesystems[0]
    before, after = property_package(x, "tp/x@b", 1234, leave_out={"compression"}, features=4)
    begin, package, end = read_header(before + b"substream")
    assert end == len(before)
    assert (begin.toname, begin.features) == ("tp/x@b", 4)
    assert (package.tosnap, package.fromsnap, package.recursive) == ("b", None, False)
    (only,) = package.filesystems
    assert (only.guid, only.name, dict(only.props), dict(only.snaps)) == (x.guid, "tp/x", {}, {"b": 1234})
    assert {k: dict(v) for k, v in only.snapprops.items()} == {"b": {}}
    assert after == FINAL_END
    kept, _ = property_package(x, "tp/x@new", 5)
    assert dict(read_header(kept)[1].filesystems[0].props) == {"compression": 1}
    assert "snapprops" not in [p.name for p in read_header(kept)[1].filesystems[0].nvlist]
