"""StreamReader / StampedWriter on real OpenZFS 2.3.2 and 2.1.11 streams, and on damaged copies of them."""

from __future__ import annotations

import functools
import io
import random
import re
import struct
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapferry.errors import SnapferryError, StreamFormatError, StreamIntegrityError, StreamTruncated, TransferInterrupted
from snapferry.zfs.codec.fletcher import Fletcher4
from snapferry.zfs.codec.records import (
    BEGIN_MAGIC,
    BEGIN_MAGIC_SWAPPED,
    FLAG_CLONE,
    HEADER_SIZE,
    STAMP_OFFSET,
    STAMP_SIZE,
    Begin,
    RecordType,
    end_checksum,
)
from snapferry.zfs.codec.stream import StampedWriter, StreamReader
from snapferry_testkit.shared_data import OPENZFS_DATA

DATA = OPENZFS_DATA
VERSIONS = ("zfs-2.3.2", "zfs-2.1.11")
STEMS = ("full_s1", "full_s1.resume", "incr_s1_s2", "incr_s1_s2.resume")
STREAMS = [f"{v}/{s}.stream" for v in VERSIONS for s in STEMS]
# zstream dump -v output exists for every stream except incr_s1_s2.stream.
DUMPED = [name for name in STREAMS if "incr_s1_s2.stream" not in name]
# The smallest real stream (15 records, 1.3 MB), for the slower per-example tests.
SMALL = "zfs-2.3.2/incr_s1_s2.resume.stream"
FULL = "zfs-2.3.2/full_s1.stream"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="OpenZFS fixtures not available")


# --- helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rec:
    """A copy of what StreamReader yielded for one record (its payload is only valid briefly)."""

    kind: RecordType
    offset: int
    size: int
    header: bytes
    payload_len: int
    fingerprint: Fletcher4

    @property
    def end_offset(self) -> int:
        return self.offset + self.size

    @property
    def header_end(self) -> int:
        return self.offset + HEADER_SIZE

    @property
    def stamp_at(self) -> int:
        return self.offset + STAMP_OFFSET


@functools.cache
def stream_bytes(name: str) -> bytes:
    return (DATA / name).read_bytes()


def read_stream(data: bytes, fingerprint_from: int | None = None) -> tuple[Begin, bytes, list[Rec]]:
    reader = StreamReader(io.BytesIO(data))
    result = reader.read_begin()
    assert result is not None
    begin, begin_bytes = result
    start = len(begin_bytes)
    recs = [
        Rec(r.kind, r.offset, r.size, bytes(r.header), len(r.payload), r.fingerprint)
        for r in reader.records(begin_bytes, start, start if fingerprint_from is None else fingerprint_from)
    ]
    assert reader.bytes_read == recs[-1].end_offset
    return begin, begin_bytes, recs


@functools.cache
def parsed(name: str) -> tuple[Begin, bytes, list[Rec]]:
    return read_stream(stream_bytes(name))


def consume(data: bytes) -> list[RecordType]:
    """Read a whole stream the way the brief prescribes; return the record kinds after BEGIN."""
    reader = StreamReader(io.BytesIO(data))
    result = reader.read_begin()
    if result is None:
        return []
    _, begin_bytes = result
    return [r.kind for r in reader.records(begin_bytes, len(begin_bytes), len(begin_bytes))]


def rewrite_stamps(data: bytes, recs: list[Rec], keep: set[int] | None = None) -> bytes:
    """Restamp `data`, keeping a stamp only on records whose index is in `keep` (None: none kept).

    The END checksum is recomputed, since the zeroed stamps are part of the running sum.
    """
    out = bytearray(data)
    state = Fletcher4()
    pos = 0
    for i, rec in enumerate(recs):
        if rec.kind == RecordType.END:
            state = state.update(out[pos : rec.offset])
            pos = rec.offset
            out[rec.offset + 8 : rec.offset + 40] = state.to_bytes()
        state = state.update(out[pos : rec.stamp_at])
        stamp = state.to_bytes() if keep is not None and i in keep else bytes(STAMP_SIZE)
        out[rec.stamp_at : rec.stamp_at + STAMP_SIZE] = stamp
        state = state.update(stamp)
        pos = rec.stamp_at + STAMP_SIZE
    assert pos == len(out)
    return bytes(out)


@functools.cache
def unstamped(name: str) -> bytes:
    return rewrite_stamps(stream_bytes(name), parsed(name)[2])


def restamp_with_writer(data: bytes) -> tuple[bytes, int]:
    """Re-write a stream through StampedWriter: original BEGIN and payload, every record, end(toguid)."""
    out: list[bytes] = []
    writer = StampedWriter(lambda parts: out.extend(bytes(p) for p in parts))
    reader = StreamReader(io.BytesIO(data))
    result = reader.read_begin()
    assert result is not None
    begin, begin_bytes = result
    writer.begin(begin, begin_bytes[HEADER_SIZE:])
    for record in reader.records(begin_bytes, len(begin_bytes), len(begin_bytes)):
        if record.kind == RecordType.END:
            writer.end(begin.toguid)
        else:
            writer.record(record)
    return b"".join(out), writer.bytes_written


