"""The fuzz targets: each parser's call, the exceptions it may raise, the oracles on a parse, and seed inputs."""

from __future__ import annotations

import functools
import io
import json
import random
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, TypeVar, cast

import zstandard

from fuzz import btrfs_targets as btrfs
from fuzz import native_targets as native
from fuzz import offsite_targets as offsite
from fuzz import replication_targets as replication
from fuzz import tree_token_targets as tree_tokens
from fuzz.contract import OK, Errors, attempt, check, outcome
from snapferry.core.seal import seal_body
from snapferry.core.streamio import Readable
from snapferry.errors import MalformedOpenZfsToken, MalformedToken, NvlistError, StreamFormatError, StreamIntegrityError, StreamTruncated
from snapferry.transport.wire import ZSTD_MAGIC, open_wire
from snapferry.zfs.codec import nvlist, openzfs_token
from snapferry.zfs.codec.fletcher import BlockSum, Fletcher4
from snapferry.zfs.codec.nvlist import NvList, NvPair, NvType
from snapferry.zfs.codec.records import (
    BEGIN_MAGIC,
    BEGIN_MAGIC_SWAPPED,
    COMPOUNDSTREAM,
    FEATURE_DEDUP,
    FEATURE_DEDUPPROPS,
    FEATURE_RAW,
    FEATURE_RESUMING,
    FLAG_FREERECORDS,
    HEADER_SIZE,
    MAX_BEGIN_PAYLOAD,
    MAX_BLOCK,
    MAX_BONUS,
    MAX_EMBEDDED,
    STAMP_OFFSET,
    SUBSTREAM,
    Begin,
    RecordType,
    chained_begin_payload,
    payload_size,
    record_type,
)
from snapferry.zfs.codec.stream import StreamReader
from snapferry.zfs.codec.token import ResumeToken
from snapferry_testkit.shared_data import OPENZFS_DATA

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

T = TypeVar("T")

STREAM_ERRORS: Errors = (StreamFormatError, StreamTruncated)
FORMAT_ERRORS: Errors = (StreamFormatError,)


