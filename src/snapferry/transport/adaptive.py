"""`--compress auto`: zstd only while it pays, as zstd frames that are either compressed or hold stored (raw) blocks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import IO, cast

import zstandard

from snapferry.core.streamio import Buffer

ZSTD_MAGIC = bytes.fromhex("28b52ffd")
# How much input each measurement covers; after so many windows one way, the other gets one window again, since
# the link's speed and the data's compressibility both change along a stream.
WINDOW = 16 << 20
RECHECK_EVERY = 32
# zstd costs CPU on both ends, CPU that the rest of the pipeline (zfs send and receive, ssh) wants too on a busy
# host, which this sink's own timing does not see: zstd is chosen only when it gets the stream across twice as fast.
MARGIN = 2.0
# How much of a stored window's input is kept to estimate what zstd would make of it (compressed off the wire when
# deciding), so that incompressible data never goes through zstd just to find out.
SAMPLE = 256 << 10
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
    """A Sink that keeps to whichever way, zstd or stored, gets the stream onto the link faster. What it writes is
    plain zstd either way, so any receiver that reads zstd reads it. `bytes_in` counts the input sent each way.

    Each window of input measures the time spent in this sink alone (what the producer takes is the same both
    ways), split into waiting for the link and compressing:
    - a stored window measures the link: its bytes over its time; and what zstd would do with its data, from a
      sample compressed aside (the stream starts stored: incompressible data is then never compressed at all);
    - a zstd window measures the compressor (its speed and ratio), and the link too when the link was the
      bottleneck (waiting took most of the window: the link was busy all of it).
    So a slow link with compressible data never needs a stored window to stay compressed. zstd goes on while
    min(compressor, link / ratio) beats the link by MARGIN; every RECHECK_EVERY windows zstd measures the link
    again with a stored window where it could not see it, and stored takes a new sample.

    That model does not see the CPU zstd takes from the rest of the pipeline (zfs send, ssh, the far end's
    decompression on the same host): on a busy host a stream can cross more slowly compressed than stored even
    where the model favours zstd (text over ssh on loopback, 2 cores: 0.58 of the raw pipe against 0.70). So
    each window also measures its wall time, producer included, and zstd gives way when its last window moved
    input more slowly than the last stored one did."""

    def __init__(self, write: Write, level: int) -> None:
        self._write = write
        into = cast(IO[bytes], WriteInto(self._timed_write))
        # Output goes out every 128 KiB: a window must see the link wait even when its data compresses 100 to 1.
        self._compressor = zstandard.ZstdCompressor(level=level).stream_writer(into, write_size=128 << 10, closefd=False)
        self._sampler = zstandard.ZstdCompressor(level=level)
        self._sample = bytearray()
        self._way = "stored"
        self._stored_frame_open = False
        self._link: float | None = None  # bytes a second the link takes
        self._compressor_speed = 0.0  # input bytes a second of compressing alone
        self._ratio = 1.0  # compressed size over input size
        self._window_in = self._window_out = 0
        self._window_seconds = self._window_waiting = 0.0
        self._windows_this_way = 0
        self._windows = 0
        self._window_started: float | None = None
        self._wall_rate: dict[str, float] = {}  # input bytes a second of each way's last window, producer included
        self.bytes_in = {"zstd": 0, "stored": 0}

    def __call__(self, parts: Sequence[Buffer]) -> None:
        started = time.perf_counter()
        if self._window_started is None:
            self._window_started = started
        if self._way == "zstd":
            for part in parts:
                self._compressor.write(part)
        else:
            self._store(parts)
            if self._sampling():
                for part in parts:
                    if len(self._sample) >= SAMPLE:
                        break
                    self._sample += memoryview(part)[: SAMPLE - len(self._sample)]
        self._window_seconds += time.perf_counter() - started
        size = sum(len(part) for part in parts)
        self._window_in += size
        self.bytes_in[self._way] += size
        if self._window_in >= WINDOW:
            self._next_window()

    def _timed_write(self, parts: Sequence[Buffer]) -> None:
        started = time.perf_counter()
        self._write(parts)
        self._window_waiting += time.perf_counter() - started
        self._window_out += sum(len(part) for part in parts)

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
        self._timed_write(out)

    def _next_window(self) -> None:
        seconds = max(self._window_seconds, 1e-9)
        sampled = self._sampling()
        # The first window also waits for the far end to start reading (an ssh login, a process starting: 0.3 s on
        # loopback, which made a 500 MB/s link look like 15 MB/s): it measures nothing.
        first, self._windows = self._windows == 0, self._windows + 1
        # The link was the bottleneck, so busy all the window, when waiting for it took most of the window.
        link_measured = not first and (self._way == "stored" or self._window_waiting > seconds / 2)
        if link_measured:
            self._link = self._window_out / seconds
        if self._way == "zstd":
            self._compressor_speed = self._window_in / max(seconds - self._window_waiting, 1e-9)
            self._ratio = max(self._window_out, 1) / self._window_in
        elif sampled:
            self._estimate_from_sample()
        self._sample.clear()
        if self._window_started is not None and not first:
            self._wall_rate[self._way] = self._window_in / max(time.perf_counter() - self._window_started, 1e-9)
        self._window_in = self._window_out = 0
        self._window_seconds = self._window_waiting = 0.0
        self._window_started = None
        self._windows_this_way += 1
        if self._link is None:
            self._switch("stored")  # the compressor kept ahead of the link, or this was the first window: how fast is the link?
        elif self._windows_this_way >= RECHECK_EVERY and self._way == "zstd" and not link_measured:
            self._switch("stored")
        else:
            if self._windows_this_way >= RECHECK_EVERY:
                self._windows_this_way = 0  # rechecked without a change of way: zstd saw the link, stored took a sample
            zstd = min(self._compressor_speed, self._link / self._ratio)
            self._switch("zstd" if zstd > MARGIN * self._link and not self._slower_on_the_wall() else "stored")

    def _sampling(self) -> bool:
        """Whether this window is stored and ends in an estimate from its sample: the first, and each recheck."""
        return self._way == "stored" and (self._windows == 0 or self._windows_this_way + 1 >= RECHECK_EVERY)

    def _estimate_from_sample(self) -> None:
        """The compressor's speed and ratio on this window's sample, compressed aside."""
        if not self._sample:
            return
        started = time.perf_counter()
        compressed = len(self._sampler.compress(self._sample))
        self._compressor_speed = len(self._sample) / max(time.perf_counter() - started, 1e-9)
        self._ratio = max(compressed, 1) / len(self._sample)

    def _slower_on_the_wall(self) -> bool:
        """Whether zstd's last window moved input more slowly than the last stored one did."""
        rate = self._wall_rate
        return "zstd" in rate and "stored" in rate and rate["zstd"] < rate["stored"]

    def _switch(self, way: str) -> None:
        if way != self._way:
            self._end_frame()
            self._way = way
            self._windows_this_way = 0

    def _end_frame(self) -> None:
        if self._way == "zstd":
            self._compressor.flush(zstandard.FLUSH_FRAME)
        elif self._stored_frame_open:
            self._timed_write([LAST_EMPTY_BLOCK])
            self._stored_frame_open = False

    def close(self) -> None:
        self._end_frame()