def flip(data: bytes, pos: int, mask: int = 0x10) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


def put(data: bytes, pos: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, pos, value)
    return bytes(out)


def first(recs: list[Rec], kind: RecordType, nth: int = 0) -> tuple[int, Rec]:
    matches = [(i, r) for i, r in enumerate(recs) if r.kind == kind]
    return matches[nth]


# --- dump.txt parsing --------------------------------------------------------------------------

_KIND_LINE = re.compile(r"^(" + "|".join(k.name for k in RecordType if k != RecordType.BEGIN) + r") ", re.M)


def dump_text(name: str) -> str:
    return (DATA / f"{name}.dump.txt").read_text()


def dump_begin_fields(text: str) -> dict[str, str]:
    block = text.split("BEGIN record\n", 1)[1].split("\n\n", 1)[0]
    return dict(re.findall(r"^\t(\w+) = (.*)$", block, re.M))


def dump_summary(text: str) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    summary = text.split("SUMMARY:", 1)[1]
    pattern = r"Total DRR_(\w+) records = (\d+) \((\d+) bytes\)"
    per_kind = {k: (int(n), int(b)) for k, n, b in re.findall(pattern, summary)}
    totals = {k: int(v) for k, v in re.findall(r"Total (records|payload size|stream length) = (\d+)", summary)}
    return per_kind, totals