class Program:
    """Fuzzer bytes read as a sequence of choices; past the end every choice is 0, so any input is a program."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def number(self, width: int) -> int:
        chunk = self._data[self._pos : self._pos + width]
        self._pos += width
        return int.from_bytes(chunk, "little")

    def below(self, n: int) -> int:
        return self.number(1 if n <= 256 else 4) % n if n > 1 else 0

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def chunk(self, limit: int) -> bytes:
        size = self.below(limit + 1)
        out = self._data[self._pos : self._pos + size]
        self._pos += size
        return out


# --- streams: splitting, shrinking and re-stamping ----------------------------------------------------

Rec = tuple[bytes, bytes]


@dataclass(frozen=True)
class Split:
    """A stream cut into BEGIN (header and payload) and its records (header, payload), END last."""

    begin: bytes
    records: tuple[Rec, ...]


def split_stream(data: bytes) -> Split:
    """Record boundaries by the length fields alone (no checksums): for well-formed seed streams only."""
    pos = HEADER_SIZE + payload_size(RecordType.BEGIN, data, 0)
    begin, records = data[:pos], []
    while pos < len(data):
        header = data[pos : pos + HEADER_SIZE]
        kind = record_type(header, pos)
        size = payload_size(kind, header, pos)
        records.append((header, data[pos + HEADER_SIZE : pos + HEADER_SIZE + size]))
        pos += HEADER_SIZE + size
        if kind == RecordType.END:
            break
    return Split(begin, tuple(records))


def _put(header: bytearray, offset: int, width: int, value: int) -> None:
    """Store `value` little-endian at `offset`, cut off at the end of `header` (which keeps its length)."""
    raw = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")[: max(0, len(header) - offset)]
    header[offset : offset + len(raw)] = raw


def resize(header: bytes, size: int) -> bytes:
    """The header with its length fields saying `size` payload bytes, uncompressed (lengths the kind allows)."""
    out = bytearray(header)
    kind = struct.unpack_from("<I", out, 0)[0]
    if kind == RecordType.WRITE:
        _put(out, 32, 8, size)
        out[50] = 0
        _put(out, 96, 8, 0)
    elif kind == RecordType.OBJECT:
        _put(out, 28, 4, size)
        _put(out, 36, 4, 0)
    elif kind == RecordType.SPILL:
        _put(out, 16, 8, size)
        _put(out, 40, 8, 0)
    elif kind == RecordType.WRITE_EMBEDDED:
        _put(out, 52, 4, size)
    return bytes(out)


def shrink(split: Split, *, payload: int = 512, keep: int | None = None) -> Split:
    """Fewer records (the first `keep`, then END) with WRITE payloads cut to `payload` bytes: small seeds."""
    body, end = split.records[:-1], split.records[-1]
    records = []
    for header, data in body[:keep]:
        if record_type(header, 0) == RecordType.WRITE and len(data) > payload:
            header, data = resize(header, payload), data[:payload]
        records.append((header, data))
    return Split(split.begin, (*records, end))


def _words(data: bytes | bytearray) -> bytes | bytearray:
    """A damaged part that is not whole words makes a corrupt stream anyway: its checksum need not be right."""
    return data[: len(data) - len(data) % 4]


def serialize(split: Split, *, stamps: str = "fresh") -> bytes:
    """The stream's bytes with END's checksum recomputed; stamps "fresh" (as OpenZFS), "zero" (pool v23) or "keep"."""
    state = Fletcher4().update(_words(split.begin))
    out = [split.begin]
    for raw_header, payload in split.records:
        header = bytearray(raw_header)
        if header[:4] == struct.pack("<I", RecordType.END):
            header[8:40] = state.to_bytes()
        if stamps == "fresh":
            state = state.update(header[:STAMP_OFFSET])
            header[STAMP_OFFSET:] = state.to_bytes()
            state = state.update(header[STAMP_OFFSET:])
        else:
            if stamps == "zero":
                header[STAMP_OFFSET:] = bytes(HEADER_SIZE - STAMP_OFFSET)
            state = state.update(_words(header))
        state = state.update(_words(payload))
        out += [bytes(header), payload]
    return b"".join(out)


def _header(kind: RecordType, fields: Sequence[tuple[int, int, int]] = ()) -> bytes:
    header = bytearray(HEADER_SIZE)
    _put(header, 0, 4, kind)
    for offset, width, value in fields:
        _put(header, offset, width, value)
    return bytes(header)


def _begin(toname: str, *, features: int = 0, payload: bytes = b"", fromguid: int = 0) -> bytes:
    begin = Begin(
        versioninfo=(features << 2) | SUBSTREAM,
        creation_time=1_700_000_000,
        objset_type=2,
        flags=FLAG_FREERECORDS,
        toguid=0x1234_5678_9ABC_DEF0,
        fromguid=fromguid,
        toname=toname,
        payloadlen=len(payload),
    )
    return begin.encode() + payload


def synthetic_split() -> Split:
    """A small stream with a record of every kind the reader passes on, for when the OpenZFS fixtures are absent."""
    rnd = random.Random(1)
    resume = nvlist.encode(NvList((NvPair("resume_object", NvType.UINT64, 7), NvPair("resume_offset", NvType.UINT64, 0))))
    records = [
        (_header(RecordType.OBJECT, [(8, 8, 1), (28, 4, 60)]), rnd.randbytes(64)),
        (_header(RecordType.FREEOBJECTS, [(8, 8, 2), (16, 8, 30)]), b""),
        (_header(RecordType.WRITE, [(8, 8, 1), (32, 8, 512)]), rnd.randbytes(512)),
        (_header(RecordType.WRITE, [(8, 8, 1), (32, 8, 4096), (50, 1, 15), (96, 8, 200)]), rnd.randbytes(200)),
        (_header(RecordType.WRITE_EMBEDDED, [(8, 8, 1), (52, 4, 30)]), rnd.randbytes(32)),
        (_header(RecordType.SPILL, [(8, 8, 1), (16, 8, 512)]), rnd.randbytes(512)),
        (_header(RecordType.SPILL, [(8, 8, 1), (16, 8, 512), (40, 8, 128)]), rnd.randbytes(128)),
        (_header(RecordType.FREE, [(8, 8, 1), (16, 8, 4096), (24, 8, (1 << 64) - 1)]), b""),
        (_header(RecordType.OBJECT_RANGE, [(8, 8, 0), (16, 8, 32)]), b""),
        (_header(RecordType.REDACT, [(8, 8, 1)]), b""),
        (_header(RecordType.END, [(40, 8, 0x1234_5678_9ABC_DEF0)]), b""),
    ]
    return Split(_begin("pool/fs@snap", features=FEATURE_RESUMING, payload=resume), tuple(records))


@functools.cache
def real_splits() -> tuple[Split, ...]:
    """The OpenZFS fixture streams (2.3.2 and 2.1.11), full and incremental, as splits with small WRITE payloads."""
    splits = []
    for path in sorted(OPENZFS_DATA.glob("zfs-*/*.stream")):
        splits.append(shrink(split_stream(path.read_bytes())))
    return tuple(splits)


@functools.cache
def stream_bases() -> tuple[Split, ...]:
    """What the mutating target starts from: every fixture stream cut to 24 records, and the synthetic one."""
    return (*(shrink(s, keep=24) for s in real_splits()), synthetic_split())


@functools.cache
def valid_streams() -> tuple[bytes, ...]:
    """Well-formed streams: fresh and zero stamps, tiny payloads, and two substreams back to back."""
    seeds = []
    for split in stream_bases():
        seeds += [serialize(split), serialize(split, stamps="zero")]
    for split in real_splits()[:2]:
        seeds.append(serialize(shrink(split, payload=64)))
    seeds.append(seeds[0] + seeds[-1])
    return tuple(seeds)


@functools.cache
def stream_seeds() -> tuple[bytes, ...]:
    """The valid streams, and the first 8 KiB of two fixture streams (cut inside a WRITE)."""
    prefixes = []
    for path in sorted(OPENZFS_DATA.glob("zfs-*/*.stream"))[:2]:
        with path.open("rb") as f:
            prefixes.append(f.read(8192))
    return (*valid_streams(), *prefixes)


def _zstd_stream(data: bytes, *, level: int = 3, checksum: bool = False) -> bytes:
    """Compressed as WireSink does (a streamed frame, no content size), optionally with a checksum."""
    out = io.BytesIO()
    writer = zstandard.ZstdCompressor(level=level, write_checksum=checksum).stream_writer(out, closefd=False)
    writer.write(data)
    writer.flush(zstandard.FLUSH_FRAME)
    return out.getvalue()


@functools.cache
def wire_seeds() -> tuple[bytes, ...]:
    streams = valid_streams()
    seeds = [_zstd_stream(streams[0]), _zstd_stream(streams[1], checksum=True), zstandard.ZstdCompressor(level=1).compress(streams[-1])]
    seeds.append(_zstd_stream(streams[0][:4000]) + _zstd_stream(streams[0][4000:]))
    seeds += [ZSTD_MAGIC, ZSTD_MAGIC + random.Random(2).randbytes(200), streams[-1]]
    return tuple(seeds)


# --- the stream targets -------------------------------------------------------------------------------

_BEGIN_FIELDS_STRUCT = struct.Struct("<QQIIQQ")
Summary = tuple[RecordType, int, bytes, BlockSum, BlockSum, Fletcher4]


def parse_stream(source: Readable, *, trusting: bool, expect: bytes | None) -> list[Summary]:
    """Every substream to a clean end of input, checking what a correct parse must give.

    With `expect` (the input, when it is not compressed) the records passed on must be exactly its bytes.
    """
    reader = StreamReader(source)
    records: list[Summary] = []
    view = memoryview(expect) if expect is not None else None
    passed = 0

    def passed_on(part: bytes | bytearray | memoryview) -> None:
        nonlocal passed
        check(view is None or view[passed : passed + len(part)] == part, f"bytes passed on at {passed} are not the input's")
        passed += len(part)

    while (first := reader.read_begin()) is not None:
        begin, begin_bytes = first
        fields = (begin.versioninfo, begin.creation_time, begin.objset_type, begin.flags, begin.toguid, begin.fromguid)
        check(fields == _BEGIN_FIELDS_STRUCT.unpack_from(begin_bytes, 16), "BEGIN fields differ from its bytes")
        check(len(begin_bytes) == HEADER_SIZE + begin.payloadlen, "BEGIN payload is not its stated length")
        passed_on(begin_bytes)
        read = reader.records_trusting_stamps if trusting else reader.records
        offset, last = len(begin_bytes), None
        for record in read(begin_bytes, len(begin_bytes), len(begin_bytes)):
            check(record.offset == offset, f"record at {record.offset}, expected at {offset}")
            check(len(record.payload) == payload_size(record.kind, record.header, record.offset), "payload length")
            check(record.kind not in (RecordType.BEGIN, RecordType.WRITE_BYREF), f"{record.kind.name} record passed on")
            offset, last = record.end_offset, record.kind
            passed_on(record.header)
            passed_on(record.payload)
            records.append((record.kind, record.offset, bytes(record.header), record.head_sum, record.payload_sum, record.fingerprint))
        check(last == RecordType.END, "records() ended without END")
    check(reader.bytes_read == passed, f"read {reader.bytes_read} bytes but passed on {passed}")
    check(view is None or passed == len(view), f"a clean end of input after {passed} of {len(view or b'')} bytes")
    return records


def _strict_and_trusting(data: bytes) -> str:
    """Both readers over `data`, which must agree: the trusting one may only miss what a stamp check would catch."""
    strict, strict_error = attempt(STREAM_ERRORS, lambda: parse_stream(io.BytesIO(data), trusting=False, expect=data))
    trust, trust_error = attempt(STREAM_ERRORS, lambda: parse_stream(io.BytesIO(data), trusting=True, expect=data))
    if strict is not None:
        check(trust is not None, f"records() accepted the stream, records_trusting_stamps() raised {trust_error!r}")
        check(trust == strict, "the two readers yielded different records or checksums")
    elif not isinstance(strict_error, StreamIntegrityError):
        same = type(trust_error) is type(strict_error) and str(trust_error) == str(strict_error)
        check(same, f"records() raised {strict_error!r}, records_trusting_stamps() {trust_error!r}")
    return outcome(trust_error) + ("" if strict_error is None else f"/strict:{outcome(strict_error)}")


def run_stream(data: bytes) -> str:
    _, error = attempt(STREAM_ERRORS, lambda: parse_stream(io.BytesIO(data), trusting=False, expect=data))
    return outcome(error)


def run_stream_trusting(data: bytes) -> str:
    return _strict_and_trusting(data)


class _TooBig(Exception):
    pass


def zstd_content(data: bytes, limit: int = 4 << 20) -> bytes | None:
    """What `data`'s zstd frames hold, decoded apart from the wire layer; None unless it is all whole, valid frames."""
    out, rest = bytearray(), data
    try:
        while rest:
            frame, pos = zstandard.ZstdDecompressor().decompressobj(), 0
            while not frame.eof and pos < len(rest):
                out += frame.decompress(rest[pos : pos + 64])  # small steps: a few bytes can stand for megabytes
                pos += 64
                if len(out) > limit:
                    raise _TooBig
            if not frame.eof:
                return None
            rest = frame.unused_data + rest[pos:]
    except zstandard.ZstdError:
        return None
    return bytes(out)


