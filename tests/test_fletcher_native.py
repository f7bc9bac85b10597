"""The C fletcher-4 extension against the numpy reference, byte for byte, alone and inside the stream reader."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapferry.errors import SnapferryError
from snapferry.zfs.codec import fletcher, record_sums
from snapferry.zfs.codec.fletcher import MASK64, BlockSum, Fletcher4, fletcher4_reference
from snapferry.zfs.codec.records import HEADER_SIZE, RecordType
from snapferry.zfs.codec.stream import StampedWriter, StreamReader
from snapferry_testkit.shared_data import OPENZFS_DATA

pytestmark = pytest.mark.skipif(not fletcher.native_available(), reason="C extension not built (python3 setup.py build_ext --inplace)")

u64 = st.integers(min_value=0, max_value=MASK64)
states = st.builds(Fletcher4, u64, u64, u64, u64)
# Lengths around the four-lane loop's edges (multiples of 16 bytes) and the GIL threshold (64 KiB).
word_counts = st.one_of(st.integers(0, 64), st.integers(0, 5000), st.sampled_from([16383, 16384, 16385, 32768 + 3]))


@contextmanager
def native(enabled: bool) -> Iterator[None]:
    before = fletcher.use_native(enabled)
    try:
        yield
    finally:
        fletcher.use_native(before)


def both(fn: Callable[[], object]) -> tuple[object, object]:
    """fn's result with the C sums, then with the numpy reference."""
    with native(True):
        fast = fn()
    with native(False):
        slow = fn()
    return fast, slow


@st.composite
def word_data(draw: st.DrawFn) -> bytes:
    n = draw(word_counts)
    return random.Random(draw(st.integers(0, 2**32))).randbytes(4 * n)


@settings(max_examples=300, deadline=None)
@given(word_data(), st.integers(0, 3))
def test_block_sum_matches_reference(data: bytes, misalign: int) -> None:
    # A payload view can start anywhere in the reader's buffer: the C loop must not assume alignment.
    view = memoryview(bytearray(misalign) + data)[misalign:]
    fast, slow = both(lambda: BlockSum.of(view))
    assert fast == slow
    if len(data) <= 4096:
        assert fast == BlockSum(len(data) // 4, *fletcher4_reference(data).words())


@settings(max_examples=300, deadline=None)
@given(states, word_data())
def test_update_from_any_state_matches_reference(state: Fletcher4, data: bytes) -> None:
    fast, slow = both(lambda: state.update(data))
    assert fast == slow


@settings(max_examples=500, deadline=None)
@given(states, st.one_of(st.integers(0, 2**20), u64, st.integers(MASK64 - 3, MASK64 + 5)), u64, u64, u64, u64)
def test_extend_matches_reference_for_any_count(state: Fletcher4, count: int, a: int, b: int, c: int, d: int) -> None:
    block = BlockSum(count, a, b, c, d)
    fast, slow = both(lambda: state.extend(block))
    assert fast == slow
    assert fast.unextend(block) == state


@settings(max_examples=100, deadline=None)
@given(states, u64)
def test_advance_zeros_and_between_agree(state: Fletcher4, count: int) -> None:
    fast, slow = both(lambda: state.advance_zeros(count))
    assert fast == slow
    assert BlockSum.between(state, fast, count) == BlockSum(count, 0, 0, 0, 0)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 131071])
def test_partial_words_are_refused_by_both(size: int) -> None:
    for enabled in (True, False):
        with native(enabled), pytest.raises(ValueError, match=f"got {size} bytes"):
            BlockSum.of(bytes(size))


def test_non_buffers_are_refused() -> None:
    with native(True), pytest.raises(TypeError):
        BlockSum.of("text")  # type: ignore[arg-type]


def test_pure_switch_and_environment() -> None:
    with native(False):
        assert not fletcher.native_enabled()
    with native(True):
        assert fletcher.native_enabled()
    check = "from snapferry.zfs.codec import fletcher; print(fletcher.native_available(), fletcher.native_enabled())"
    env = {**os.environ, "SNAPFERRY_PURE": "1"}
    said = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True).stdout
    assert said.split() == ["True", "False"]


def test_big_buffer_matches_reference() -> None:
    data = random.Random(7).randbytes(9 << 20)  # several numpy slices, GIL released in C
    fast, slow = both(lambda: Fletcher4(1, 2, 3, MASK64).update(data))
    assert fast == slow


# --- one record's sums: verify_header, advance_record and restamp, C against the reference ---------

words4 = st.tuples(u64, u64, u64, u64)


@st.composite
def record_headers(draw: st.DrawFn, wire: record_sums.Words) -> bytearray:
    """A header that is unstamped, stamped right or wrong, and maybe an END whose checksum is right or wrong."""
    header = bytearray(random.Random(draw(st.integers(0, 2**32))).randbytes(HEADER_SIZE))
    if draw(st.booleans()):
        header[:4] = int(RecordType.END).to_bytes(4, "little")
        if draw(st.booleans()):
            header[8:40] = Fletcher4(*wire).to_bytes()
    stamp = draw(st.sampled_from(["none", "right", "wrong"]))
    if stamp == "none":
        header[record_sums.STAMP_OFFSET :] = bytes(HEADER_SIZE - record_sums.STAMP_OFFSET)
    elif stamp == "right":
        header[record_sums.STAMP_OFFSET :] = Fletcher4(*wire).extend(BlockSum.of(header[: record_sums.STAMP_OFFSET])).to_bytes()
    return header


