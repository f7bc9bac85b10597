"""Fletcher-4 as ZFS computes it for send streams: running, native order, in C or vectorised with numpy."""

from __future__ import annotations

import functools
import importlib
import os
import struct
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

MASK64 = (1 << 64) - 1
_ZIO_CKSUM = struct.Struct("<4Q")

# The C extension does the sums when it was built; the numpy code below stays the reference that the
# tests compare it with, and the fallback where there was no compiler. SNAPFERRY_PURE=1 forces it.
# numpy is imported only by the reference: it is a good part of the CLI's start-up CPU.
_built: ModuleType | None
try:
    _built = importlib.import_module("snapferry.zfs.codec._fletcher4c")
except ImportError:
    _built = None
_native: ModuleType | None = None if os.environ.get("SNAPFERRY_PURE") else _built


def native_available() -> bool:
    """Whether the C extension was built and can be imported."""
    return _built is not None


def native_enabled() -> bool:
    return _native is not None


def native_module() -> ModuleType | None:
    """The C extension while it is in use (see use_native), else None."""
    return _native


def use_native(enabled: bool) -> bool:
    """Switch between the C sums and the numpy reference (for tests); returns the previous setting."""
    global _native
    if enabled and _built is None:
        raise RuntimeError("the C fletcher-4 extension is not built (python3 setup.py build_ext --inplace)")
    before = _native is not None
    _native = _built if enabled else None
    return before


# How BlockSum.of sums a block, two levels deep:
#
# 1. The words are laid out as rows of _ROW_WORDS words. One float64 matrix product (BLAS dgemm)
#    of the (rows x _ROW_WORDS) word matrix with the (_ROW_WORDS x 4) matrix of per-word weights
#    gives each row's own (a, b, c, d) started from zero. It is exact: a word with k - 1 words after
#    it in its row weighs 1, k, k(k+1)/2 and k(k+1)(k+2)/6 in a, b, c and d, and a row's d is at
#    most (2**32 - 1) * 64*65*66*67/24 < 2**52, so every product and every partial sum is an integer
#    below 2**53, whatever order, blocking or fused multiply-adds the BLAS uses, on however many
#    threads.
# 2. The row sums are combined in uint64 arithmetic, which wraps modulo 2**64 like the C
#    implementation: a row followed by n more words contributes what Fletcher4.extend gives when
#    its sums are extended by n zero words, i.e. (A, B + nA, C + nB + T2(n)A, D + nC + T2(n)B + T3(n)A)
#    with T2(n) = n(n+1)/2 and T3(n) = n(n+1)(n+2)/6: one small (4 x rows) @ (rows x 4) product.
#
# A block that is not a whole number of rows gets zero words in front of it, in the float64 copy
# that step 1 makes anyway: leading zeros leave all four sums at zero, so they change nothing.
# Big blocks go through in slices of _SLICE_WORDS words (512 KiB of input, a 1 MiB float64 copy that
# stays in L2), joined with Fletcher4.extend. Bigger slices are slower: OpenBLAS 0.3.31 took several
# times longer per word for this product from 4096 rows on.
_ROW_WORDS = 64
_SLICE_WORDS = 1 << 17
_SLICE_ROWS = _SLICE_WORDS // _ROW_WORDS


def _t2(n: int) -> int:
    return n * (n + 1) // 2


def _t3(n: int) -> int:
    return n * (n + 1) * (n + 2) // 6


if _SLICE_WORDS % _ROW_WORDS or (2**32 - 1) * sum(_t3(k) for k in range(1, _ROW_WORDS + 1)) >= 2**53:
    raise AssertionError("rows must tile a slice, and a row's float64 sums must stay exact")


@functools.cache
def _weights() -> tuple[np.ndarray, np.ndarray]:
    """The per-word and per-row weight matrices, made on first use of the numpy reference."""
    import numpy as np

    def frozen(rows: list[list[int]], dtype: type[np.generic]) -> np.ndarray:
        array = np.array(rows, dtype=dtype)
        array.flags.writeable = False
        return array

    # Row i of word_weights: the weights in (a, b, c, d) of the word with _ROW_WORDS - 1 - i words
    # after it in its row (the last word of a row weighs 1 everywhere).
    word_weights = frozen([[1, k, _t2(k), _t3(k)] for k in range(_ROW_WORDS, 0, -1)], np.float64)
    # Row r of row_weights: the weights of a row's sums (A, B, C, D) when n = (_SLICE_ROWS - 1 - r) *
    # _ROW_WORDS words follow that row (the last row weighs 1, 0, 0, 0).
    row_weights = frozen(
        [[1, n, _t2(n) & MASK64, _t3(n) & MASK64] for n in range((_SLICE_ROWS - 1) * _ROW_WORDS, -1, -_ROW_WORDS)],
        np.uint64,
    )
    return word_weights, row_weights


