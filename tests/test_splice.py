"""SpliceRing: bytes handed to a real pipe by reference reach its reader unchanged, however far behind it reads."""

from __future__ import annotations

import fcntl
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapferry.core import splice
from snapferry.core.splice import OutputPipe, SpliceRing, splice_output, unread_bytes
from snapferry.transport.wire import WireSink


class Pipe:
    """The write end of a real pipe, as a SplicedPipe, and everything its reader thread took."""

    def __init__(self, size: int, delay_s: float) -> None:
        self._read_end, self.fd = os.pipe()
        fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, size)
        self.received = bytearray()
        self._delay_s = delay_s
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _read(self) -> None:
        time.sleep(self._delay_s)  # a reader that lags: the ring must not reuse what it has not taken
        while chunk := os.read(self._read_end, 1 << 16):
            self.received += chunk
        os.close(self._read_end)

    def unread(self) -> int:
        return unread_bytes(self.fd)

    def close(self) -> bytes:
        os.close(self.fd)
        self._reader.join()
        return bytes(self.received)


@contextmanager
def pipe(size: int = 1 << 20, delay_s: float = 0.0) -> Iterator[Pipe]:
    p = Pipe(size, delay_s)
    try:
        yield p
    finally:
        if p._reader.is_alive():
            p.close()


def hand_over(ring: SpliceRing, target: Pipe, records: list[bytes]) -> None:
    for record in records:
        start = ring.region(len(record))
        assert start is not None
        ring.view(start, len(record))[:] = record
        ring.splice(target, start, len(record))


def records_of(sizes: list[int], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for size in sizes]


@pytest.mark.parametrize("zero_copy", [True, False], ids=["vmsplice", "copy"])
def test_a_lagging_reader_gets_every_byte_unchanged(zero_copy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipe holds 1 MiB, 16 times the ring: without the wait for the reader, the ring would overwrite pages the
    pipe still refers to, and the reader would get later records' bytes in earlier ones' places."""
    if zero_copy and splice.vmsplice_all is None:
        pytest.skip("the vmsplice extension is not built")
    if not zero_copy:
        monkeypatch.setattr(splice, "vmsplice_all", None)
    ring = SpliceRing(64 << 10)
    records = records_of([random.Random(n).randrange(1, 32 << 10) for n in range(120)], seed=1)
    with pipe(1 << 20, delay_s=0.3) as target:
        hand_over(ring, target, records)
        assert target.close() == b"".join(records)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=16 << 10), max_size=60), seed=st.integers(0, 1 << 16))
def test_records_of_any_size_arrive_in_order(sizes: list[int], seed: int) -> None:
    records = records_of(sizes, seed)
    ring = SpliceRing(32 << 10)
    with pipe(64 << 10) as target:
        hand_over(ring, target, records)
        assert target.close() == b"".join(records)


def test_a_record_larger_than_half_the_ring_gets_no_region() -> None:
    ring = SpliceRing(64 << 10)
    assert ring.region(32 << 10) == 0
    assert ring.region((32 << 10) + 1) is None


def test_a_region_never_straddles_the_two_halves() -> None:
    ring = SpliceRing(64 << 10)
    assert ring.region(20 << 10) == 0
    assert ring.region(20 << 10) == 32 << 10  # 40 KiB would cross into the second half
    assert ring.region(20 << 10) == 0  # and back to the first, once its reader has taken it


def test_a_region_that_ends_the_ring_is_followed_by_one_at_its_start() -> None:
    ring = SpliceRing(64 << 10)
    assert [ring.region(32 << 10) for _ in range(3)] == [0, 32 << 10, 0]
    assert ring.region(1) == 32 << 10


def test_a_new_pipe_waits_for_the_last_ones_reader() -> None:
    """Bytes handed to one pipe are not overwritten for the next before the first pipe's reader has taken them."""
    ring = SpliceRing(64 << 10)
    first, second = records_of([24 << 10] * 4, seed=2), records_of([24 << 10] * 4, seed=3)
    with pipe(1 << 20, delay_s=0.3) as one, pipe(1 << 20) as other:
        hand_over(ring, one, first[:1])
        hand_over(ring, other, second)
        hand_over(ring, one, first[1:])
        assert one.close() == b"".join(first)
        assert other.close() == b"".join(second)


def test_output_into_a_pipe_is_spliced_and_into_a_file_copied(tmp_path: Path) -> None:
    """A sender's stdout: vmsplice needs a pipe at the other end, and bytes the sink passes on unchanged."""
    with open(tmp_path / "stream", "wb") as file:
        assert splice_output(WireSink(file.fileno())) == (None, None)
    if splice.vmsplice_all is None:
        pytest.skip("the vmsplice extension is not built")
    with pipe() as target:
        assert splice_output(WireSink(target.fd, rate=1e9)) == (None, None)  # a rate limit writes it in its own time
        ring, handed = splice_output(WireSink(target.fd))
        assert ring is not None and handed is not None
        records = records_of([1000, 70000, 5], seed=4)
        for record in records:
            start = ring.region(len(record))
            assert start is not None
            ring.view(start, len(record))[:] = record
            handed(start, len(record))
        assert target.close() == b"".join(records)


def test_an_output_pipe_whose_reader_left_has_nothing_unread() -> None:
    """Else a ring would wait forever for a reader that is gone to take what is still in the pipe."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"x" * 1000)
        output = OutputPipe(write_end)
        assert output.unread() == 1000
        os.close(read_end)
        assert output.unread() == 0
    finally:
        os.close(write_end)