@settings(max_examples=400, deadline=None)
@given(st.data(), words4, st.one_of(st.none(), words4), word_data(), words4)
def test_record_sums_match_reference(
    data: st.DataObject, wire: record_sums.Words, fingerprint: record_sums.Words | None, payload: bytes, state: record_sums.Words
) -> None:
    header = data.draw(record_headers(wire))

    def verify_and_advance() -> tuple[object, object]:
        verify, advance, _ = record_sums.implementation()
        return verify(wire, header), advance(wire, fingerprint, header, payload)

    fast, slow = both(verify_and_advance)
    assert fast == slow
    sums = record_sums.advance_record(wire, fingerprint, header, payload)[2]
    fast_header, slow_header = bytearray(header), bytearray(header)
    with native(True):
        fast_state = record_sums.implementation()[2](state, fast_header, sums)
    assert (fast_state, fast_header) == (record_sums.restamp(state, slow_header, sums), slow_header)


def test_restamped_record_verifies() -> None:
    """What restamp writes is what verify_header accepts, from the same state; one bit off is refused."""
    header = bytearray(random.Random(3).randbytes(HEADER_SIZE))
    header[:4] = int(RecordType.WRITE).to_bytes(4, "little")
    state = (1, 2, 3, 4)
    sums = record_sums.advance_record(state, None, header, b"")[2]
    with native(True):
        verify, _, restamp = record_sums.implementation()
        restamp(state, header, sums)
        assert verify(state, header) == record_sums.STAMPED
        header[-1] ^= 1
        assert verify(state, header) == record_sums.STAMP_MISMATCH


def test_record_calls_refuse_wrong_shapes() -> None:
    with native(True):
        verify, advance, restamp = record_sums.implementation()
        with pytest.raises(ValueError, match="312 bytes, got 311"):
            verify((0, 0, 0, 0), bytes(311))
        with pytest.raises(TypeError, match="tuple of four ints"):
            advance((0, 0, 0), None, bytes(HEADER_SIZE), b"")
        with pytest.raises(BufferError):
            restamp((0, 0, 0, 0), bytes(HEADER_SIZE), (0,) * 9)  # a header to stamp must be writable
        with pytest.raises(TypeError, match="nine ints"):
            restamp((0, 0, 0, 0), bytearray(HEADER_SIZE), (0,) * 8)


# --- the stream reader and writer, C sums on and off ----------------------------------------------

STREAMS = sorted(OPENZFS_DATA.glob("*/*.stream")) if OPENZFS_DATA.is_dir() else []


def transcript(data: bytes, trusting: bool, fingerprint_from: int | None = None) -> list[object]:
    """Everything the reader yields and the writer writes for a stream, or the error that stopped it."""
    out: list[object] = []
    written: list[bytes] = []
    reader = StreamReader(io.BytesIO(data))
    writer = StampedWriter(lambda parts: written.extend(bytes(p) for p in parts))
    try:
        first = reader.read_begin()
        if first is None:
            return ["empty"]
        begin, begin_bytes = first
        writer.begin(begin, begin_bytes[HEADER_SIZE:])
        read = reader.records_trusting_stamps if trusting else reader.records
        start = len(begin_bytes)
        for r in read(begin_bytes, start, start if fingerprint_from is None else fingerprint_from):
            out.append((r.kind, r.offset, bytes(r.header), bytes(r.payload), r.head_sum, r.payload_sum, r.fingerprint))
            if r.kind == RecordType.END:
                writer.end(begin.toguid)
            else:
                writer.record(r)
    except SnapferryError as exc:
        out.append((type(exc).__name__, str(exc), getattr(exc, "verified_to", None)))
    out.append(b"".join(written))
    return out


@pytest.mark.skipif(not STREAMS, reason="OpenZFS fixtures not available")
@pytest.mark.parametrize("path", STREAMS, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("trusting", [False, True])
def test_reader_and_writer_agree_on_real_streams(path: Path, trusting: bool) -> None:
    data = path.read_bytes()
    fast, slow = both(lambda: transcript(data, trusting))
    assert fast == slow
    assert isinstance(fast[-1], bytes) and len(fast) > 2


SMALL = OPENZFS_DATA / "zfs-2.3.2" / "incr_s1_s2.resume.stream"


@pytest.mark.skipif(not SMALL.is_file(), reason="OpenZFS fixtures not available")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=4), st.booleans())
def test_reader_agrees_on_damaged_streams(flips: list[tuple[int, int]], trusting: bool) -> None:
    data = bytearray(SMALL.read_bytes())
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    fast, slow = both(lambda: transcript(bytes(data), trusting))
    assert fast == slow