def decoded_token(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^\t(\w+) = (.*)$", path.read_text(), re.M))


# --- reading real streams ----------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_real_stream_parses_to_end(name: str) -> None:
    data = stream_bytes(name)
    begin, begin_bytes, recs = parsed(name)
    assert len(begin_bytes) == HEADER_SIZE + begin.payloadlen
    assert recs[0].offset == len(begin_bytes)
    for prev, rec in pairwise(recs):
        assert rec.offset == prev.end_offset
    assert [r.kind for r in recs].count(RecordType.END) == 1
    assert recs[-1].kind == RecordType.END
    assert recs[-1].end_offset == len(data)
    # modern OpenZFS stamps every record after BEGIN
    assert all(r.header[STAMP_OFFSET:] != bytes(STAMP_SIZE) for r in recs)
    assert end_checksum(recs[-1].header) == Fletcher4().update(data[: recs[-1].offset])


@pytest.mark.parametrize("name", DUMPED)
def test_records_match_zstream_dump(name: str) -> None:
    text = dump_text(name)
    data = stream_bytes(name)
    begin, _, recs = parsed(name)

    assert [r.kind.name for r in recs] == _KIND_LINE.findall(text)

    writes = [r.payload_len for r in recs if r.kind == RecordType.WRITE]
    dump_writes = [int(s) for s in re.findall(r"^WRITE .* payload_size = (\d+)", text, re.M)]
    assert writes == dump_writes

    per_kind, totals = dump_summary(text)
    counts = Counter(r.kind.name for r in recs)
    sizes: Counter[str] = Counter()
    for r in recs:
        sizes[r.kind.name] += r.payload_len
    counts["BEGIN"], sizes["BEGIN"] = 1, begin.payloadlen
    assert per_kind["WRITE"][0] > 0
    for kind, (count, size) in per_kind.items():
        assert (counts[kind], sizes[kind]) == (count, size), kind
    assert set(counts) <= set(per_kind)
    assert totals["records"] == len(recs) + 1
    assert totals["payload size"] == sum(sizes.values())
    assert totals["stream length"] == len(data)

    match = re.search(r"^END checksum = (\w+)/(\w+)/(\w+)/(\w+)$", text, re.M)
    assert match
    assert end_checksum(recs[-1].header) == Fletcher4(*(int(g, 16) for g in match.groups()))


@pytest.mark.parametrize("name", DUMPED)
def test_begin_fields_match_zstream_dump(name: str) -> None:
    begin, begin_bytes, _ = parsed(name)
    fields = dump_begin_fields(dump_text(name))
    assert int(fields["hdrtype"]) == begin.header_type == 1
    assert int(fields["features"], 16) == begin.features
    assert int(fields["magic"], 16) == BEGIN_MAGIC == struct.unpack_from("<Q", begin_bytes, 8)[0]
    assert int(fields["creation_time"], 16) == begin.creation_time
    assert int(fields["type"]) == begin.objset_type
    assert int(fields["flags"], 16) == begin.flags
    assert int(fields["toguid"], 16) == begin.toguid
    assert int(fields["fromguid"], 16) == begin.fromguid
    assert fields["toname"] == begin.toname
    assert int(fields["payloadlen"]) == begin.payloadlen


def test_begin_of_full_stream_2_3_2() -> None:
    begin, begin_bytes, _ = parsed(FULL)
    assert begin.toguid == 2887691134460246904 == 0x281323C9828C3B78
    assert begin.fromguid == 0
    assert not begin.is_incremental
    assert begin.toname == "tank/src@s1"
    assert begin.snapshot_name == "s1"
    assert begin.header_type == 1
    assert begin.payloadlen == 0
    assert len(begin_bytes) == HEADER_SIZE


def test_begin_of_incremental_stream_2_3_2() -> None:
    begin, _, _ = parsed("zfs-2.3.2/incr_s1_s2.stream")
    assert begin.toguid == 6082414131766827790
    assert begin.fromguid == 2887691134460246904
    assert begin.is_incremental
    assert begin.snapshot_name == "s2"
    assert begin.features & (1 << 22)  # COMPRESSED: sent with -c
    assert begin.features & (1 << 16)  # EMBED_DATA: sent with -e


@pytest.mark.parametrize("version", VERSIONS)
def test_begins_agree_with_each_other_and_the_tokens(version: str) -> None:
    full, _, _ = parsed(f"{version}/full_s1.stream")
    full_resume, _, _ = parsed(f"{version}/full_s1.resume.stream")
    incr, _, _ = parsed(f"{version}/incr_s1_s2.stream")
    incr_resume, _, _ = parsed(f"{version}/incr_s1_s2.resume.stream")
    assert full.toguid == full_resume.toguid
    assert incr.toguid == incr_resume.toguid
    assert incr.fromguid == incr_resume.fromguid == full.toguid
    assert full_resume.features & (1 << 20) and incr_resume.features & (1 << 20)  # RESUMING
    assert not full.features & (1 << 20)
    assert full_resume.payloadlen > 0 and full.payloadlen == 0

    token = decoded_token(DATA / version / "full_s1.token.decoded.txt")
    assert int(token["toguid"], 16) == full.toguid
    assert token["toname"] == full.toname
    token = decoded_token(DATA / version / "incr_s1_s2.token.decoded.txt")
    assert int(token["toguid"], 16) == incr.toguid
    assert int(token["fromguid"], 16) == incr.fromguid


@pytest.mark.parametrize("name", [f"{v}/{s}.resume.stream" for v in VERSIONS for s in ("full_s1", "incr_s1_s2")])
def test_resume_stream_starts_at_token_position(name: str) -> None:
    stem = name.rsplit("/", 1)[1].split(".")[0]
    token = decoded_token(DATA / name.split("/")[0] / f"{stem}.token.decoded.txt")
    _, _, recs = parsed(name)
    _, write = first(recs, RecordType.WRITE)
    obj, offset = struct.unpack_from("<Q", write.header, 8)[0], struct.unpack_from("<Q", write.header, 24)[0]
    assert (obj, offset) == (int(token["object"], 16), int(token["offset"], 16))


def test_compressed_write_payload_is_compressed_size() -> None:
    _, _, recs = parsed("zfs-2.3.2/incr_s1_s2.stream")
    compressed = [r for r in recs if r.kind == RecordType.WRITE and r.header[50]]
    assert compressed
    for r in compressed:
        logical, csize = struct.unpack_from("<Q", r.header, 32)[0], struct.unpack_from("<Q", r.header, 96)[0]
        assert r.payload_len == csize < logical


def test_write_embedded_payload_is_rounded_psize() -> None:
    _, _, recs = parsed("zfs-2.3.2/incr_s1_s2.stream")
    _, rec = first(recs, RecordType.WRITE_EMBEDDED)
    psize = struct.unpack_from("<I", rec.header, 52)[0]
    assert psize == 28
    assert rec.payload_len == 32


def test_empty_input_has_no_begin() -> None:
    assert StreamReader(io.BytesIO(b"")).read_begin() is None


@pytest.mark.parametrize("name", STREAMS)
def test_begin_encode_reproduces_header(name: str) -> None:
    begin, begin_bytes, _ = parsed(name)
    assert begin.encode() == begin_bytes[:HEADER_SIZE]
    assert Begin.decode(begin.encode()) == begin


# --- writing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_restamping_real_stream_is_byte_identical(name: str) -> None:
    data = stream_bytes(name)
    out, written = restamp_with_writer(data)
    assert written == len(out) == len(data)
    assert out == data


@pytest.mark.parametrize("name", [FULL, "zfs-2.1.11/incr_s1_s2.stream", SMALL])
def test_unstamped_stream_is_accepted_and_restamped_to_the_original(name: str) -> None:
    data = stream_bytes(name)
    bare = unstamped(name)
    assert bare != data
    _, _, recs = read_stream(bare)
    assert all(r.header[STAMP_OFFSET:] == bytes(STAMP_SIZE) for r in recs)
    assert [r.kind for r in recs] == [r.kind for r in parsed(name)[2]]
    out, _ = restamp_with_writer(bare)
    assert out == data


def test_partially_stamped_stream_is_accepted() -> None:
    data = stream_bytes(FULL)
    recs = parsed(FULL)[2]
    mixed = rewrite_stamps(data, recs, keep=set(range(0, len(recs), 3)))
    assert consume(mixed) == [r.kind for r in recs]


def test_pieces_written_by_stamped_writer_read_back() -> None:
    """Cut a real stream into two pieces at a record boundary; each piece is a valid stream."""
    data = stream_bytes(FULL)
    begin, begin_bytes, recs = parsed(FULL)
    cut = recs[100].offset
    piece_guid = 0x1234_5678_9ABC_DEF0
    pieces: list[list[bytes]] = [[], []]
    writers = [StampedWriter(lambda parts, i=i: pieces[i].extend(bytes(p) for p in parts)) for i in (0, 1)]
    writers[0].begin(begin.derive(toguid=piece_guid, fromguid=0, toname="tank/src@part0"))
    writers[1].begin(begin.derive(toguid=begin.toguid, fromguid=piece_guid, toname=begin.toname))
    reader = StreamReader(io.BytesIO(data))
    assert reader.read_begin() is not None
    for record in reader.records(begin_bytes, len(begin_bytes), len(begin_bytes)):
        if record.kind == RecordType.END:
            break
        writers[0 if record.offset < cut else 1].record(record)
    writers[0].end(piece_guid)
    writers[1].end(begin.toguid)

    b0, _, recs0 = read_stream(b"".join(pieces[0]))
    b1, _, recs1 = read_stream(b"".join(pieces[1]))
    assert (b0.toguid, b0.fromguid, b0.toname) == (piece_guid, 0, "tank/src@part0")
    assert (b1.toguid, b1.fromguid, b1.toname) == (begin.toguid, piece_guid, begin.toname)
    assert [r.kind for r in recs0[:-1] + recs1] == [r.kind for r in recs]
    assert sum(r.size for r in recs0[:-1] + recs1[:-1]) == recs[-1].offset - len(begin_bytes)


def test_derive_drops_clone_flag_for_later_pieces() -> None:
    begin = Begin(17, 1, 2, 0xC | FLAG_CLONE, toguid=5, fromguid=7, toname="pool/fs@snap")
    same_origin = begin.derive(toguid=9, fromguid=7, toname="pool/fs@part0")
    later = begin.derive(toguid=10, fromguid=9, toname="pool/fs@part1")
    assert same_origin.flags & FLAG_CLONE
    assert not later.flags & FLAG_CLONE
    assert later.flags == 0xC
    assert (later.toguid, later.fromguid, later.toname, later.versioninfo) == (10, 9, "pool/fs@part1", 17)


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_ignores_stamps() -> None:
    stamped = read_stream(stream_bytes(SMALL))[2]
    bare = read_stream(unstamped(SMALL))[2]
    assert [r.fingerprint for r in stamped] == [r.fingerprint for r in bare]


def test_fingerprint_is_fletcher_of_unstamped_prefix() -> None:
    bare = unstamped(SMALL)
    recs = parsed(SMALL)[2]
    start = recs[3].offset
    _, _, recs = read_stream(stream_bytes(SMALL), fingerprint_from=start)
    for rec in recs:
        if rec.offset <= start:
            assert rec.fingerprint == Fletcher4()
        else:
            assert rec.fingerprint == Fletcher4().update(bare[start : rec.offset])


# --- not a stream / unsupported kinds ----------------------------------------------------------


def _begin_header(name: str = FULL) -> bytes:
    return stream_bytes(name)[:HEADER_SIZE]


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_not_a_stream(seed: int) -> None:
    junk = random.Random(seed).randbytes(4096)
    if struct.unpack_from("<I", junk)[0] == 0:
        junk = b"\x07" + junk[1:]
    with pytest.raises(StreamFormatError, match=r"stream does not start with a BEGIN record \(record type \d+\)"):
        consume(junk)


def test_bad_magic() -> None:
    junk = bytes(8) + random.Random(1).randbytes(4088)
    with pytest.raises(StreamFormatError, match=r"bad magic 0x[0-9a-f]+ in BEGIN record: not a ZFS send stream"):
        consume(junk)


def test_text_is_not_a_stream() -> None:
    with pytest.raises(StreamFormatError, match="does not start with a BEGIN record"):
        consume(b"Hello, this is definitely not a ZFS stream.\n" * 20)


def test_byte_swapped_magic() -> None:
    data = put(stream_bytes(FULL), 8, "<Q", BEGIN_MAGIC_SWAPPED)
    with pytest.raises(StreamFormatError, match="written by a host of the other byte order"):
        consume(data)


def test_big_endian_begin_is_reported_as_byte_swapped() -> None:
    # what a big-endian host would write: magic in big-endian order (type 0 is the same either way)
    header = bytearray(_begin_header())
    struct.pack_into(">Q", header, 8, BEGIN_MAGIC)
    with pytest.raises(StreamFormatError, match="byte-swapped streams are not supported"):
        consume(bytes(header))


def test_compound_stream() -> None:
    versioninfo = struct.unpack_from("<Q", _begin_header(), 16)[0]
    data = put(stream_bytes(FULL), 16, "<Q", (versioninfo & ~3) | 2)
    with pytest.raises(StreamFormatError, match=r"compound stream \(zfs send -R\) header where one dataset.s stream should start"):
        consume(data)


@pytest.mark.parametrize("hdrtype", [0, 3])
def test_unknown_header_type(hdrtype: int) -> None:
    versioninfo = struct.unpack_from("<Q", _begin_header(), 16)[0]
    data = put(stream_bytes(FULL), 16, "<Q", (versioninfo & ~3) | hdrtype)
    with pytest.raises(StreamFormatError, match=f"unknown stream header type {hdrtype} in BEGIN record"):
        consume(data)


@pytest.mark.parametrize("feature", [1 << 0, 1 << 1])  # DEDUP, DEDUPPROPS
def test_dedup_stream(feature: int) -> None:
    versioninfo = struct.unpack_from("<Q", _begin_header(), 16)[0]
    data = put(stream_bytes(FULL), 16, "<Q", versioninfo | (feature << 2))
    with pytest.raises(StreamFormatError, match=r"deduplicated stream \(zfs send -D\) is not supported"):
        consume(data)


def test_write_byref_record_means_dedup() -> None:
    data = stream_bytes(FULL)
    _, rec = first(parsed(FULL)[2], RecordType.WRITE)
    with pytest.raises(StreamFormatError, match=r"deduplicated stream \(zfs send -D\) is not supported"):
        consume(put(data, rec.offset, "<I", RecordType.WRITE_BYREF))


def test_toname_without_snapshot() -> None:
    header = bytearray(_begin_header())
    header[56:HEADER_SIZE] = b"tank/src".ljust(256, b"\0")
    with pytest.raises(StreamFormatError, match=r"BEGIN record names no snapshot \(toname 'tank/src'\)"):
        consume(bytes(header))


def test_unknown_record_type() -> None:
    data = put(stream_bytes(FULL), HEADER_SIZE, "<I", 99)
    message = "unknown record type 99 at byte 312: not a ZFS send stream, or corrupt"
    with pytest.raises(StreamFormatError, match=message):
        consume(data)


def test_begin_record_inside_stream() -> None:
    recs = parsed(FULL)[2]
    data = put(stream_bytes(FULL), recs[5].offset, "<I", RecordType.BEGIN)
    with pytest.raises(StreamFormatError, match=f"BEGIN record at byte {recs[5].offset} inside a stream"):
        consume(data)


# --- impossible payload lengths ----------------------------------------------------------------


def test_write_with_impossible_logical_size() -> None:
    _, rec = first(parsed(FULL)[2], RecordType.WRITE)
    assert rec.header[50] == 0  # uncompressed: the logical size is the payload size
    data = put(stream_bytes(FULL), rec.offset + 32, "<Q", 1 << 40)
    with pytest.raises(
        StreamFormatError,
        match=re.escape(f"WRITE record at byte {rec.offset} claims a {1 << 40}-byte payload (limit 16777216): corrupt"),
    ):
        consume(data)


def test_compressed_write_with_impossible_compressed_size() -> None:
    name = "zfs-2.3.2/incr_s1_s2.stream"
    rec = next(r for r in parsed(name)[2] if r.kind == RecordType.WRITE and r.header[50])
    data = put(stream_bytes(name), rec.offset + 96, "<Q", (16 << 20) + 8)
    with pytest.raises(StreamFormatError, match=f"WRITE record at byte {rec.offset} claims a 16777224-byte payload"):
        consume(data)


def test_write_payload_not_whole_words() -> None:
    _, rec = first(parsed(FULL)[2], RecordType.WRITE)
    data = put(stream_bytes(FULL), rec.offset + 32, "<Q", 1026)
    with pytest.raises(StreamFormatError, match=f"WRITE record at byte {rec.offset} has a payload of 1026 bytes, not whole words"):
        consume(data)


def test_object_with_impossible_bonus() -> None:
    _, rec = first(parsed(FULL)[2], RecordType.OBJECT)
    data = put(stream_bytes(FULL), rec.offset + 36, "<I", 1 << 20)  # raw_bonuslen
    with pytest.raises(StreamFormatError, match=f"OBJECT record at byte {rec.offset} claims a 1048576-byte payload"):
        consume(data)


def test_write_embedded_with_impossible_psize() -> None:
    name = "zfs-2.3.2/incr_s1_s2.stream"
    _, rec = first(parsed(name)[2], RecordType.WRITE_EMBEDDED)
    data = put(stream_bytes(name), rec.offset + 52, "<I", 200)
    message = f"WRITE_EMBEDDED record at byte {rec.offset} claims a 200-byte payload (limit 112)"
    with pytest.raises(StreamFormatError, match=re.escape(message)):
        consume(data)


def test_begin_with_impossible_payload() -> None:
    data = put(stream_bytes(FULL), 4, "<I", 1 << 21)
    with pytest.raises(StreamFormatError, match=re.escape("BEGIN record at byte 0 claims a 2097152-byte payload")):
        consume(data)


# --- truncation --------------------------------------------------------------------------------


def test_truncated_error_is_a_resumable_interruption() -> None:
    assert issubclass(StreamTruncated, TransferInterrupted)
    assert issubclass(StreamTruncated, SnapferryError)
    assert StreamTruncated.exit_code == TransferInterrupted.exit_code


@pytest.mark.parametrize("cut", [1, 100, HEADER_SIZE - 1])
def test_truncated_inside_begin(cut: int) -> None:
    with pytest.raises(StreamTruncated, match=re.escape(f"input ended inside the BEGIN record ({cut} of 312 bytes)")):
        consume(stream_bytes(FULL)[:cut])


def test_truncated_inside_begin_payload() -> None:
    name = "zfs-2.3.2/full_s1.resume.stream"
    with pytest.raises(StreamTruncated, match="input ended inside the BEGIN record's payload"):
        consume(stream_bytes(name)[: HEADER_SIZE + 50])


@pytest.mark.parametrize("index", [0, 1, 2, 100, -1])
def test_truncated_at_record_boundary(index: int) -> None:
    recs = parsed(FULL)[2]
    at = recs[index].offset
    with pytest.raises(StreamTruncated, match=f"input ended at stream byte {at}, before the END record"):
        consume(stream_bytes(FULL)[:at])


@pytest.mark.parametrize(("index", "into"), [(0, 1), (1, 8), (2, 100), (50, STAMP_OFFSET), (-1, HEADER_SIZE - 1)])
def test_truncated_mid_header(index: int, into: int) -> None:
    recs = parsed(FULL)[2]
    at = recs[index].offset + into
    with pytest.raises(StreamTruncated, match=f"input ended at stream byte {at}, inside a record header"):
        consume(stream_bytes(FULL)[:at])


def test_truncated_inside_payload() -> None:
    _, rec = first(parsed(FULL)[2], RecordType.WRITE, 3)
    with pytest.raises(StreamTruncated, match=f"input ended inside the WRITE record at stream byte {rec.offset}"):
        consume(stream_bytes(FULL)[: rec.offset + HEADER_SIZE + 1000])


@pytest.mark.parametrize(
    ("name", "cut"),
    [
        ("zfs-2.3.2/full_s1.stream", 3875548),
        ("zfs-2.3.2/incr_s1_s2.stream", 2180405),
        ("zfs-2.1.11/full_s1.stream", 3875548),
        ("zfs-2.1.11/incr_s1_s2.stream", 2171013),
    ],
)
def test_truncated_at_the_readme_cut_points(name: str, cut: int) -> None:
    """The same cuts that were fed to `zfs receive -s` to produce the fixture tokens."""
    rec = next(r for r in parsed(name)[2] if r.offset <= cut < r.end_offset)
    assert rec.kind == RecordType.WRITE and cut >= rec.offset + HEADER_SIZE
    with pytest.raises(StreamTruncated, match=f"input ended inside the WRITE record at stream byte {rec.offset}"):
        consume(stream_bytes(name)[:cut])


# --- corruption --------------------------------------------------------------------------------


def _mismatch(at: int, start: int, stop: int) -> str:
    message = f"checksum mismatch in the record at stream byte {at}: bytes {start}-{stop} were corrupted in transit"
    return re.escape(message)


@pytest.mark.parametrize("name", [FULL, "zfs-2.1.11/full_s1.stream", "zfs-2.3.2/incr_s1_s2.stream"])
def test_flipped_bit_in_write_payload_of_modern_stream(name: str) -> None:
    recs = parsed(name)[2]
    i, write = first(recs, RecordType.WRITE, 4)
    nxt = recs[i + 1]
    pos = write.offset + HEADER_SIZE + write.payload_len // 2
    with pytest.raises(StreamIntegrityError, match=_mismatch(nxt.offset, write.header_end, nxt.header_end)):
        consume(flip(stream_bytes(name), pos))
    assert write.header_end <= pos < nxt.header_end


@given(st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_flipped_payload_bit_is_caught_by_the_next_stamp(data: st.DataObject) -> None:
    recs = parsed(SMALL)[2]
    with_payload = [i for i, r in enumerate(recs) if r.payload_len]
    i = data.draw(st.sampled_from(with_payload))
    rec, nxt = recs[i], recs[i + 1]
    pos = rec.offset + HEADER_SIZE + data.draw(st.integers(0, rec.payload_len - 1))
    mask = 1 << data.draw(st.integers(0, 7))
    with pytest.raises(StreamIntegrityError, match=_mismatch(nxt.offset, rec.header_end, nxt.header_end)):
        consume(flip(stream_bytes(SMALL), pos, mask))


def test_flipped_bit_in_record_header_is_caught_by_its_own_stamp() -> None:
    recs = parsed(FULL)[2]
    i, write = first(recs, RecordType.WRITE, 2)
    pos = write.offset + 24  # drr_offset: changes nothing about the stream's shape
    with pytest.raises(StreamIntegrityError, match=_mismatch(write.offset, recs[i - 1].header_end, write.header_end)):
        consume(flip(stream_bytes(FULL), pos))


def test_flipped_bit_in_begin_is_caught_by_the_first_stamp() -> None:
    pos = 56 + 5  # inside toname
    with pytest.raises(StreamIntegrityError, match=r"checksum mismatch in the record at stream byte 312: "):
        consume(flip(stream_bytes(FULL), pos, 0x01))


def test_flipped_bit_in_end_checksum_of_modern_stream() -> None:
    end = parsed(FULL)[2][-1]
    with pytest.raises(StreamIntegrityError, match=f"checksum mismatch in the record at stream byte {end.offset}"):
        consume(flip(stream_bytes(FULL), end.offset + 20))


@pytest.mark.parametrize("name", [FULL, SMALL])
def test_flipped_bit_in_unstamped_stream_is_caught_at_end(name: str) -> None:
    recs = parsed(name)[2]
    _, write = first(recs, RecordType.WRITE, 1)
    end = recs[-1]
    bad = flip(unstamped(name), write.offset + HEADER_SIZE + 4321)
    # nothing was verified before END: the range starts at the stream's first byte
    message = f"stream checksum mismatch at END (stream byte {end.offset}): bytes 0-{end.header_end} were corrupted"
    with pytest.raises(StreamIntegrityError, match=re.escape(message)):
        consume(bad)


def test_flipped_end_checksum_of_unstamped_stream() -> None:
    end = parsed(SMALL)[2][-1]
    with pytest.raises(StreamIntegrityError, match=f"stream checksum mismatch at END \\(stream byte {end.offset}\\)"):
        consume(flip(unstamped(SMALL), end.offset + 30))


def test_partially_stamped_stream_narrows_the_range() -> None:
    recs = parsed(FULL)[2]
    i, write = first(recs, RecordType.WRITE, 10)
    # stamps only on the record before the WRITE and on the one three records later
    mixed = rewrite_stamps(stream_bytes(FULL), recs, keep={i - 1, i + 3})
    assert consume(mixed)
    bad = flip(mixed, write.offset + HEADER_SIZE + 7)
    expected = _mismatch(recs[i + 3].offset, recs[i - 1].header_end, recs[i + 3].header_end)
    with pytest.raises(StreamIntegrityError, match=expected):
        consume(bad)


def _named_range(message: str) -> tuple[int, int]:
    match = re.search(r"bytes (\d+)-(\d+) were corrupted", message)
    assert match, message
    return int(match[1]), int(match[2])


def test_flipped_bit_in_stamp_is_inside_the_named_range() -> None:
    recs = parsed(SMALL)[2]
    rec = recs[3]
    pos = rec.stamp_at + 10
    with pytest.raises(StreamIntegrityError) as info:
        consume(flip(stream_bytes(SMALL), pos))
    start, stop = _named_range(str(info.value))
    assert start <= pos < stop, f"flipped byte {pos} is outside the reported range {start}-{stop}"


def test_flipped_bit_in_begin_is_inside_the_named_range() -> None:
    pos = 56 + 5  # inside toname
    with pytest.raises(StreamIntegrityError) as info:
        consume(flip(stream_bytes(FULL), pos, 0x01))
    start, stop = _named_range(str(info.value))
    assert start <= pos < stop, f"flipped byte {pos} is outside the reported range {start}-{stop}"


# --- fuzzing -----------------------------------------------------------------------------------


@functools.cache
def small_prefix() -> tuple[bytes, tuple[int, ...]]:
    """The first records of a real compressed incremental stream (ends at a record boundary, no END),
    and the offsets of its records (BEGIN included)."""
    name = "zfs-2.3.2/incr_s1_s2.stream"
    recs = [r for r in parsed(name)[2] if r.end_offset <= 80_000]
    return stream_bytes(name)[: recs[-1].end_offset], (0, *(r.offset for r in recs))


_values = st.one_of(st.integers(0, 16), st.integers(0, (1 << 64) - 1))
_mutation = st.one_of(
    # a random byte anywhere (mostly payload bytes)
    st.tuples(st.just("xor"), st.integers(0, 1 << 20), st.integers(0, 7), st.integers(1, 255)),
    # an aligned 32- or 64-bit header field of some record: where types and lengths live
    st.tuples(st.sampled_from(["u32", "u64"]), st.integers(0, 1 << 10), st.integers(0, 69), _values),
)


@given(st.lists(_mutation, min_size=1, max_size=4), st.one_of(st.none(), st.integers(0, 1 << 20)))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_stream_raises_only_snapferry_errors(mutations: list[tuple[str, int, int, int]], truncate: int | None) -> None:
    prefix, offsets = small_prefix()
    data = bytearray(prefix)
    for op, where, field, value in mutations:
        if op == "xor":
            data[where % len(data)] ^= value
        else:
            size = 4 if op == "u32" else 8
            pos = offsets[where % len(offsets)] + 4 * field
            data[pos : pos + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    if truncate is not None:
        del data[truncate % (len(data) + 1) :]
    if not data:
        assert consume(b"") == []
        return
    # The prefix has no END, so no mutation can make it a complete valid stream; anything other
    # than a SnapferryError (struct.error, ValueError, MemoryError...) fails the test.
    with pytest.raises(SnapferryError):
        consume(bytes(data))


@pytest.mark.parametrize("name", ["zfs-2.3.2/full_s1.stream", "zfs-2.1.11/incr_s1_s2.stream"])
def test_modern_stream_cut_into_pieces_keeps_every_piece_verifiable(name: str) -> None:
    """Cut as the receiver does: each piece gets its own BEGIN, re-stamped records and END, and
    each verifies on its own (what a modern `zfs receive` checks)."""
    data = stream_bytes(name)
    reader = StreamReader(io.BytesIO(data))
    first = reader.read_begin()
    assert first is not None
    begin, begin_bytes = first
    pieces: list[bytes] = []
    out = bytearray()
    writer: StampedWriter | None = None
    base, guid = begin.fromguid, 0
    for record in reader.records(begin_bytes, len(begin_bytes), len(begin_bytes)):
        if writer is not None and (record.kind == RecordType.END or len(out) > 400_000):
            writer.end(guid)
            pieces.append(bytes(out))
            out.clear()
            base, writer = guid, None
        if record.kind == RecordType.END:
            break
        if writer is None:
            guid = len(pieces) + 1000
            writer = StampedWriter(lambda parts: out.extend(b"".join(bytes(p) for p in parts)))
            writer.begin(begin.derive(toguid=guid, fromguid=base, toname=f"pool/fs@piece{len(pieces)}"), begin_bytes[HEADER_SIZE:])
        writer.record(record)
    assert len(pieces) >= 3
    total_records = 0
    for piece in pieces:
        kinds = consume(piece)
        assert kinds[-1] == RecordType.END
        total_records += len(kinds) - 1
    assert total_records == len(parsed(name)[2]) - 1


# --- taking payload checksums from the stream's own stamps ---------------------------------------


def _both_readers(data: bytes, fingerprint_from: int | None = None) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """Every record as (kind, offset, header, payload, payload sum, fingerprint), read both ways."""
    runs = []
    for trusting in (False, True):
        reader = StreamReader(io.BytesIO(data))
        result = reader.read_begin()
        assert result is not None
        _, begin_bytes = result
        start = len(begin_bytes)
        frm = start if fingerprint_from is None else fingerprint_from
        read = reader.records_trusting_stamps if trusting else reader.records
        runs.append(
            [(r.kind, r.offset, bytes(r.header), bytes(r.payload), r.payload_sum, r.fingerprint) for r in read(begin_bytes, start, frm)]
        )
        assert reader.bytes_read == len(data)
    return runs[0], runs[1]


@pytest.mark.parametrize("name", STREAMS)
def test_stamps_give_the_same_payload_sums_as_summing(name: str) -> None:
    summed, derived = _both_readers(stream_bytes(name))
    assert derived == summed


@pytest.mark.parametrize("name", [f"{v}/full_s1.stream" for v in VERSIONS])
def test_unstamped_payloads_are_summed_and_agree(name: str) -> None:
    summed, derived = _both_readers(unstamped(name))
    assert derived == summed


def test_a_corrupted_payload_is_left_to_the_consumer_but_the_stamps_stay_true() -> None:
    data = bytearray(stream_bytes(SMALL))
    _, _, recs = parsed(SMALL)
    victim = next(r for r in recs if r.kind == RecordType.WRITE and r.payload_len)
    data[victim.header_end + 10] ^= 0x40
    _, derived_ok = _both_readers(stream_bytes(SMALL))
    with pytest.raises(StreamIntegrityError):
        _both_readers(bytes(data))
    reader = StreamReader(io.BytesIO(bytes(data)))
    result = reader.read_begin()
    assert result is not None
    derived = list(reader.records_trusting_stamps(result[1], len(result[1]), len(result[1])))
    # What the sender summed, not what arrived: so a consumer checking stamps sees the damage.
    assert [r.offset for r in derived] == [r[1] for r in derived_ok]


@pytest.mark.parametrize("cut", [1, 311, 312, 400, 5000])
def test_trusting_reader_reports_truncation(cut: int) -> None:
    data = stream_bytes(SMALL)
    reader = StreamReader(io.BytesIO(data[: len(data) - cut]))
    result = reader.read_begin()
    assert result is not None
    with pytest.raises(StreamTruncated):
        for _ in reader.records_trusting_stamps(result[1], len(result[1]), len(result[1])):
            pass
