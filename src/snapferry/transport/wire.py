"""What travels between hosts: optional zstd compression and a bandwidth cap around a stream's bytes."""

from __future__ import annotations

import io
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, cast

import zstandard

from snapferry.core.streamio import Buffer, Readable, write_all
from snapferry.errors import StreamFormatError, StreamTruncated, UsageError
from snapferry.transport.adaptive import ZSTD_MAGIC, AdaptiveCompressor, WriteInto

_COMPRESS = re.compile(r"^(none|zstd|auto)(?::(-?\d+))?$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([KMG]?)i?B?(?:/s)?$", re.I)


@dataclass(frozen=True)
class Compression:
    """What a sender does to the stream's bytes: nothing (`level` None), zstd at `level`, or, `adaptive`, zstd at
    `level` only while the link takes the stream faster that way."""

    level: int | None = None
    adaptive: bool = False


def parse_compression(text: str) -> Compression:
    """`none`, `zstd[:LEVEL]` or `auto[:LEVEL]` (LEVEL 1-19, 3 if not given)."""
    match = _COMPRESS.match(text.strip().lower())
    if not match:
        raise UsageError(f"unknown compression {text!r}: use auto, zstd, zstd:LEVEL (1-19) or none")
    if match[1] == "none":
        return Compression()
    level = int(match[2] or 3)
    if not 1 <= level <= 19:
        raise UsageError(f"zstd level {level} is outside 1-19")
    return Compression(level, adaptive=match[1] == "auto")


def parse_rate(text: str) -> float:
    """Bytes per second from `10M`, `500K`, `1.5G` (binary units) or a plain number."""
    match = _RATE.match(text.strip())
    if not match:
        raise UsageError(f"not a rate: {text!r} (examples: 10M, 500K)")
    return float(match[1]) * (1 << (10 * " KMG".index(match[2].upper() or " ")))


class WireSink:
    """A Sink onto a file descriptor: compress, hold up to `buffer` bytes in memory, cap the rate.

    close() flushes everything and reports a failure of the writing thread.
    """

    def __init__(self, fd: int, *, compression: Compression = Compression(), rate: float | None = None, buffer: int = 0) -> None:
        self._fd = fd
        self._rate = rate
        self._started = time.monotonic()
        self._sent = 0
        self._smoother = _Smoother(self._output, buffer) if buffer else None
        self._compressor = None
        self.adaptive: AdaptiveCompressor | None = None
        if compression.level is not None and compression.adaptive:
            self.adaptive = AdaptiveCompressor(self._raw, compression.level)
        elif compression.level is not None:
            target = cast(IO[bytes], WriteInto(self._raw))
            self._compressor = zstandard.ZstdCompressor(level=compression.level).stream_writer(target, write_size=1 << 20, closefd=False)

    def __call__(self, parts: Sequence[Buffer]) -> None:
        if self.adaptive is not None:
            self.adaptive(parts)
        elif self._compressor is None:
            self._raw(parts)
        else:
            for part in parts:
                self._compressor.write(part)

    def splice_fd(self) -> int | None:
        """The descriptor bytes may be spliced to: only where nothing is done to them on the way."""
        plain = self.adaptive is None and self._compressor is None and self._smoother is None and not self._rate
        return self._fd if plain else None

    def _raw(self, parts: Sequence[Buffer]) -> None:
        if self._smoother is None:
            self._output(parts)
        else:
            self._smoother.put(parts)

    def _output(self, parts: Sequence[Buffer]) -> None:
        write_all(self._fd, parts)
        if self._rate:
            self._sent += sum(len(p) for p in parts)
            # Sleep until the bytes sent so far fit the rate: smooth enough at 1 MiB pipe granularity.
            ahead = self._sent / self._rate - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        if self.adaptive is not None:
            self.adaptive.close()
        if self._compressor is not None:
            self._compressor.flush(zstandard.FLUSH_FRAME)
        if self._smoother is not None:
            self._smoother.close()


class _Smoother:
    """Up to `limit` bytes held between the stream and a bursty link, like mbuffer; written by a thread."""

    def __init__(self, write: Callable[[Sequence[Buffer]], None], limit: int) -> None:
        self._write = write
        self._limit = limit
        self._held = 0
        self._chunks: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def put(self, parts: Sequence[Buffer]) -> None:
        data = b"".join(parts)  # a copy: the caller reuses its record buffers
        with self._cond:
            while self._held and self._held + len(data) > self._limit and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._chunks.append(data)
            self._held += len(data)
            self._cond.notify_all()

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._closed:
                    self._cond.wait()
                if not self._chunks:
                    return
                data = self._chunks.popleft()
            try:
                self._write([data])
            except BaseException as exc:  # handed to the producing thread, which re-raises it
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._held -= len(data)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error


