"""Stream I/O shared by every filesystem: what a stream is read from and written to, and exact reads and writes."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

Buffer = bytes | bytearray | memoryview
# Where a stream's bytes go, in pieces that are written in order (a pipe, the wire, a receive process).
Sink = Callable[[Sequence[Buffer]], None]


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


@runtime_checkable
class SpliceableSink(Protocol):
    """A Sink that can also take bytes straight from a pipe, where it passes them on unchanged."""

    def __call__(self, parts: Sequence[Buffer], /) -> None: ...

    def splice_fd(self) -> int | None:
        """Where such bytes may be spliced to (os.splice), or None if this sink transforms them."""
        ...


def pass_on(source: io.BufferedReader, sink: Sink, chunk: int, progress: Callable[[int], None]) -> int:
    """Everything left in `source` to `sink` unchanged; the bytes passed. Spliced in the kernel where both ends let
    that happen (a pipe in, a sink that transforms nothing): no copy through this process, and far fewer cycles
    per small write of the producer (btrfs send writes a command at a time)."""
    sent, fd = 0, source.fileno()
    target = sink.splice_fd() if isinstance(sink, SpliceableSink) else None
    # What the reader holds already goes first; after it, its buffer is empty and the pipe can be spliced from.
    while part := source.read1(chunk):
        sink([part])
        sent += len(part)
        progress(sent)
        if target is None:
            continue
        try:
            while n := os.splice(fd, target, chunk):
                sent += n
                progress(sent)
            return sent
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: an end that cannot splice (a terminal, say): copy instead
                raise
            target = None
    return sent


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
