"""Reading and writing ZFS send streams record by record, verifying and re-stamping running checksums."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from snapferry.core.splice import SpliceRing
from snapferry.core.streamio import Readable, Sink, read_exact
from snapferry.errors import StreamFormatError, StreamIntegrityError, StreamTruncated
from snapferry.zfs.codec import record_sums
from snapferry.zfs.codec.fletcher import BlockSum, Fletcher4
from snapferry.zfs.codec.record_sums import END_MISMATCH, STAMP_MISMATCH, STAMP_WORDS, STAMPED, ZERO, ZERO_STAMP, Sums, Words, sums_of
from snapferry.zfs.codec.records import (
    HEADER_SIZE,
    STAMP_OFFSET,
    Begin,
    RecordType,
    end_checksum,
    end_header,
    payload_size,
    record_type,
)

# A record header: its own bytes, or a view of the reader's SpliceRing.
Header = bytearray | memoryview
# The fingerprint takes every stamp as zeros: one constant block instead of one per record.
_ZERO_STAMP_SUM = BlockSum(STAMP_WORDS, 0, 0, 0, 0)
_EMPTY = BlockSum(0, 0, 0, 0, 0)


def read_header(source: Readable) -> bytes:
    """The first record header of a stream, for deciding how to receive it."""
    header = bytearray(HEADER_SIZE)
    got = read_exact(source, memoryview(header))
    if got == 0:
        raise StreamFormatError("no ZFS stream on input (it was empty)")
    if got < HEADER_SIZE:
        raise StreamTruncated(f"input ended inside the BEGIN record ({got} of {HEADER_SIZE} bytes)")
    return bytes(header)


@dataclass
class Record:
    """One record after BEGIN. `payload` is only valid until the next record is read."""

    kind: RecordType
    offset: int
    header: Header
    payload: memoryview
    # The header's and the payload's fletcher-4 as plain ints (see record_sums.Sums): objects per record cost more than the sums.
    sums: Sums
    # Fingerprint (a, b, c, d) of the stream from the fingerprint start up to this record, with every
    # header's stamp taken as zero so that stamped and unstamped copies of a stream agree.
    fingerprint_words: Words
    # Where header and payload lie, one after the other, in the reader's SpliceRing (None: elsewhere).
    ring_start: int | None = None

    def kept(self) -> Record:
        """A copy that stays valid after the next record is read (this one's memory is the reader's)."""
        return replace(self, header=bytearray(self.header), payload=memoryview(bytes(self.payload)), ring_start=None)

    @property
    def head_sum(self) -> BlockSum:
        return record_sums.head_sum(self.sums)

    @property
    def payload_sum(self) -> BlockSum:
        return record_sums.payload_sum(self.sums)

    @property
    def fingerprint(self) -> Fletcher4:
        return Fletcher4(*self.fingerprint_words)

    @property
    def size(self) -> int:
        return HEADER_SIZE + len(self.payload)

    @property
    def end_offset(self) -> int:
        return self.offset + self.size


# fingerprint_from for a reader that needs no fingerprint (a sender): no record's offset reaches it.
NO_FINGERPRINT = 1 << 64


def fingerprint_digest(state: Fletcher4) -> str:
    """A short printable fingerprint of a prefix: 64 bits of its fletcher-4 state."""
    return f"{(state.a ^ state.b ^ state.c ^ state.d):016x}"


class StreamReader:
    """Reads substreams from a binary source, checking every checksum the stream carries."""

    def __init__(self, source: Readable, ring: SpliceRing | None = None) -> None:
        """With a ring, records are read into it, to be spliced from there (see StampedWriter)."""
        self._source = source
        self._header = bytearray(HEADER_SIZE)
        self._payload = bytearray(1 << 17)
        self._ring = ring
        self.bytes_read = 0

    def _read_exact(self, view: memoryview) -> int:
        got = read_exact(self._source, view)
        self.bytes_read += got
        return got

    def read_begin(self, *, compound: bool = False) -> tuple[Begin, bytes] | None:
        """The next substream's BEGIN and its raw bytes, or None at a clean end of input; inside a compound
        (`zfs send -R`) stream, None at its final END record instead, and the input may not end before it."""
        got = self._read_exact(memoryview(self._header))
        if got == 0 and not compound:
            return None
        if got < HEADER_SIZE:
            where = "before the final END record of the -R stream" if compound and got == 0 else "inside the BEGIN record"
            raise StreamTruncated(f"input ended {where} ({got} of {HEADER_SIZE} bytes)")
        if compound and int.from_bytes(self._header[:4], "little") == RecordType.END:
            return None
        begin = Begin.decode(self._header)
        size = payload_size(RecordType.BEGIN, self._header, 0)
        payload = bytearray(size)
        if self._read_exact(memoryview(payload)) < size:
            raise StreamTruncated("input ended inside the BEGIN record's payload")
        return begin, bytes(self._header) + bytes(payload)

    def records(self, begin_bytes: bytes, first_offset: int, fingerprint_from: int, *, mid_stream: bool = False) -> Iterator[Record]:
        """The records after BEGIN up to and including END.

        `first_offset` is the position of the first record in the original stream (a continuation
        starts in the middle); the fingerprint restarts from zero at `fingerprint_from`.
        `mid_stream`: the source is a stamped stream read from `first_offset` on, not a continuation of
        it; the running checksum before that point is taken from the first record's stamp, and every
        stamp after it, and END, are checked against it.
        """
        wire = Fletcher4().update(begin_bytes).words()
        fingerprint = ZERO
        offset = first_offset
        # The first stamp covers BEGIN too; a continuation's BEGIN has no place in the original stream.
        verified_to = 0 if first_offset == len(begin_bytes) else first_offset
        # Bound once: this loop runs per record, and lookups are a good part of its Python.
        read_header, read_payload, end = self._read_record_header, self._read_payload, RecordType.END
        verify_header, advance_record, _ = record_sums.implementation()
        while True:
            header, kind = read_header(offset)
            size = payload_size(kind, header, offset)
            if mid_stream and offset == first_offset:
                wire = self._wire_before(header, offset)
            status = verify_header(wire, header)
            if status == STAMP_MISMATCH:
                raise StreamIntegrityError(
                    f"checksum mismatch in the record at stream byte {offset}: "
                    f"bytes {verified_to}-{offset + HEADER_SIZE} were corrupted in transit",
                    verified_to,
                )
            if status == END_MISMATCH:
                raise StreamIntegrityError(
                    f"stream checksum mismatch at END (stream byte {offset}): "
                    f"bytes {verified_to}-{offset + HEADER_SIZE} were corrupted in transit",
                    verified_to,
                )
            if status == STAMPED:
                verified_to = offset + HEADER_SIZE
            kept_header, payload, ring_start = read_payload(kind, header, size, offset)
            if offset == fingerprint_from:
                fingerprint = ZERO
            wire, after, sums = advance_record(wire, fingerprint if offset >= fingerprint_from else None, header, payload)
            yield Record(kind, offset, kept_header, payload, sums, fingerprint, ring_start)
            if kind == end:
                return
            if after is not None:
                fingerprint = after
            offset += HEADER_SIZE + size

    @staticmethod
    def _wire_before(header: bytearray, offset: int) -> Words:
        """The running checksum before a stamped record, read in the middle of a stream: from its own stamp."""
        stamp = header[STAMP_OFFSET:]
        if stamp == ZERO_STAMP:
            raise StreamFormatError(f"the record at stream byte {offset} carries no running checksum to go on from")
        return Fletcher4.from_bytes(stamp).unextend(BlockSum.of(memoryview(header)[:STAMP_OFFSET])).words()

    def records_trusting_stamps(self, begin_bytes: bytes, first_offset: int, fingerprint_from: int) -> Iterator[Record]:
        """records(), for a consumer that checks every record's stamp itself (an OpenZFS `zfs receive`).

        A payload's checksum is taken from the running checksums around it, which the stream
        carries, so no payload byte is summed here; one not followed by a stamp is summed as usual.
        Corruption is then caught by the consumer, since the payload no longer matches its stamps.
        Each record is yielded once the header after it has been read.
        """
        wire = Fletcher4().update(begin_bytes)
        fingerprint = Fletcher4()
        offset = first_offset
        pending: Record | None = None
        pending_head = _EMPTY
        wire_after_stamp = wire
        while True:
            header, kind = self._read_record_header(offset)
            size = payload_size(kind, header, offset)
            head_sum = BlockSum.of(memoryview(header)[:STAMP_OFFSET])
            stamp = header[STAMP_OFFSET:]
            if pending is not None:
                if stamp != ZERO_STAMP:
                    before = Fletcher4.from_bytes(stamp).unextend(head_sum)
                    payload_sum = BlockSum.between(wire_after_stamp, before, len(pending.payload) // 4)
                else:
                    payload_sum = BlockSum.of(pending.payload)
                pending.sums = sums_of(pending_head, payload_sum)
                wire = wire_after_stamp.extend(payload_sum)
                fingerprint = self._yielded(pending, fingerprint, fingerprint_from, pending_head, payload_sum)
                yield pending
            if stamp != ZERO_STAMP and stamp != wire.extend(head_sum).to_bytes() and pending is None:
                raise StreamIntegrityError(f"checksum mismatch in the record at stream byte {offset}: the stream's start was corrupted")
            if kind == RecordType.END and end_checksum(header) != wire:
                raise StreamIntegrityError(f"stream checksum mismatch at END (stream byte {offset}): corrupted in transit", offset)
            wire_after_stamp = wire.extend(head_sum).update(stamp)
            kept_header, payload, ring_start = self._read_payload(kind, header, size, offset)
            # Its payload's sum and its fingerprint are filled in once the next header has been read.
            pending = Record(kind, offset, kept_header, payload, sums_of(head_sum, _EMPTY), ZERO, ring_start)
            pending_head = head_sum
            if kind == RecordType.END:
                self._yielded(pending, fingerprint, fingerprint_from, head_sum, _EMPTY)
                yield pending
                return
            offset += pending.size

    def _read_record_header(self, offset: int) -> tuple[bytearray, RecordType]:
        header = bytearray(HEADER_SIZE)
        got = self._read_exact(memoryview(header))
        if got < HEADER_SIZE:
            where = "before the END record" if got == 0 else "inside a record header"
            raise StreamTruncated(f"input ended at stream byte {offset + got}, {where}")
        kind = record_type(header, offset)
        if kind == RecordType.BEGIN:
            raise StreamFormatError(f"BEGIN record at byte {offset} inside a stream: corrupt or concatenated wrongly")
        if kind == RecordType.WRITE_BYREF:
            raise StreamFormatError("deduplicated stream (zfs send -D) is not supported: send without -D")
        return header, kind

    def _read_payload(self, kind: RecordType, header: bytearray, size: int, offset: int) -> tuple[Header, memoryview, int | None]:
        """The record's header, its payload and where both start in the ring (None: not in the ring)."""
        start = self._ring.region(HEADER_SIZE + size) if self._ring is not None else None
        if start is None:
            if len(self._payload) < size:
                self._payload = bytearray(size)
            payload = memoryview(self._payload)[:size]
        else:
            assert self._ring is not None
            record = self._ring.view(start, HEADER_SIZE + size)
            record[:HEADER_SIZE] = header
            payload = record[HEADER_SIZE:]
        if self._read_exact(payload) < size:
            raise StreamTruncated(f"input ended inside the {kind.name} record at stream byte {offset}")
        return (header if start is None else record[:HEADER_SIZE]), payload, start

    @staticmethod
    def _yielded(record: Record, fingerprint: Fletcher4, fingerprint_from: int, head: BlockSum, payload: BlockSum) -> Fletcher4:
        """Set the record's fingerprint (of the stream before it) and return the one after it (`head`, `payload`: its sums)."""
        if record.offset == fingerprint_from:
            fingerprint = Fletcher4()
        record.fingerprint_words = fingerprint.words()
        if record.offset >= fingerprint_from:
            return fingerprint.extend(head).extend(_ZERO_STAMP_SUM).extend(payload)
        return fingerprint


