"""read_ahead: the same items in the same order, an error at its place, bounded memory, a thread that stops."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapferry.core.readahead import read_ahead


class Boom(Exception):
    pass


def _items(sizes: list[int], fail_at: int | None) -> Iterator[bytes]:
    for index, size in enumerate(sizes):
        if index == fail_at:
            raise Boom(f"at {index}")
        yield bytes(size)


@settings(max_examples=200, deadline=2000)
@given(st.lists(st.integers(0, 3000), max_size=300), st.none() | st.integers(0, 300), st.integers(1, 5000), st.integers(1, 20))
def test_same_items_in_order_and_the_error_in_its_place(sizes: list[int], fail_at: int | None, chunk_bytes: int, chunk_items: int) -> None:
    got: list[bytes] = []
    fails = fail_at is not None and fail_at < len(sizes)
    stream = read_ahead(_items(sizes, fail_at), len, chunk_bytes=chunk_bytes, chunk_items=chunk_items, depth=2)
    if fails:
        with pytest.raises(Boom, match=f"at {fail_at}"):
            for item in stream:
                got.append(item)
        assert [len(b) for b in got] == sizes[:fail_at]
    else:
        assert [len(b) for b in stream] == sizes


def test_at_most_depth_chunks_ahead() -> None:
    produced = 0

    def counting() -> Iterator[int]:
        nonlocal produced
        while True:
            produced += 1
            yield produced

    stream = read_ahead(counting(), lambda _: 1, chunk_items=10, depth=3)
    assert next(stream) == 1
    time.sleep(0.3)
    # One chunk taken by the consumer, three queued, one being filled (blocked on the full queue).
    assert produced <= 10 * 5 + 1
    stream.close()


def test_a_consumer_that_stops_early_stops_the_thread() -> None:
    def endless() -> Iterator[int]:
        n = 0
        while True:
            n += 1
            yield n

    def readers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "read-ahead"]

    stream = read_ahead(endless(), lambda _: 1, chunk_items=4, depth=2)
    assert [next(stream) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert readers()
    stream.close()
    for _ in range(50):
        if not readers():
            break
        time.sleep(0.1)
    assert not readers()