@dataclass(frozen=True)
class Fletcher4:
    """A fletcher-4 state (a, b, c, d), each sum kept modulo 2**64."""

    a: int = 0
    b: int = 0
    c: int = 0
    d: int = 0

    def words(self) -> tuple[int, int, int, int]:
        return (self.a, self.b, self.c, self.d)

    def to_bytes(self) -> bytes:
        """The 32-byte zio_cksum_t as stored in stream headers (little-endian words)."""
        return _ZIO_CKSUM.pack(self.a, self.b, self.c, self.d)

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> Fletcher4:
        if memoryview(raw).nbytes != 32:
            raise ValueError("a fletcher-4 value is 32 bytes")
        return cls(*_ZIO_CKSUM.unpack(raw))

    def is_zero(self) -> bool:
        return not (self.a or self.b or self.c or self.d)

    def extend(self, block: BlockSum) -> Fletcher4:
        """The state after feeding, from this state, the words that `block` summed from zero."""
        if _native is not None and block.count <= MASK64:
            return Fletcher4(*_native.extend(self.a, self.b, self.c, self.d, block.count, block.a, block.b, block.c, block.d))
        n, a, b, c = block.count, self.a, self.b, self.c
        t2 = n * (n + 1) // 2
        t3 = n * (n + 1) * (n + 2) // 6
        return Fletcher4(
            (a + block.a) & MASK64,
            (self.b + n * a + block.b) & MASK64,
            (c + n * b + t2 * a + block.c) & MASK64,
            (self.d + n * c + t2 * b + t3 * a + block.d) & MASK64,
        )

    def update(self, data: bytes | bytearray | memoryview) -> Fletcher4:
        if _native is not None:
            return Fletcher4(*_native.update(self.a, self.b, self.c, self.d, data))
        return self.extend(BlockSum.of(data))

    def unextend(self, block: BlockSum) -> Fletcher4:
        """The state that `extend(block)` took to this one."""
        n = block.count
        a = (self.a - block.a) & MASK64
        b = (self.b - n * a - block.b) & MASK64
        c = (self.c - n * b - _t2(n) * a - block.c) & MASK64
        return Fletcher4(a, b, c, (self.d - n * c - _t2(n) * b - _t3(n) * a - block.d) & MASK64)

    def advance_zeros(self, count: int) -> Fletcher4:
        """The state after `count` zero words: cheap, no data needed."""
        return self.extend(BlockSum(count, 0, 0, 0, 0))


@dataclass(frozen=True)
class BlockSum:
    """Fletcher-4 of one block started from zero, with its length in words.

    Fletcher-4 is affine in its starting state, so one BlockSum can extend several running
    states (the stream's, the piece's, the fingerprint's) without reading the data again.
    """

    count: int
    a: int
    b: int
    c: int
    d: int

    @classmethod
    def between(cls, before: Fletcher4, after: Fletcher4, count: int) -> BlockSum:
        """The sums of the `count` words that took a running state from `before` to `after`.

        Fletcher4.extend solved for the block: a stream that carries its running checksum gives the
        checksum of any stretch of it without reading the stretch.
        """
        n, a, b, c = count, before.a, before.b, before.c
        return cls(
            count,
            (after.a - a) & MASK64,
            (after.b - before.b - n * a) & MASK64,
            (after.c - c - n * b - _t2(n) * a) & MASK64,
            (after.d - before.d - n * c - _t2(n) * b - _t3(n) * a) & MASK64,
        )

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> BlockSum:
        if _native is not None:
            return cls(memoryview(data).nbytes // 4, *_native.block_sum(data))
        view = memoryview(data).cast("B")
        if len(view) % 4:
            raise ValueError(f"fletcher-4 needs whole 32-bit words, got {len(view)} bytes")
        import numpy as np

        words = np.frombuffer(view, dtype="<u4")
        count = len(words)
        pad = -count % _ROW_WORDS
        first = _SLICE_WORDS - pad
        if count <= first:  # up to 512 KiB: the usual record payload
            return cls(count, *_slice_sum(words, pad))
        state = Fletcher4(*_slice_sum(words[:first], pad))
        for start in range(first, count, _SLICE_WORDS):
            part = words[start : start + _SLICE_WORDS]
            state = state.extend(BlockSum(len(part), *_slice_sum(part, 0)))
        return cls(count, *state.words())


def _slice_sum(words: np.ndarray, pad: int) -> tuple[int, int, int, int]:
    """Fletcher-4 from zero of at most one slice of words, which `pad` zeros make whole rows."""
    import numpy as np

    word_weights, row_weights = _weights()
    rows = (pad + len(words)) // _ROW_WORDS
    if pad:
        flat = np.empty(rows * _ROW_WORDS)
        flat[:pad] = 0.0
        flat[pad:] = words
        matrix = flat.reshape(rows, _ROW_WORDS)
    else:
        matrix = words.reshape(rows, _ROW_WORDS).astype(np.float64)
    sums = (matrix @ word_weights).astype(np.uint64)
    # g[i][j]: the row sums i (A, B, C, D) times the row weights j (1, n, T2(n), T3(n)), modulo 2**64.
    g = np.dot(sums.T, row_weights[_SLICE_ROWS - rows :]).tolist()
    return (
        g[0][0],
        (g[1][0] + g[0][1]) & MASK64,
        (g[2][0] + g[1][1] + g[0][2]) & MASK64,
        (g[3][0] + g[2][1] + g[1][2] + g[0][3]) & MASK64,
    )


def fletcher4_reference(data: bytes) -> Fletcher4:
    """Word-by-word fletcher-4, as written in the ZFS sources; slow, for tests only."""
    a = b = c = d = 0
    for i in range(0, len(data) - len(data) % 4, 4):
        a = (a + int.from_bytes(data[i : i + 4], "little")) & MASK64
        b = (b + a) & MASK64
        c = (c + b) & MASK64
        d = (d + c) & MASK64
    return Fletcher4(a, b, c, d)
