"""Read-ahead: an iterator's items produced on a thread, so that parsing overlaps with the consumer's system calls."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar, cast

T = TypeVar("T")

_END = object()


def read_ahead(
    items: Iterator[T], size: Callable[[T], int], *, chunk_bytes: int = 1 << 20, chunk_items: int = 256, depth: int = 4
) -> Iterator[T]:
    """Yield what `items` yields, in order, while a thread already produces the next items.

    Items travel in chunks of up to chunk_items items or chunk_bytes bytes (by `size`), at most `depth`
    chunks ahead, so memory stays bounded. An exception of `items` is raised here at its place in the
    sequence, after every item before it. When the consumer stops early the thread stops at its next
    hand-over (it may still be blocked reading its input: it is a daemon thread).
    """
    handover: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                handover.put(value, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        chunk: list[T] = []
        held = 0
        try:
            for item in items:
                chunk.append(item)
                held += size(item)
                if len(chunk) >= chunk_items or held >= chunk_bytes:
                    if not put(chunk):
                        return
                    chunk, held = [], 0
            if put(chunk):
                put(_END)
        except BaseException as e:  # handed to the consumer, raised there in order
            if put(chunk):
                put(e)

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            got = handover.get()
            if got is _END:
                return
            if isinstance(got, BaseException):
                raise got
            yield from cast("list[T]", got)
    finally:
        stop.set()
