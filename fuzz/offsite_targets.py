"""The offsite fuzz targets: a stored snapshot's record (upload.json, manifest.json) and chunk names, as read from a bucket."""

from __future__ import annotations

import functools
from dataclasses import replace

from fuzz.contract import attempt, check, outcome
from snapferry.errors import StreamFormatError
from snapferry.offsite.layout import StoredSnapshot, chunk_key, parse_chunk_key

_RECORD = StoredSnapshot(
    backend="zfs",
    dataset="tank/home",
    snapshot="daily-1",
    identity="1234567890",
    order=42,
    created=1_700_000_000,
    base="daily-0",
    base_identity="987",
    chunk_size=1 << 20,
    encryption="aes-256-gcm",
    started=1_700_000_100,
    send_flags=("-w",),
    properties=(("compression", "lz4"),),
)


def run_offsite_record(data: bytes) -> str:
    record, error = attempt((StreamFormatError,), lambda: StoredSnapshot.decode(data, "p/@s/manifest.json"))
    if record is not None:
        check(StoredSnapshot.decode(record.encode(), "k") == record, "a stored record does not survive re-encoding")
        if record.complete:
            check(record.size == sum(size for size, _ in record.chunks), "a manifest's chunks do not add up to its size")
            for index, (_, fingerprint) in enumerate(record.chunks[:4]):
                check(parse_chunk_key(chunk_key(index, fingerprint)) == (index, fingerprint), "a chunk name does not parse back")
    text = data.decode(errors="replace")
    parsed = parse_chunk_key(text)
    if parsed is not None:
        check(chunk_key(*parsed) == text, "a chunk name parses but is not the canonical one")
    return outcome(error)


@functools.cache
def offsite_record_seeds() -> tuple[bytes, ...]:
    chunks = ((1 << 20, "a" * 64), (1 << 20, "b" * 64), (5, "c" * 64))
    manifest = replace(_RECORD, finished=1_700_000_200, size=(2 << 20) + 5, chunks=chunks)
    return (
        _RECORD.encode(),
        manifest.encode(),
        replace(_RECORD, base=None, base_identity=None, encryption=None).encode(),
        chunk_key(7, "d" * 64).encode(),
        b'{"format": "snapferry-offsite/1"}',
    )