_SKIPPABLE_MAGICS = range(0x184D2A50, 0x184D2A60)


class _Frames:
    """Follows zstd's frame and block headers through the compressed bytes: is the input between frames?

    The decompressor hands out the whole blocks it got and then reports a plain end of input, so an
    input cut inside a frame would otherwise read as a stream that ended cleanly (or was empty).
    """

    def __init__(self) -> None:
        self._state = "magic"
        self._want = 4
        self._head = bytearray()
        self._skip = 0
        self._checksum = False

    @property
    def between_frames(self) -> bool:
        return self._state == "magic" and not self._head and not self._skip

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data) and self._state != "foreign":
            if self._skip:
                n = min(self._skip, len(data) - pos)
                self._skip -= n
            else:
                n = min(self._want - len(self._head), len(data) - pos)
                self._head += data[pos : pos + n]
                if len(self._head) == self._want:
                    self._advance(int.from_bytes(self._head, "little"))
                    self._head.clear()
            pos += n

    def _advance(self, value: int) -> None:
        if self._state == "magic":
            if value == int.from_bytes(ZSTD_MAGIC, "little"):
                self._state, self._want = "descriptor", 1
            elif value in _SKIPPABLE_MAGICS:
                self._state, self._want = "size", 4
            else:  # not a frame: left to the decompressor, which refuses it
                self._state = "foreign"
        elif self._state == "descriptor":
            single = value >> 5 & 1
            self._checksum = bool(value & 4)
            self._skip = (1 - single) + (0, 1, 2, 4)[value & 3] + (single, 2, 4, 8)[value >> 6]
            self._state, self._want = "block", 3
        elif self._state == "block":
            last, kind, size = value & 1, value >> 1 & 3, value >> 3
            self._skip = 1 if kind == 1 else size  # an RLE block stores one byte
            if last:
                self._skip += 4 * self._checksum
                self._state, self._want = "magic", 4
        else:  # the size of a skippable frame
            self._skip = value
            self._state, self._want = "magic", 4


class _Tee:
    """The compressed bytes on their way to the decompressor, shown to a _Frames.

    Apart from _Decompressing: the decompressor's reader is invisible to the garbage collector, so a
    reference back to its owner would keep both, and the decompression buffers, alive for good.
    """

    def __init__(self, source: io.BufferedReader[io.FileIO], frames: _Frames) -> None:
        self._source = source
        self._frames = frames

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._frames.feed(data)
        return data


class _Decompressing:
    """A Readable over zstd frames; a damaged frame is a stream error and a cut-short one an interruption, not a crash."""

    def __init__(self, source: io.BufferedReader[io.FileIO]) -> None:
        self._frames = _Frames()
        self._produced = 0
        tee = cast(IO[bytes], _Tee(source, self._frames))
        self._reader = zstandard.ZstdDecompressor().stream_reader(tee, read_size=1 << 20, read_across_frames=True)

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            n = int(self._reader.readinto(buffer))
        except zstandard.ZstdError as exc:
            raise StreamFormatError(f"corrupt zstd-compressed stream: {exc}") from None
        if n == 0 and len(buffer) and not self._frames.between_frames:
            raise StreamTruncated(f"input ended inside a zstd frame, at stream byte {self._produced}: cut short in transit")
        self._produced += n
        return n


def open_wire(source: io.BufferedReader[io.FileIO]) -> Readable:
    """The stream to parse: `source` itself, or its decompression when it starts with zstd's magic."""
    if source.peek(4)[:4] == ZSTD_MAGIC:
        return _Decompressing(source)
    return source


class LazyWire:
    """open_wire on the first read: nothing waits for input before its reader needs it (a receive takes its
    destination's lock first, so that a second receive is refused at once, not once data arrives)."""

    def __init__(self, source: io.BufferedReader[io.FileIO]) -> None:
        self._source = source
        self._stream: Readable | None = None

    def readinto(self, buffer: memoryview, /) -> int | None:
        if self._stream is None:
            self._stream = open_wire(self._source)
        return self._stream.readinto(buffer)