def run_wire(data: bytes) -> str:
    """Compressed input must give exactly what its frames hold, and only if they are whole: nothing dropped at a cut."""
    expect: bytes | None = data
    frames_known = False
    if data.startswith(ZSTD_MAGIC):
        try:
            expect, frames_known = zstd_content(data), True
        except _TooBig:
            expect = None

    def parse() -> list[Summary]:
        source = cast("io.BufferedReader[io.FileIO]", io.BufferedReader(io.BytesIO(data)))
        return parse_stream(open_wire(source), trusting=False, expect=expect)

    parsed, error = attempt(STREAM_ERRORS, parse)
    if frames_known and expect is None:
        check(parsed is None, "input that is not whole, valid zstd frames was read as a complete stream")
    return outcome(error)


# Header fields worth hitting: the type, every payload length field, compression, the END checksum and the stamp.
_FIELDS = (0, 4, 8, 16, 24, 28, 32, 36, 40, 48, 50, 52, 56, 96, 280, 304)
_BEGIN_FIELDS = (0, 4, 8, 16, 24, 32, 36, 40, 48, 56)
_VALUES = (
    *(0, 1, 2, 3, 4, 5, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x1_0000, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32),
    *(MAX_BLOCK - 4, MAX_BLOCK, MAX_BLOCK + 4, MAX_BEGIN_PAYLOAD, MAX_BEGIN_PAYLOAD + 4, MAX_BONUS, MAX_BONUS + 8),
    *(MAX_EMBEDDED, MAX_EMBEDDED + 8, 1 << 63, (1 << 64) - 1, BEGIN_MAGIC, BEGIN_MAGIC_SWAPPED),
)
_FEATURES = (FEATURE_DEDUP, FEATURE_DEDUPPROPS, FEATURE_RESUMING, FEATURE_RAW, 1 << 16, 1 << 19, 1 << 22, 1 << 40)
_SIZES = (0, 4, 8, 108, 112, 116, 4096, MAX_BONUS, MAX_BONUS + 8, 1 << 20)
_LIMITS = {RecordType.WRITE: MAX_BLOCK, RecordType.SPILL: MAX_BLOCK, RecordType.OBJECT: MAX_BONUS, RecordType.WRITE_EMBEDDED: MAX_EMBEDDED}


