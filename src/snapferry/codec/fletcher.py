"""Fletcher-4 as ZFS computes it for send streams: running, native order, vectorised with numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1
# Blocks are summed in slices of this many 32-bit words so that the weights fit comfortably in
# uint64 and the temporary arrays stay small (4 MiB of input per slice).
_SLICE_WORDS = 1 << 20


def _weights(count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-word weights of b, c and d for a block of `count` words, first word first."""
    k = np.arange(count, 0, -1, dtype=np.uint64)
    return k, k * (k + 1) // 2, k * (k + 1) * (k + 2) // 6


_W1, _W2, _W3 = _weights(_SLICE_WORDS)


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
        return b"".join(w.to_bytes(8, "little") for w in self.words())

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview) -> Fletcher4:
        raw = bytes(raw)
        if len(raw) != 32:
            raise ValueError("a fletcher-4 value is 32 bytes")
        return cls(*(int.from_bytes(raw[i : i + 8], "little") for i in range(0, 32, 8)))

    def is_zero(self) -> bool:
        return not (self.a or self.b or self.c or self.d)

    def extend(self, block: BlockSum) -> Fletcher4:
        """The state after feeding, from this state, the words that `block` summed from zero."""
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
        return self.extend(BlockSum.of(data))

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
    def of(cls, data: bytes | bytearray | memoryview) -> BlockSum:
        view = memoryview(data).cast("B")
        if len(view) % 4:
            raise ValueError(f"fletcher-4 needs whole 32-bit words, got {len(view)} bytes")
        words = np.frombuffer(view, dtype="<u4")
        state = Fletcher4()
        for start in range(0, len(words), _SLICE_WORDS):
            state = state.extend(_slice_sum(words[start : start + _SLICE_WORDS]))
        return cls(len(words), *state.words())


def _slice_sum(words: np.ndarray) -> BlockSum:
    n = len(words)
    if n == 0:
        return BlockSum(0, 0, 0, 0, 0)
    w = words.astype(np.uint64)
    tail = _SLICE_WORDS - n
    # uint64 arithmetic in numpy wraps modulo 2**64, exactly like the C implementation.
    return BlockSum(
        n,
        int(w.sum(dtype=np.uint64)),
        int(np.dot(w, _W1[tail:])),
        int(np.dot(w, _W2[tail:])),
        int(np.dot(w, _W3[tail:])),
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
