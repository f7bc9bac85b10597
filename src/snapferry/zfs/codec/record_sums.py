"""One record's checksums in one call each (verify its header, advance the running sums, re-stamp it): C, or this reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from snapferry.zfs.codec import fletcher
from snapferry.zfs.codec.fletcher import BlockSum, Fletcher4
from snapferry.zfs.codec.records import HEADER_SIZE, STAMP_OFFSET, RecordType, end_checksum

# A fletcher-4 state as the per-record calls pass it: (a, b, c, d).
Words = tuple[int, int, int, int]
# A record's sums: the header's (a, b, c, d) before its stamp, then the payload's (count, a, b, c, d).
Sums = tuple[int, ...]
ZERO: Final[Words] = (0, 0, 0, 0)
HEAD_WORDS = STAMP_OFFSET // 4
STAMP_WORDS = (HEADER_SIZE - STAMP_OFFSET) // 4
ZERO_STAMP = bytes(HEADER_SIZE - STAMP_OFFSET)

# verify_header's answers.
NO_STAMP, STAMPED, STAMP_MISMATCH, END_MISMATCH = 0, 1, 2, 3

Header = bytes | bytearray | memoryview
VerifyHeader = Callable[[Words, Header], int]
AdvanceRecord = Callable[[Words, "Words | None", Header, Header], "tuple[Words, Words | None, Sums]"]
Restamp = Callable[[Words, "bytearray | memoryview", Sums], Words]


def sums_of(head: BlockSum, payload: BlockSum) -> Sums:
    return (head.a, head.b, head.c, head.d, payload.count, payload.a, payload.b, payload.c, payload.d)


def head_sum(sums: Sums) -> BlockSum:
    return BlockSum(HEAD_WORDS, *sums[:4])


def payload_sum(sums: Sums) -> BlockSum:
    return BlockSum(*sums[4:])


def verify_header(wire: Words, header: Header) -> int:
    """How a record header stands against the running checksum `wire` of the stream before it (see the answers above)."""
    state = Fletcher4(*wire)
    stamp = bytes(header[STAMP_OFFSET:])
    status = NO_STAMP
    if stamp != ZERO_STAMP:
        expected = state.extend(BlockSum.of(memoryview(header)[:STAMP_OFFSET])).to_bytes()
        status = STAMPED if stamp == expected else STAMP_MISMATCH
    if status != STAMP_MISMATCH and int.from_bytes(header[:4], "little") == RecordType.END and end_checksum(header) != state:
        status = END_MISMATCH
    return status


def advance_record(wire: Words, fingerprint: Words | None, header: Header, payload: Header) -> tuple[Words, Words | None, Sums]:
    """The running checksum after the record, the fingerprint after it (stamp taken as zeros; None: not kept), its sums."""
    head = BlockSum.of(memoryview(header)[:STAMP_OFFSET])
    body = BlockSum.of(payload)
    wire_after = Fletcher4(*wire).extend(head).update(header[STAMP_OFFSET:]).extend(body).words()
    print_after = None
    if fingerprint is not None:
        print_after = Fletcher4(*fingerprint).extend(head).advance_zeros(STAMP_WORDS).extend(body).words()
    return wire_after, print_after, sums_of(head, body)


def restamp(state: Words, header: bytearray | memoryview, sums: Sums) -> Words:
    """Write into the header the stamp that follows `state` (what a writer put out before it); the state after the record."""
    stamped = Fletcher4(*state).extend(head_sum(sums))
    stamp = stamped.to_bytes()
    header[STAMP_OFFSET:] = stamp
    return stamped.update(stamp).extend(payload_sum(sums)).words()


def implementation() -> tuple[VerifyHeader, AdvanceRecord, Restamp]:
    """The C functions while the extension is in use, else this module's."""
    native = fletcher.native_module()
    if native is not None:
        return native.verify_header, native.advance_record, native.restamp
    return verify_header, advance_record, restamp