def _value(program: Program) -> int:
    return program.pick(_VALUES) if program.below(4) else program.number(8)


def _mutate_records(program: Program, split: Split) -> tuple[Split, bool]:
    """Record-level damage; also whether the stream is still well-formed (only consistent resizes were made)."""
    begin = bytearray(split.begin)
    records = [list(r) for r in split.records]
    valid = True
    for _ in range(program.below(5)):
        op = program.below(11)
        index = program.below(len(records)) if records else 0
        if op == 0 and records:
            header = bytearray(records[index][0])
            offset = program.pick(_FIELDS) if program.below(4) else program.below(HEADER_SIZE)
            _put(header, offset, program.pick((1, 2, 4, 8)), _value(program))
            records[index][0] = bytes(header)
        elif op == 1:
            offset = program.pick(_BEGIN_FIELDS) if program.below(4) else program.below(HEADER_SIZE)
            if program.below(2):
                _put(begin, offset, program.pick((1, 2, 4, 8)), _value(program))
            else:
                versioninfo = struct.unpack_from("<Q", begin, 16)[0] ^ (program.pick(_FEATURES) << 2)
                _put(begin, 16, 8, versioninfo if program.below(2) else (versioninfo & ~3) | program.pick((0, COMPOUNDSTREAM, 3)))
        elif op == 2 and records:
            del records[index]
        elif op == 3 and records:
            records.insert(index, list(records[index]))
        elif op == 4 and records:
            records.insert(program.below(len(records)), records.pop(index))
        elif op == 5:
            records.insert(index, [bytes(begin[:HEADER_SIZE]), bytes(begin[HEADER_SIZE:])])
        elif op == 6 and records:
            payload = records[index][1]
            records[index][1] = payload[: program.below(len(payload) + 1)] if program.below(2) else payload + program.chunk(64)
        elif op == 7 and records:
            kind = program.below(12) if program.below(4) else program.number(4)
            records[index][0] = struct.pack("<I", kind) + records[index][0][4:]
        elif op == 8:
            payload = program.chunk(256) if program.below(2) else bytes(begin[HEADER_SIZE:])[: program.below(len(begin) - HEADER_SIZE + 1)]
            if program.below(2):
                _put(begin, 4, 4, len(payload))
            begin = begin[:HEADER_SIZE] + payload
        elif op == 9 and records:
            kind = struct.unpack_from("<I", records[index][0], 0)[0]
            size = program.pick(_SIZES)
            if kind in _LIMITS:
                stored = (size + 7) & ~7 if kind in (RecordType.OBJECT, RecordType.WRITE_EMBEDDED) else size
                records[index] = [resize(records[index][0], size), bytes(stored)]
                valid = valid and stored <= _LIMITS[RecordType(kind)]
            continue
        elif op == 10:
            records = records[:index]
        valid = False
    return Split(bytes(begin), tuple((h, p) for h, p in records)), valid


