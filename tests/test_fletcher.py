"""Fletcher-4 (snapferry.zfs.codec.fletcher) against the word-by-word reference and a real OpenZFS stream."""

from __future__ import annotations

import re
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapferry.zfs.codec.fletcher import MASK64, BlockSum, Fletcher4, fletcher4_reference
from snapferry_testkit.shared_data import OPENZFS_DATA

# Internal slice size of BlockSum.of, in 32-bit words (4 MiB of input). Duplicated on purpose so
# that a change of the constant does not silently shrink the "bigger than one slice" tests.
# (BlockSum.of now works in smaller slices, ROWS_SLICE_WORDS below; blocks of this size span several.)
SLICE_WORDS = 1 << 20
# BlockSum.of sums rows of ROW_WORDS words exactly with a float64 matrix product, pads a block that is
# not whole rows with leading zeros, and goes through big blocks ROWS_SLICE_WORDS words at a time.
# Duplicated for the same reason: the edge tests below are placed around these sizes.
ROW_WORDS = 64
ROWS_SLICE_WORDS = 1 << 17

DATA = OPENZFS_DATA
HEADER = 312

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="OpenZFS fixtures not available")

u64 = st.integers(min_value=0, max_value=MASK64)
states = st.builds(Fletcher4, u64, u64, u64, u64)


@st.composite
def word_data(draw: st.DrawFn, max_words: int = 1024) -> bytes:
    """Random bytes of a whole number of 32-bit words (up to 4 KiB by default)."""
    n = draw(st.integers(min_value=0, max_value=max_words))
    return draw(st.binary(min_size=4 * n, max_size=4 * n))


