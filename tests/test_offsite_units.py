"""The pure parts of offsite storage: addresses, records, chunk sealing, and reading a stamped ZFS stream from its middle."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapferry.errors import DatasetMissing, Refused, StoredChunkDamaged, StreamFormatError, StreamIntegrityError, UsageError
from snapferry.offsite.catalog import Entry, chain_to, needed_by
from snapferry.offsite.chunkseal import ChunkSeal
from snapferry.offsite.layout import BucketUrl, StoredSnapshot, chunk_key, parse_chunk_key
from snapferry.offsite.upload import _Chunker
from snapferry.zfs.codec.records import RecordType
from snapferry.zfs.codec.stream import StreamReader
from snapferry_testkit.shared_data import OPENZFS_DATA

RECORD = StoredSnapshot(
    backend="zfs",
    dataset="tank/home",
    snapshot="daily-1",
    identity="1234567890",
    order=42,
    created=1_700_000_000,
    base=None,
    base_identity=None,
    chunk_size=1 << 20,
    encryption=None,
    started=1_700_000_100,
)


def test_bucket_urls() -> None:
    url = BucketUrl.parse("s3://backups/host1/tank/home@daily-1")
    assert (url.bucket, url.path, url.snapshot) == ("backups", "host1/tank/home", "daily-1")
    assert BucketUrl.parse("s3://backups").path == ""
    assert BucketUrl.parse("s3://backups/host1/").below("/mnt/snaps") == "host1/mnt/snaps"
    for bad, message in (
        ("backups/x", "not an object store address"),
        ("s3://B/x", "not a bucket name"),
        ("s3://backups/a//b", "not a clean prefix"),
        ("s3://backups/a/../b", "not a clean prefix"),
        ("s3://backups/a@", "not a snapshot name"),
    ):
        with pytest.raises(UsageError, match=message):
            BucketUrl.parse(bad)


@given(st.integers(0, 10**8 - 1), st.binary(min_size=32, max_size=32))
def test_chunk_keys_round_trip(index: int, digest: bytes) -> None:
    assert parse_chunk_key(chunk_key(index, digest.hex())) == (index, digest.hex())


def test_chunk_keys_that_are_not_chunks() -> None:
    for name in ("manifest.json", "upload.json", "chunk-1-ab", "chunk-00000001-" + "g" * 64, "chunk-00000001-" + "a" * 63):
        assert parse_chunk_key(name) is None


@given(
    st.lists(st.integers(1, 1 << 20), min_size=0, max_size=5),
    st.dictionaries(st.sampled_from(["compression", "recordsize", "user:x"]), st.text(max_size=8)),
)
def test_manifests_round_trip(sizes: list[int], properties: dict[str, str]) -> None:
    chunks = tuple((1 << 20, f"{i:064x}") for i in range(len(sizes)))
    if sizes:
        chunks = (*chunks[:-1], (sizes[-1], chunks[-1][1]))
    manifest = replace(RECORD, finished=1_700_000_200, size=sum(s for s, _ in chunks), chunks=chunks, properties=tuple(properties.items()))
    if not chunks:
        manifest = replace(manifest, size=0)
    assert StoredSnapshot.decode(manifest.encode(), "k") == manifest


def test_damaged_or_foreign_records_are_refused_with_their_key() -> None:
    good = replace(RECORD, finished=1, size=3 << 20, chunks=((1 << 20, "a" * 64),) * 3)
    bad_sizes = good.encode().replace(b'"size": 3145728', b'"size": 3145729')
    for raw in (b"", b"{}", b"[1]", b'{"format": "other/1"}', good.encode()[:-20], bad_sizes):
        with pytest.raises(StreamFormatError, match="^host1/x/@s/manifest.json is not a snapferry backup record"):
            StoredSnapshot.decode(raw, "host1/x/@s/manifest.json")


@given(st.binary(max_size=4096))
def test_plain_chunks_are_the_bytes_and_their_sha256(data: bytes) -> None:
    seal = ChunkSeal(None)
    stored = seal.seal(data, "k")
    assert stored == data
    assert seal.open(stored, "k", seal.fingerprint(data)) == data


@given(st.binary(min_size=16, max_size=4096), st.integers(0, 1 << 20))
def test_sealed_chunks_round_trip_and_any_flipped_bit_is_refused(data: bytes, bit: int) -> None:
    seal = ChunkSeal(b"k" * 32)
    stored = seal.seal(data, "host1/x/@s/chunk-00000000-ab")
    assert data not in stored
    fingerprint = seal.fingerprint(data)
    assert seal.open(stored, "host1/x/@s/chunk-00000000-ab", fingerprint) == data
    position = bit % (len(stored) * 8)
    damaged = bytearray(stored)
    damaged[position // 8] ^= 1 << (position % 8)
    with pytest.raises(StoredChunkDamaged, match="does not decrypt"):
        seal.open(bytes(damaged), "host1/x/@s/chunk-00000000-ab", fingerprint)


def test_sealed_chunks_are_bound_to_their_key_and_secret() -> None:
    seal = ChunkSeal(os.urandom(32))
    stored = seal.seal(b"payload", "a/@s/chunk-00000001-x")
    fingerprint = seal.fingerprint(b"payload")
    with pytest.raises(StoredChunkDamaged, match="does not decrypt"):
        seal.open(stored, "a/@s/chunk-00000002-x", fingerprint)  # swapped into another place
    with pytest.raises(StoredChunkDamaged, match="does not decrypt"):
        ChunkSeal(os.urandom(32)).open(stored, "a/@s/chunk-00000001-x", fingerprint)
    # Two seals of the same bytes differ (a fresh nonce each), and the fingerprint is keyed.
    assert seal.seal(b"payload", "n") != seal.seal(b"payload", "n")
    assert seal.fingerprint(b"payload") != ChunkSeal(None).fingerprint(b"payload")


def test_a_damaged_plain_chunk_is_refused_by_name() -> None:
    seal = ChunkSeal(None)
    with pytest.raises(StoredChunkDamaged, match="stored chunk a/@s/chunk-7 is damaged"):
        seal.open(b"payloaD", "a/@s/chunk-7", seal.fingerprint(b"payload"))


STREAM = OPENZFS_DATA / "zfs-2.3.2" / "full_s1.stream"


@pytest.mark.skipif(not STREAM.is_file(), reason="OpenZFS fixtures not available")
def test_a_stamped_stream_read_from_any_record_boundary_checks_to_its_end() -> None:
    data = STREAM.read_bytes()
    reader = StreamReader(io.BytesIO(data))
    found = reader.read_begin()
    assert found is not None
    _, begin_bytes = found
    whole = [(r.kind, r.offset, r.end_offset) for r in reader.records(begin_bytes, len(begin_bytes), len(begin_bytes))]
    for _, offset, _ in whole[1 : len(whole) - 1 : max(1, len(whole) // 7)]:
        middle = StreamReader(io.BytesIO(data[offset:]))
        got = [(r.kind, r.offset, r.end_offset) for r in middle.records(begin_bytes, offset, offset, mid_stream=True)]
        assert got == [w for w in whole if w[1] >= offset]
        assert got[-1][0] == RecordType.END
    # A flipped byte after the starting record is caught (by a later stamp or END's checksum).
    start = whole[len(whole) // 3][1]
    damaged = bytearray(data[start:])
    damaged[len(damaged) // 2] ^= 0x40
    with pytest.raises((StreamIntegrityError, StreamFormatError)):
        list(StreamReader(io.BytesIO(bytes(damaged))).records(begin_bytes, start, start, mid_stream=True))


def _entry(name: str, identity: str, base: tuple[str, str] | None, complete: bool = True) -> Entry:
    record = replace(
        RECORD,
        snapshot=name,
        identity=identity,
        base=base[0] if base else None,
        base_identity=base[1] if base else None,
        finished=1 if complete else None,
        size=1 if complete else None,
        chunks=((1, "a" * 64),) if complete else (),
    )
    return Entry("host1/tank/home", record, 1)


def test_chains_are_followed_by_identity_and_pruning_keeps_what_they_need() -> None:
    full = _entry("a", "1", None)
    renamed_base = _entry("b-renamed", "2", ("a", "1"))
    tip = _entry("c", "3", ("b", "2"))  # stored when its base was still called b
    second_full = _entry("d", "4", None)
    entries = [full, renamed_base, tip, second_full]
    assert [e.record.snapshot for e in chain_to(entries, "c")] == ["a", "b-renamed", "c"]
    assert needed_by(entries, [tip]) == {"a", "b-renamed", "c"}
    assert needed_by(entries, [second_full]) == {"d"}
    with pytest.raises(Refused, match="the chain to c is broken: b-renamed is an incremental from a, which is not stored whole"):
        chain_to([renamed_base, tip], "c")
    with pytest.raises(DatasetMissing, match="e is only partly stored"):
        chain_to([*entries, _entry("e", "5", ("d", "4"), complete=False)], "e")
    looped = [_entry("x", "7", ("y", "8")), _entry("y", "8", ("x", "7"))]
    with pytest.raises(Refused, match="the chain to x is broken"):
        chain_to(looped, "x")


@given(st.lists(st.integers(0, 300_000), min_size=1, max_size=40), st.integers(1, 4))
def test_the_chunker_cuts_any_writes_into_whole_chunks_in_order(sizes: list[int], jobs: int) -> None:
    data = os.urandom(sum(sizes) + 1)
    shipped: dict[int, bytes] = {}

    def ship(index: int, chunk: bytearray) -> str:
        shipped[index] = bytes(chunk)
        return hashlib.sha256(chunk).hexdigest()

    chunker = _Chunker(1 << 20, jobs, ship)
    position = 0
    for size in [*sizes, 1]:
        chunker([data[position : position + size]])
        position += size
    chunks = chunker.finish()
    assert b"".join(shipped[i] for i in range(len(shipped))) == data
    assert chunks == [(len(shipped[i]), hashlib.sha256(shipped[i]).hexdigest()) for i in range(len(shipped))]
    assert all(size == 1 << 20 for size, _ in chunks[:-1]) and 0 < chunks[-1][0] <= 1 << 20


def test_a_failed_chunk_stops_the_stream() -> None:
    def ship(index: int, chunk: bytearray) -> str:
        if index == 1:
            raise Refused("quota")
        return "0" * 64

    chunker = _Chunker(1 << 20, 1, ship)
    with pytest.raises(Refused, match="quota"):
        for _ in range(10):
            chunker([bytes(1 << 20)])
        chunker.finish()
    chunker.abandon()