def _mutate_bytes(program: Program, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(program.below(3)):
        op = program.below(6)
        pos = program.number(4) % (len(out) + 1)
        if op == 0 and pos < len(out):
            out[pos] ^= 1 << program.below(8)
        elif op == 1:
            del out[pos:]
        elif op == 2 and out:
            start = program.number(4) % len(out)
            out[pos:pos] = out[start : start + program.below(4096)]
        elif op == 3:
            out[pos : pos + 8] = _value(program).to_bytes(8, "little")
        elif op == 4:
            out[pos:pos] = program.chunk(32)
        elif op == 5:
            del out[pos : pos + program.below(4096)]
    return bytes(out)


def stream_from_program(data: bytes) -> tuple[bytes, bool]:
    """A damaged stream built from a fixture by the choices in `data`; also whether it is still well-formed."""
    program = Program(data)
    split, valid = _mutate_records(program, program.pick(stream_bases()))
    stamps = program.pick(("fresh", "zero", "keep", "fresh"))
    stream = serialize(split, stamps=stamps)
    if not program.below(4):  # a second, well-formed substream behind the first
        stream += serialize(program.pick(stream_bases()), stamps=program.pick(("fresh", "zero")))
    damaged = _mutate_bytes(program, stream)
    return damaged, valid and stamps != "keep" and damaged == stream


def run_stream_mutated(data: bytes) -> str:
    stream, valid = stream_from_program(data)
    result = _strict_and_trusting(stream)
    check(result == OK or not valid, f"a well-formed stream was refused: {result}")
    return result


def mutated_seeds() -> tuple[bytes, ...]:
    rnd = random.Random(3)
    return (b"", bytes(4), *(rnd.randbytes(n) for n in (8, 16, 32, 64, 64, 128, 128, 256)))


# --- BEGIN headers and record lengths ------------------------------------------------------------------


def run_begin(data: bytes) -> str:
    header = bytes(data[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
    attempt(FORMAT_ERRORS, lambda: record_type(header, 0))
    for kind in RecordType:
        size, _ = attempt(FORMAT_ERRORS, functools.partial(payload_size, kind, header, 0))
        if size is not None:
            check(type(size) is int and 0 <= size <= max(MAX_BLOCK, MAX_BEGIN_PAYLOAD) and size % 4 == 0, f"{kind.name} size {size}")
    loose, _ = attempt(FORMAT_ERRORS, lambda: Begin.decode(header, supported_only=False))
    begin, error = attempt(FORMAT_ERRORS, lambda: Begin.decode(header))
    if begin is not None:
        check(begin == loose, "supported_only changed the decoded fields")
    if loose is not None:
        # Every property the CLI and the receivers read must work on whatever decoded.
        _ = (loose.send_flags, loose.snapshot_name, loose.is_raw, loose.is_resuming, loose.sender_can_resume, loose.is_incremental)
        name = header[56:].split(b"\0", 1)[0]
        if len(name) < 256 and header[56 + len(name) :].count(0) == 256 - len(name) and name.decode("utf-8", "replace").encode() == name:
            check(loose.encode() == header, "BEGIN does not encode back to its header")
    return outcome(error)


def begin_seeds() -> tuple[bytes, ...]:
    headers = {split.begin[:HEADER_SIZE] for split in stream_bases()}
    headers |= {header for split in stream_bases() for header, _ in split.records[:12]}
    return tuple(sorted(headers))


# --- tokens ---------------------------------------------------------------------------------------------


# Token inputs: text as is, or (after a marker byte) the part under the check digits, so that mutations
# get past them: an sf1 token's JSON body, an OpenZFS token's packed nvlist or its compressed payload.
BODY, PAYLOAD = 0, 1


def sf1_text(data: bytes) -> str:
    if data[:1] == bytes([BODY]):
        return seal_body("sf1-", data[1:])
    return data.decode("utf-8", "surrogateescape")


def run_token(data: bytes) -> str:
    text = sf1_text(data)
    token, error = attempt((MalformedToken,), lambda: ResumeToken.decode(text))
    if token is not None:
        check(ResumeToken.decode(token.encode()) == token, "sf1 token does not survive encode and decode")
        json.dumps(token.describe())
    return outcome(error)


def token_seeds() -> tuple[bytes, ...]:
    tokens = [
        ResumeToken("pool/fs", 1, 0, 2, 1, 1 << 20, 408, "0123456789abcdef"),
        ResumeToken("tank/a/b/c", (1 << 64) - 1, 5, 6, 42, 1 << 40, 1 << 30, "ffffffffffffffff", "Lecw"),
        ResumeToken("p/a b:c.d", 7, 8, 9, 0, 312, 312, "0000000000000000", "c"),
    ]
    texts = [t.encode().encode() for t in tokens]
    return (*texts, *(bytes([BODY]) + json.dumps(asdict(t)).encode() for t in tokens))


def _word_sum(data: bytes, order: str) -> int:
    words: tuple[int, ...] = struct.unpack_from(f"{order}{len(data) // 4}I", data)
    return sum(words) & ((1 << 64) - 1)


def openzfs_text(data: bytes) -> str:
    if data[:1] == bytes([BODY]):
        packed = data[1:]
        compressed = zlib.compress(packed, 6)
        order = ">" if packed[1:2] == bytes(1) else "<"  # the nvlist's own byte order, as the kernel's checksum has it
        return f"1-{_word_sum(compressed, order):x}-{len(packed):x}-{compressed.hex()}"
    if data[:1] == bytes([PAYLOAD]):
        length, compressed = int.from_bytes(data[1:5], "little"), data[5:]
        return f"1-{_word_sum(compressed, '<'):x}-{length:x}-{compressed.hex()}"
    return data.decode("utf-8", "surrogateescape")


def run_openzfs_token(data: bytes) -> str:
    text = openzfs_text(data)
    token, error = attempt((MalformedOpenZfsToken,), lambda: openzfs_token.decode(text))
    if token is not None:
        token.describe()
        json.dumps(token.as_json())
        try:
            again = token.encode()
        except ValueError:  # documented: an nvlist that does not compress cannot make a token
            return outcome(error)
        check(openzfs_token.decode(again) == token, "OpenZFS token does not survive encode and decode")
    return outcome(error)


def openzfs_token_seeds() -> tuple[bytes, ...]:
    texts = [path.read_bytes() for path in sorted(OPENZFS_DATA.glob("zfs-*/*.token"))]
    if not texts:
        texts = [openzfs_token.OpenZfsToken(object=1, offset=2, bytes=3, toguid=4, toname="p/fs@s", fromguid=5).encode().encode()]
    seeds = list(texts)
    for text in texts[:3]:
        _, _, length, payload = text.decode().strip().split("-")
        seeds.append(bytes([BODY]) + zlib.decompress(bytes.fromhex(payload)))
        seeds.append(bytes([PAYLOAD]) + int(length, 16).to_bytes(4, "little") + bytes.fromhex(payload))
    return tuple(seeds)


# --- nvlists --------------------------------------------------------------------------------------------


def run_nvlist(data: bytes) -> str:
    nvl, error = attempt((NvlistError,), lambda: nvlist.decode(data))
    if nvl is not None:
        nvlist.format_nvlist(nvl)
        for big in (False, True):
            check(nvlist.decode(nvlist.encode(nvl, big_endian=big)) == nvl, f"nvlist does not survive encode (big_endian={big})")
    return outcome(error)


def every_type() -> NvList:
    inner = NvList((NvPair("x", NvType.UINT64, 1), NvPair("flag", NvType.BOOLEAN)))
    return NvList(
        (
            NvPair("b", NvType.BOOLEAN),
            NvPair("bv", NvType.BOOLEAN_VALUE, True),
            NvPair("by", NvType.BYTE, 7),
            NvPair("i8", NvType.INT8, -3),
            NvPair("u16", NvType.UINT16, 65535),
            NvPair("i32", NvType.INT32, -(1 << 31)),
            NvPair("u64", NvType.UINT64, (1 << 64) - 1),
            NvPair("hr", NvType.HRTIME, -1),
            NvPair("s", NvType.STRING, "pool/fs@snap"),
            NvPair("ba", NvType.BYTE_ARRAY, b"\x01\x02\x03"),
            NvPair("u32a", NvType.UINT32_ARRAY, (1, 2, 3)),
            NvPair("ba2", NvType.BOOLEAN_ARRAY, (True, False)),
            NvPair("sa", NvType.STRING_ARRAY, ("a", "bc", "")),
            NvPair("nv", NvType.NVLIST, inner),
            NvPair("nva", NvType.NVLIST_ARRAY, (inner, NvList())),
        )
    )


def nested_list(depth: int) -> NvList:
    nvl = NvList((NvPair("leaf", NvType.UINT64, 1),))
    for _ in range(depth):
        nvl = NvList((NvPair("n", NvType.NVLIST, nvl),))
    return nvl


def nvlist_seeds() -> tuple[bytes, ...]:
    seeds = [nvlist.encode(every_type()), nvlist.encode(every_type(), big_endian=True)]
    seeds += [nvlist.encode(nested_list(4)), nvlist.encode(NvList())]
    seeds += [split.begin[HEADER_SIZE:] for split in stream_bases() if len(split.begin) > HEADER_SIZE]
    seeds += [seed[1:] for seed in openzfs_token_seeds() if seed[:1] == bytes([BODY])]
    seeds.append(chained_seeds()[0])
    return tuple(seeds)


# --- chained BEGIN payloads of raw streams --------------------------------------------------------------

RAW_BEGIN = Begin((FEATURE_RAW << 2) | SUBSTREAM, 1_700_000_000, 2, FLAG_FREERECORDS, 0x1111, 0x2222, "pool/enc@s2")


def run_chained(data: bytes) -> str:
    out, error = attempt(FORMAT_ERRORS, lambda: chained_begin_payload(RAW_BEGIN, data))
    if out is not None and data:
        before, after = nvlist.decode(data), nvlist.decode(out)
        keydata = after.get("crypt_keydata")
        check(keydata is not None and isinstance(keydata.value, NvList), "crypt_keydata lost")
        keys = cast(NvList, cast(NvPair, keydata).value)
        old_keys = cast(NvList, cast(NvPair, before.get("crypt_keydata")).value)
        chained, to_ivset = keys.get("from_ivset_guid"), old_keys.get("to_ivset_guid")
        check(chained is not None and to_ivset is not None and chained.value == to_ivset.value, "from_ivset_guid is not to_ivset_guid")
        check([p.name for p in after] == [p.name for p in before], "top-level pairs changed")
        check([p for p in after if p.name != "crypt_keydata"] == [p for p in before if p.name != "crypt_keydata"], "other pairs changed")
        check([p for p in keys if p.name != "from_ivset_guid"] == [p for p in old_keys if p.name != "from_ivset_guid"], "keys changed")
    elif out is not None:
        check(out == data, "an empty payload was changed")
    return outcome(error)


def chained_seeds() -> tuple[bytes, ...]:
    keydata = NvList(
        (
            NvPair("crypt", NvType.UINT64, 8),
            NvPair("DSL_CRYPTO_GUID", NvType.UINT64, 0xABCDEF),
            NvPair("portable_mac", NvType.UINT8_ARRAY, bytes(32)),
            NvPair("to_ivset_guid", NvType.UINT64, 0x5555),
        )
    )
    with_from = NvList((*keydata.pairs, NvPair("from_ivset_guid", NvType.UINT64, 0x4444)))
    resumed = NvList((NvPair("resume_object", NvType.UINT64, 3), NvPair("crypt_keydata", NvType.NVLIST, with_from)))
    seeds = [
        nvlist.encode(NvList((NvPair("crypt_keydata", NvType.NVLIST, keydata),))),
        nvlist.encode(resumed, big_endian=True),
        nvlist.encode(NvList((NvPair("crypt_keydata", NvType.NVLIST, NvList()),))),
        b"",
    ]
    return tuple(seeds)


# --- byte mutations, for hypothesis (the CI tests, and the runner without atheris) ----------------------


def mutate(rnd: random.Random, data: bytes, pool: Sequence[bytes], max_len: int) -> bytes:
    """libFuzzer-like damage to a seed: bit flips, interesting values, cuts, insertions, splices from other seeds."""
    out = bytearray(data)
    for _ in range(rnd.randint(1, 6)):
        op, pos = rnd.randrange(8), rnd.randrange(len(out) + 1)
        if op == 0 and pos < len(out):
            out[pos] ^= 1 << rnd.randrange(8)
        elif op == 1:
            width = rnd.choice((1, 2, 4, 8))
            value = rnd.choice(_VALUES) if rnd.randrange(2) else rnd.getrandbits(64)
            out[pos : pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif op == 2:
            del out[pos : pos + rnd.randrange(1, 64)]
        elif op == 3:
            out[pos:pos] = rnd.randbytes(rnd.randrange(1, 32))
        elif op == 4:
            other = rnd.choice(pool)
            start = rnd.randrange(len(other) + 1)
            out[pos:pos] = other[start : start + rnd.randrange(1, 512)]
        elif op == 5:
            del out[pos:]
        elif op == 6 and pos < len(out):
            out[pos] = rnd.choice(b"\x00\xff\x7f\x80-0f1sz=")
        elif op == 7:
            start = rnd.randrange(len(out) + 1)
            out[pos:pos] = out[start : start + rnd.randrange(1, 400)]
    return bytes(out[:max_len])


def mutations(seeds: Sequence[bytes], max_len: int) -> SearchStrategy[bytes]:
    """Inputs made by mutate() from one of `seeds`, reproducible from the (seed index, random seed) hypothesis shows."""
    from hypothesis import strategies as st

    def make(index: int, state: int) -> bytes:
        return mutate(random.Random(state), seeds[index], seeds, max_len)

    return st.builds(make, st.integers(0, len(seeds) - 1), st.integers(0, 2**32 - 1))


# --- the table ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One parser under fuzz: `run(data)` returns an outcome label, or raises on a contract violation."""

    name: str
    covers: str
    run: Callable[[bytes], str]
    seeds: Callable[[], tuple[bytes, ...]]
    max_len: int


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("stream", "StreamReader.read_begin + records() over raw bytes, every substream", run_stream, stream_seeds, 1 << 16),
        Target(
            "stream-trusting",
            "records_trusting_stamps() over raw bytes, differential against records()",
            run_stream_trusting,
            stream_seeds,
            1 << 16,
        ),
        Target(
            "stream-mutated",
            "structure-aware damage to the OpenZFS fixture streams (fields, records, stamps, bytes), both readers",
            run_stream_mutated,
            mutated_seeds,
            1024,
        ),
        Target(
            "stream-native",
            "the stream-mutated programs through both readers with the C fletcher-4 and with the numpy reference, compared",
            native.run_stream_native,
            mutated_seeds,
            1024,
        ),
        Target("wire", "open_wire (zstd auto-detect) + StreamReader over raw bytes", run_wire, wire_seeds, 1 << 16),
        Target("begin", "Begin.decode (both modes), record_type and payload_size of every kind on a header", run_begin, begin_seeds, 312),
        Target("token", "ResumeToken.decode (sf1- tokens)", run_token, token_seeds, 2048),
        Target("openzfs-token", "openzfs_token.decode (OpenZFS 1-... tokens), re-encoded", run_openzfs_token, openzfs_token_seeds, 4096),
        Target("nvlist", "nvlist.decode, format_nvlist and re-encoding in both byte orders", run_nvlist, nvlist_seeds, 4096),
        Target("chained-begin", "chained_begin_payload on a raw (-w) BEGIN with an arbitrary payload", run_chained, chained_seeds, 4096),
        Target(
            "nvlist-xdr",
            "nvlist.decode on XDR nvlists, re-encoded in XDR and natively",
            replication.run_nvlist_xdr,
            replication.nvlist_xdr_seeds,
            4096,
        ),
        Target(
            "replication-header",
            "read_header (the -R compound BEGIN, its XDR nvlist and END), on the input as records or as a payload framed with a valid END",
            replication.run_replication_header,
            replication.replication_seeds,
            4096,
        ),
        Target(
            "btrfs-stream",
            "BtrfsStreamReader over a btrfs send stream, as sent or with every crc32c made right",
            btrfs.run_btrfs_stream,
            btrfs.btrfs_stream_seeds,
            1 << 14,
        ),
        Target(
            "btrfs-continuation",
            "Continuation.decode + BtrfsStreamReader.jump: snapferry's btrfs continuation framing",
            btrfs.run_btrfs_continuation,
            btrfs.btrfs_continuation_seeds,
            1 << 14,
        ),
        Target("btrfs-token", "BtrfsToken.decode (sf1b- tokens)", btrfs.run_btrfs_token, btrfs.btrfs_token_seeds, 2048),
        Target("tree-token", "TreeToken.decode (sf1r- tokens of -R trees)", tree_tokens.run_tree_token, tree_tokens.tree_token_seeds, 4096),
        Target(
            "offsite-record",
            "StoredSnapshot.decode (a bucket's upload.json and manifest.json) and chunk names",
            offsite.run_offsite_record,
            offsite.offsite_record_seeds,
            4096,
        ),
    )
}
