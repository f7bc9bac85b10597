"""Handing records to a pipe by reference (vmsplice): the memory they are read into, and when it may be reused."""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import stat
import struct
import termios
import time
from collections.abc import Callable
from typing import Protocol

from snapferry.core.streamio import Sink, SpliceableSink, write_all

vmsplice_all: Callable[[int, memoryview], None] | None
try:
    from snapferry.core._splicec import vmsplice_all
except ImportError:  # no compiler at install time: every record is copied into the pipe instead
    vmsplice_all = None

# Two halves of 2 MiB: a record (header and payload, 128 KiB on most pools) fits in one, and a half is
# reused only once the pipe's reader has taken everything handed over from it. A pipe holds 1 MiB, so in
# practice that has long happened; the check is for a reader that enlarged its pipe. A larger record is
# copied into the pipe instead.
RING_BYTES = 4 << 20
# How long to wait between two looks at a pipe whose reader has not yet taken a half's bytes.
_WAIT_S = 0.0005


def unread_bytes(fd: int) -> int:
    """Bytes in the pipe fd (either end) that its reader has not taken yet (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


class SplicedPipe(Protocol):
    """Where the ring's bytes go: a pipe, and how much of what went in its reader has not taken yet."""

    fd: int

    def unread(self) -> int:
        """0 once the pipe is closed or its reader is gone: nothing more will be read from it."""
        ...


class SpliceRing:
    """Memory that records are read into and then handed to one pipe at a time by reference.

    A pipe given pages by vmsplice reads them when its reader gets there, so a byte handed over may not be
    written again before the reader has taken it: region() waits for that before it gives out a half again,
    and splice() before it hands bytes to another pipe than the last one.
    """

    def __init__(self, size: int = RING_BYTES) -> None:
        self._memory = mmap.mmap(-1, size)
        self._view = memoryview(self._memory)
        self._half = size // 2
        self._next = 0
        self._pipe: SplicedPipe | None = None
        self._handed = 0  # bytes handed to self._pipe so far
        self._last_handed = [0, 0]  # per half: self._handed just after its last byte went to the pipe

    def region(self, size: int) -> int | None:
        """Where `size` bytes start (see view()) that are free to be written and then spliced; None if that
        is more than a half."""
        if size > self._half:
            return None
        start = self._next % len(self._view)
        if start % self._half + size > self._half:
            start = (start // self._half + 1) * self._half % len(self._view)
        if start % self._half == 0:
            self._reclaim(start // self._half)
        self._next = start + size
        return start

    def view(self, start: int, size: int) -> memoryview:
        return self._view[start : start + size]

    def _reclaim(self, half: int) -> None:
        """Wait until the pipe's reader has taken every byte handed over from this half."""
        pipe, wanted = self._pipe, self._last_handed[half]
        while pipe is not None and wanted and self._handed - pipe.unread() < wanted:
            time.sleep(_WAIT_S)
        self._last_handed[half] = 0

    def splice(self, pipe: SplicedPipe, start: int, size: int) -> None:
        """Hand bytes of a region to the pipe: by reference where vmsplice is built, else as a copy."""
        if pipe is not self._pipe:
            self._reclaim(0)
            self._reclaim(1)
            self._pipe, self._handed = pipe, 0
        region = self._view[start : start + size]
        if vmsplice_all is None:
            write_all(pipe.fd, [region])
            return
        vmsplice_all(pipe.fd, region)
        self._handed += size
        self._last_handed[start // self._half] = self._handed


class OutputPipe:
    """This process's own output, a pipe to a reader we did not start (`wc`, ssh, a receiving snapferry)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._gone = select.poll()
        self._gone.register(fd, select.POLLERR)

    def unread(self) -> int:
        # A pipe whose every reader has closed it reports POLLERR: what is left in it will never be read.
        if self._gone.poll(0):
            return 0
        return unread_bytes(self.fd)


def splice_output(sink: Sink) -> tuple[SpliceRing | None, Callable[[int, int], None] | None]:
    """A ring for a reader and the `splice(start, size)` a writer hands its records to `sink` with, by reference; both
    None unless the sink passes bytes on unchanged into a pipe and vmsplice is built (then every record is copied)."""
    fd = sink.splice_fd() if vmsplice_all is not None and isinstance(sink, SpliceableSink) else None
    if fd is None or not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return None, None
    ring, pipe = SpliceRing(), OutputPipe(fd)
    return ring, lambda start, size: ring.splice(pipe, start, size)