class StampedWriter:
    """Writes one substream with a fresh running checksum stamped into every record, as OpenZFS does.

    Pool-v23 receivers ignore the stamps (those header bytes are padding there) but still check
    END; modern receivers check both, so every piece stays verifiable end to end.
    """

    def __init__(self, sink: Sink, splice: Callable[[int, int], None] | None = None) -> None:
        """`splice(start, size)`: hands that part of the reader's ring to the same place as `sink`."""
        self._sink = sink
        self._splice = splice
        # The running checksum of what was written, as (a, b, c, d): the form the per-record calls take.
        self._state = ZERO
        self._restamp = record_sums.implementation()[2]
        self.bytes_written = 0

    def _emit(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        self._sink(parts)
        self.bytes_written += sum(len(p) for p in parts)

    def begin(self, begin: Begin, payload: bytes = b"") -> None:
        raw = replace(begin, payloadlen=len(payload)).encode() + payload
        self._state = Fletcher4().update(raw).words()
        self._emit([raw])

    def record(self, record: Record) -> None:
        self._state = self._restamp(self._state, record.header, record.sums)
        payload = record.payload
        if record.ring_start is not None and self._splice is not None:
            self._splice(record.ring_start, HEADER_SIZE + len(payload))
        else:
            self._sink((record.header, payload) if len(payload) else (record.header,))
        self.bytes_written += HEADER_SIZE + len(payload)

    def end(self, toguid: int) -> None:
        header = end_header(Fletcher4(*self._state), toguid)
        self._state = self._restamp(self._state, header, sums_of(BlockSum.of(memoryview(header)[:STAMP_OFFSET]), _EMPTY))
        self._emit([header])