@st.composite
def split_points(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    data = draw(word_data())
    words = len(data) // 4
    cuts = draw(st.lists(st.integers(min_value=0, max_value=words), max_size=8))
    return data, sorted(4 * c for c in cuts)


def reference_from(state: Fletcher4, data: bytes) -> Fletcher4:
    """Word-by-word fletcher-4 continued from an arbitrary state."""
    a, b, c, d = state.words()
    for i in range(0, len(data), 4):
        a = (a + int.from_bytes(data[i : i + 4], "little")) & MASK64
        b = (b + a) & MASK64
        c = (c + b) & MASK64
        d = (d + c) & MASK64
    return Fletcher4(a, b, c, d)


# --- against the reference -------------------------------------------------------------------


def test_empty_input_is_zero() -> None:
    assert Fletcher4().update(b"") == Fletcher4()
    assert BlockSum.of(b"") == BlockSum(0, 0, 0, 0, 0)
    assert Fletcher4().is_zero()
    assert not Fletcher4(0, 0, 0, 1).is_zero()


def test_known_small_values() -> None:
    # words 1, 2, 3: a = 6, b = 1+3+6 = 10, c = 1+4+10 = 15, d = 1+5+15 = 21
    data = b"".join(w.to_bytes(4, "little") for w in (1, 2, 3))
    assert Fletcher4().update(data) == Fletcher4(6, 10, 15, 21)
    assert fletcher4_reference(data) == Fletcher4(6, 10, 15, 21)


def test_words_are_little_endian() -> None:
    assert Fletcher4().update(b"\x01\x00\x00\x00").a == 1
    assert Fletcher4().update(b"\x00\x00\x00\x01").a == 1 << 24


@given(word_data())
@settings(max_examples=200, deadline=None)
def test_update_matches_reference(data: bytes) -> None:
    assert Fletcher4().update(data) == fletcher4_reference(data)


@given(word_data())
@settings(max_examples=100, deadline=None)
def test_blocksum_of_matches_reference(data: bytes) -> None:
    block = BlockSum.of(data)
    assert block.count == len(data) // 4
    assert (block.a, block.b, block.c, block.d) == fletcher4_reference(data).words()


@given(word_data(max_words=256))
@settings(max_examples=100, deadline=None)
def test_accepts_bytearray_and_memoryview(data: bytes) -> None:
    expected = fletcher4_reference(data)
    assert Fletcher4().update(bytearray(data)) == expected
    assert Fletcher4().update(memoryview(data)) == expected
    # an unaligned slice of a larger buffer
    padded = b"\x01" + data + b"\x02"
    assert Fletcher4().update(memoryview(padded)[1 : 1 + len(data)]) == expected


@given(st.binary(max_size=64).filter(lambda b: len(b) % 4 != 0))
def test_partial_word_is_rejected(data: bytes) -> None:
    with pytest.raises(ValueError, match="whole 32-bit words"):
        BlockSum.of(data)
    with pytest.raises(ValueError, match="whole 32-bit words"):
        Fletcher4().update(data)


@given(states, word_data(max_words=256))
@settings(max_examples=150, deadline=None)
def test_update_from_any_state_matches_reference(state: Fletcher4, data: bytes) -> None:
    assert state.update(data) == reference_from(state, data)


# --- splitting and extending -----------------------------------------------------------------


@given(split_points())
@settings(max_examples=200, deadline=None)
def test_split_at_word_boundaries_then_update(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    bounds = [0, *cuts, len(data)]
    state = Fletcher4()
    for start, stop in pairwise(bounds):
        state = state.update(data[start:stop])
    assert state == fletcher4_reference(data)


@given(split_points())
@settings(max_examples=200, deadline=None)
def test_split_blocksums_combined_with_extend(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    bounds = [0, *cuts, len(data)]
    blocks = [BlockSum.of(data[start:stop]) for start, stop in pairwise(bounds)]
    state = Fletcher4()
    for block in blocks:
        state = state.extend(block)
    assert state == fletcher4_reference(data)
    assert sum(b.count for b in blocks) == len(data) // 4


@given(states, word_data(max_words=256), word_data(max_words=256))
@settings(max_examples=100, deadline=None)
def test_one_blocksum_extends_several_states(start: Fletcher4, first: bytes, second: bytes) -> None:
    # Fletcher-4 is affine in its starting state: the same BlockSum serves any running state.
    block = BlockSum.of(second)
    assert Fletcher4().update(first).extend(block) == fletcher4_reference(first + second)
    assert start.extend(block) == reference_from(start, second)


# --- zeros -------------------------------------------------------------------------------------


@given(states, st.integers(min_value=0, max_value=2048))
@settings(max_examples=150, deadline=None)
def test_advance_zeros_equals_zero_words(state: Fletcher4, n: int) -> None:
    assert state.advance_zeros(n) == state.update(bytes(4 * n))
    assert state.advance_zeros(n) == reference_from(state, bytes(4 * n))


@given(states, st.integers(min_value=0, max_value=1 << 62), st.integers(min_value=0, max_value=1 << 62))
def test_advance_zeros_composes(state: Fletcher4, n: int, m: int) -> None:
    assert state.advance_zeros(n).advance_zeros(m) == state.advance_zeros(n + m)


def test_zero_state_stays_zero_over_zeros() -> None:
    assert Fletcher4().advance_zeros(1 << 40) == Fletcher4()


# --- serialisation -----------------------------------------------------------------------------


@given(states)
def test_to_bytes_from_bytes_roundtrip(state: Fletcher4) -> None:
    raw = state.to_bytes()
    assert len(raw) == 32
    assert Fletcher4.from_bytes(raw) == state
    assert Fletcher4.from_bytes(memoryview(raw)) == state
    assert Fletcher4.from_bytes(bytearray(raw)) == state


@given(st.binary(min_size=32, max_size=32))
def test_from_bytes_to_bytes_roundtrip(raw: bytes) -> None:
    assert Fletcher4.from_bytes(raw).to_bytes() == raw


def test_to_bytes_layout_is_four_little_endian_words() -> None:
    state = Fletcher4(1, 2, 3, MASK64)
    assert state.to_bytes() == ((1).to_bytes(8, "little") + (2).to_bytes(8, "little") + (3).to_bytes(8, "little") + b"\xff" * 8)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_from_bytes_rejects_wrong_size(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Fletcher4.from_bytes(bytes(size))


# --- blocks bigger than one slice --------------------------------------------------------------


def _chunked(data: bytes, chunk: int) -> Fletcher4:
    state = Fletcher4()
    for start in range(0, len(data), chunk):
        state = state.update(data[start : start + chunk])
    return state


@pytest.fixture(scope="module")
def big_random() -> bytes:
    """4 MiB + 12 bytes of deterministic random data: one full slice plus a short tail."""
    rng = np.random.default_rng(20240601)
    return rng.integers(0, 256, size=4 * SLICE_WORDS + 12, dtype=np.uint8).tobytes()


def test_block_larger_than_slice_matches_chunked(big_random: bytes) -> None:
    whole = Fletcher4().update(big_random)
    assert whole == _chunked(big_random, 64 * 1024)
    assert whole == _chunked(big_random, 4 * SLICE_WORDS - 4)  # chunks that straddle the slice edge
    block = BlockSum.of(big_random)
    assert block.count == SLICE_WORDS + 3
    assert Fletcher4().extend(block) == whole


def test_block_larger_than_slice_matches_reference(big_random: bytes) -> None:
    assert Fletcher4().update(big_random) == fletcher4_reference(big_random)


@pytest.mark.parametrize("words", [SLICE_WORDS - 1, SLICE_WORDS, SLICE_WORDS + 1, 2 * SLICE_WORDS + 5])
def test_all_ones_around_slice_edges_wraps_like_reference(words: int) -> None:
    # 0xffffffff words make c and d wrap modulo 2**64 many times over.
    data = b"\xff" * (4 * words)
    expected = _chunked(data, 4096)
    assert Fletcher4().update(data) == expected
    assert expected.d != 0


def test_all_ones_two_slices_matches_reference() -> None:
    data = b"\xff" * (4 * (2 * SLICE_WORDS + 2))
    assert Fletcher4().update(data) == fletcher4_reference(data)


# --- around the row and slice edges of the float64 / uint64 summation ---------------------------


def _words_data(words: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 1 << 32, size=words, dtype=np.uint32).astype("<u4").tobytes()


def _cumsum_oracle(data: bytes) -> Fletcher4:
    """Independent of BlockSum.of: four running sums with numpy's uint64 cumsum, which wraps mod 2**64."""
    sums = np.frombuffer(data, dtype="<u4").astype(np.uint64)
    last = []
    for _ in range(4):
        sums = np.cumsum(sums, dtype=np.uint64)
        last.append(int(sums[-1]) if len(sums) else 0)
    return Fletcher4(*last)


@given(word_data())
@settings(max_examples=100, deadline=None)
def test_cumsum_oracle_matches_reference(data: bytes) -> None:
    assert _cumsum_oracle(data) == fletcher4_reference(data)


ROW_EDGE_WORDS = sorted({0, 1, 2, *(k * ROW_WORDS + e for k in (1, 2, 3, 7, 64, 511, 512, 513) for e in (-1, 0, 1)), 128 * ROW_WORDS - 33})


@pytest.mark.parametrize("words", ROW_EDGE_WORDS)
def test_row_edges_match_reference(words: int) -> None:
    data = _words_data(words, seed=words)
    block = BlockSum.of(data)
    assert block.count == words
    assert (block.a, block.b, block.c, block.d) == fletcher4_reference(data).words()


@pytest.mark.parametrize("words", ROW_EDGE_WORDS)
def test_row_edges_all_ones_match_reference(words: int) -> None:
    # All 0xffffffff words make every row sum as large as it gets: the float64 products must stay exact.
    data = b"\xff" * (4 * words)
    block = BlockSum.of(data)
    assert (block.a, block.b, block.c, block.d) == fletcher4_reference(data).words()


SLICE_EDGE_WORDS = [
    ROWS_SLICE_WORDS - ROW_WORDS - 1,
    ROWS_SLICE_WORDS - ROW_WORDS,
    ROWS_SLICE_WORDS - 1,
    ROWS_SLICE_WORDS,
    ROWS_SLICE_WORDS + 1,
    ROWS_SLICE_WORDS + ROW_WORDS - 1,
    ROWS_SLICE_WORDS + ROW_WORDS,
    ROWS_SLICE_WORDS + ROW_WORDS + 1,
    2 * ROWS_SLICE_WORDS - 1,
    2 * ROWS_SLICE_WORDS,
    2 * ROWS_SLICE_WORDS + 37,
    3 * ROWS_SLICE_WORDS + ROW_WORDS + 5,
]


@pytest.mark.parametrize("words", SLICE_EDGE_WORDS)
def test_slice_edges_match_reference(words: int) -> None:
    data = _words_data(words, seed=words)
    block = BlockSum.of(data)
    assert block.count == words
    assert (block.a, block.b, block.c, block.d) == fletcher4_reference(data).words()


@pytest.mark.parametrize("words", SLICE_EDGE_WORDS)
def test_slice_edges_all_ones_match_reference(words: int) -> None:
    data = b"\xff" * (4 * words)
    block = BlockSum.of(data)
    assert (block.a, block.b, block.c, block.d) == fletcher4_reference(data).words()


@pytest.mark.parametrize("words", [8 * ROWS_SLICE_WORDS + 3, 16 * ROWS_SLICE_WORDS + ROW_WORDS + 1])
@pytest.mark.parametrize("fill", ["random", "ones", "high"])
def test_many_slices_match_cumsum_oracle(words: int, fill: str) -> None:
    if fill == "random":
        data = _words_data(words, seed=7)
    elif fill == "ones":
        data = b"\xff" * (4 * words)
    else:  # only the top bit set: catches a signed reading of the words
        data = b"\x00\x00\x00\x80" * words
    block = BlockSum.of(data)
    assert (block.a, block.b, block.c, block.d) == _cumsum_oracle(data).words()


@pytest.mark.parametrize("words", [ROW_WORDS - 1, ROWS_SLICE_WORDS + 1])
def test_unaligned_view_at_edges(words: int) -> None:
    data = _words_data(words, seed=3)
    padded = b"\x01" + data + b"\x02"
    assert BlockSum.of(memoryview(padded)[1 : 1 + len(data)]) == BlockSum.of(data)
    assert BlockSum.of(bytearray(data)) == BlockSum.of(data)


@given(st.integers(min_value=0, max_value=3 * ROW_WORDS), st.integers(min_value=0, max_value=3 * ROW_WORDS))
@settings(max_examples=50, deadline=None)
def test_leading_zero_words_change_nothing(zeros: int, words: int) -> None:
    # BlockSum.of pads a block to whole rows with leading zeros; fletcher-4 must not see them.
    data = _words_data(words, seed=words)
    block = BlockSum.of(bytes(4 * zeros) + data)
    assert block.count == zeros + words
    assert (block.a, block.b, block.c, block.d) == fletcher4_reference(data).words()


# --- a real OpenZFS stream ---------------------------------------------------------------------


def _dump_end_checksum(dump: Path) -> Fletcher4:
    match = re.search(r"^END checksum = ([0-9a-f]+)/([0-9a-f]+)/([0-9a-f]+)/([0-9a-f]+)$", dump.read_text(), re.M)
    assert match, f"no END line in {dump}"
    return Fletcher4(*(int(g, 16) for g in match.groups()))


@needs_data
def test_end_checksum_of_real_stream() -> None:
    data = (DATA / "zfs-2.3.2" / "full_s1.stream").read_bytes()
    end = data[-HEADER:]
    assert int.from_bytes(end[:4], "little") == 5  # DRR_END
    computed = Fletcher4().update(data[:-HEADER])
    assert Fletcher4.from_bytes(end[8:40]) == computed
    # and an oracle independent of snapferry: what `zstream dump` printed
    assert computed == _dump_end_checksum(DATA / "zfs-2.3.2" / "full_s1.stream.dump.txt")


@needs_data
@pytest.mark.parametrize(
    "name",
    [
        "zfs-2.3.2/full_s1.resume.stream",
        "zfs-2.3.2/incr_s1_s2.stream",
        "zfs-2.3.2/incr_s1_s2.resume.stream",
        "zfs-2.1.11/full_s1.stream",
        "zfs-2.1.11/full_s1.resume.stream",
        "zfs-2.1.11/incr_s1_s2.stream",
        "zfs-2.1.11/incr_s1_s2.resume.stream",
    ],
)
def test_end_checksum_of_other_real_streams(name: str) -> None:
    data = (DATA / name).read_bytes()
    end = data[-HEADER:]
    assert Fletcher4.from_bytes(end[8:40]) == Fletcher4().update(data[:-HEADER])


@needs_data
def test_end_stamp_of_real_stream_covers_its_own_header() -> None:
    # Modern OpenZFS stamps the running checksum (up to the stamp itself) into END's last 32 bytes.
    data = (DATA / "zfs-2.3.2" / "full_s1.stream").read_bytes()
    assert Fletcher4.from_bytes(data[-32:]) == Fletcher4().update(data[:-32])


@given(states, word_data(max_words=256))
def test_between_recovers_the_block_from_two_running_states(start: Fletcher4, data: bytes) -> None:
    block = BlockSum.of(data)
    assert BlockSum.between(start, start.extend(block), len(data) // 4) == block


@given(states, states, st.integers(min_value=0, max_value=1 << 40))
def test_between_then_extend_is_the_identity(before: Fletcher4, after: Fletcher4, count: int) -> None:
    assert before.extend(BlockSum.between(before, after, count)) == after


@given(states, word_data(max_words=256))
def test_unextend_undoes_extend(start: Fletcher4, data: bytes) -> None:
    block = BlockSum.of(data)
    assert start.extend(block).unextend(block) == start
