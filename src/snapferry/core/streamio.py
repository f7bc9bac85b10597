"""Stream I/O shared by every filesystem: what a stream is read from and written to, and exact reads and writes."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol

Buffer = bytes | bytearray | memoryview
# Where a stream's bytes go, in pieces that are written in order (a pipe, the wire, a receive process).
Sink = Callable[[Sequence[Buffer]], None]


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Prefixed:
    """A Readable that gives `head` (bytes already read from `rest`) before the rest of `rest`."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def readinto(self, buffer: memoryview, /) -> int | None:
        if not self._head:
            # From now on the source's own method answers, without this call in between (readers look it up per read).
            self.readinto = self._rest.readinto  # type: ignore[method-assign]
            return self._rest.readinto(buffer)
        n = min(len(buffer), len(self._head))
        buffer[:n] = self._head[:n]
        self._head = self._head[n:]
        return n


def read_exact(source: Readable, view: memoryview) -> int:
    """Fill `view` from `source` unless the input ends first; the number of bytes read."""
    got = 0
    while got < len(view):
        n = source.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def write_all(fd: int, parts: Sequence[Buffer]) -> None:
    """writev until every byte is out (a pipe may take less than asked)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
