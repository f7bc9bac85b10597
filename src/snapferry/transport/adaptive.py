"""`--compress auto`: zstd only while it pays, as zstd frames that are either compressed or hold stored (raw) blocks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import IO, cast

import zstandard

from snapferry.core.streamio import Buffer

ZSTD_MAGIC = bytes.fromhex("28b52ffd")
# How much input each measurement covers; every so many windows the other way gets one window again, since the
# link's speed and the data's compressibility both change along a stream.
WINDOW = 16 << 20
RECHECK_EVERY = 32
# zstd costs CPU on both ends: it is chosen only when the link takes the stream clearly faster that way.
MARGIN = 1.1
# A stored block's largest size (zstd's Block_Maximum_Size for a 128 KiB window).
STORED_BLOCK = 128 << 10
# A frame header with no content size, no checksum and no dictionary, whose window is 128 KiB (2^(10+7)).
STORED_FRAME_HEADER = ZSTD_MAGIC + bytes([0x00, 7 << 3])
# The header of an empty, raw, last block: what ends a frame of stored blocks.
LAST_EMPTY_BLOCK = b"\x01\x00\x00"

Write = Callable[[Sequence[Buffer]], None]


def stored_block_header(size: int, *, last: bool = False) -> bytes:
    """A raw block's 3-byte header: its size, block type 0 (raw) and the last-block bit (RFC 8878, 3.1.1.2)."""
    return (size << 3 | int(last)).to_bytes(3, "little")


class WriteInto:
    """The file-like object zstandard writes its compressed bytes into."""

    def __init__(self, write: Write) -> None:
        self._write = write

    def write(self, data: Buffer) -> int:
        self._write([data])
        return len(data)

    def flush(self) -> None:
        """zstandard calls it when a frame ends; the bytes were handed on already."""


class AdaptiveCompressor:
    """A Sink that measures how fast each way (zstd, or stored) gets a window of input onto the link, and keeps the
    faster. What it writes is plain zstd, so any receiver that reads zstd reads it. `bytes_in` counts the input sent
    each way."""

    def __init__(self, write: Write, level: int) -> None:
        self._write = write
        into = cast(IO[bytes], WriteInto(write))
        self._compressor = zstandard.ZstdCompressor(level=level).stream_writer(into, write_size=1 << 20, closefd=False)
        self._way = "zstd"
        self._stored_frame_open = False
        self._rates: dict[str, float] = {}
        self._window_bytes = 0
        self._window_seconds = 0.0
        self._windows = 0
        self.bytes_in = {"zstd": 0, "stored": 0}

    def __call__(self, parts: Sequence[Buffer]) -> None:
        started = time.perf_counter()
        if self._way == "zstd":
            for part in parts:
                self._compressor.write(part)
        else:
            self._store(parts)
        self._window_seconds += time.perf_counter() - started
        size = sum(len(part) for part in parts)
        self._window_bytes += size
        self.bytes_in[self._way] += size
        if self._window_bytes >= WINDOW:
            self._next_window()

    def _store(self, parts: Sequence[Buffer]) -> None:
        """Each part as raw blocks, headers and the caller's own bytes side by side: nothing is copied."""
        out: list[Buffer] = []
        if not self._stored_frame_open:
            out.append(STORED_FRAME_HEADER)
            self._stored_frame_open = True
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), STORED_BLOCK):
                block = view[start : start + STORED_BLOCK]
                out += (stored_block_header(len(block)), block)
        self._write(out)

    def _next_window(self) -> None:
        self._rates[self._way] = self._window_bytes / max(self._window_seconds, 1e-9)
        self._window_bytes, self._window_seconds = 0, 0.0
        self._windows += 1
        other = "stored" if self._way == "zstd" else "zstd"
        if other not in self._rates or self._windows % RECHECK_EVERY == 0:
            self._switch(other)
        else:
            self._switch("zstd" if self._rates["zstd"] > MARGIN * self._rates["stored"] else "stored")

    def _switch(self, way: str) -> None:
        if way != self._way:
            self._end_frame()
            self._way = way

    def _end_frame(self) -> None:
        if self._way == "zstd":
            self._compressor.flush(zstandard.FLUSH_FRAME)
        elif self._stored_frame_open:
            self._write([LAST_EMPTY_BLOCK])
            self._stored_frame_open = False

    def close(self) -> None:
        self._end_frame()
