"""What travels between hosts: optional zstd compression and a bandwidth cap around a stream's bytes."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Sequence
from typing import IO, cast

import zstandard

from snapferry.codec.zfs_stream import Readable
from snapferry.engine.pipes import Buffer, write_all
from snapferry.errors import StreamFormatError, UsageError

ZSTD_MAGIC = bytes.fromhex("28b52ffd")
_COMPRESS = re.compile(r"^(none|zstd)(?::(-?\d+))?$")
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([KMG]?)i?B?(?:/s)?$", re.I)


def parse_compression(text: str) -> int | None:
    """`zstd[:LEVEL]` gives a zstd level, `none` gives None."""
    match = _COMPRESS.match(text.strip().lower())
    if not match:
        raise UsageError(f"unknown compression {text!r}: use zstd, zstd:LEVEL (1-19) or none")
    if match[1] == "none":
        return None
    level = int(match[2] or 3)
    if not 1 <= level <= 19:
        raise UsageError(f"zstd level {level} is outside 1-19")
    return level


def parse_rate(text: str) -> float:
    """Bytes per second from `10M`, `500K`, `1.5G` (binary units) or a plain number."""
    match = _RATE.match(text.strip())
    if not match:
        raise UsageError(f"not a rate: {text!r} (examples: 10M, 500K)")
    return float(match[1]) * (1 << (10 * " KMG".index(match[2].upper() or " ")))


class WireSink:
    """A Sink onto a file descriptor, compressing and rate-limiting on the way; close() ends it."""

    def __init__(self, fd: int, *, zstd_level: int | None = None, rate: float | None = None) -> None:
        self._fd = fd
        self._rate = rate
        self._started = time.monotonic()
        self._sent = 0
        self._compressor = None
        if zstd_level is not None:
            target = cast(IO[bytes], _RawFd(self._write_raw))
            self._compressor = zstandard.ZstdCompressor(level=zstd_level).stream_writer(target, write_size=1 << 20, closefd=False)

    def __call__(self, parts: Sequence[Buffer]) -> None:
        if self._compressor is None:
            self._write_raw_parts(parts)
        else:
            for part in parts:
                self._compressor.write(part)

    def _write_raw(self, data: Buffer) -> None:
        self._write_raw_parts([data])

    def _write_raw_parts(self, parts: Sequence[Buffer]) -> None:
        write_all(self._fd, parts)
        if self._rate:
            self._sent += sum(len(p) for p in parts)
            # Sleep until the bytes sent so far fit the rate: smooth enough at 1 MiB pipe granularity.
            ahead = self._sent / self._rate - (time.monotonic() - self._started)
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        if self._compressor is not None:
            self._compressor.flush(zstandard.FLUSH_FRAME)


class _RawFd(io.RawIOBase):
    """The file-like object zstandard writes compressed bytes into."""

    def __init__(self, write: Callable[[Buffer], None]) -> None:
        self._write = write

    def writable(self) -> bool:
        return True

    def write(self, data: Buffer) -> int:  # type: ignore[override]
        self._write(data)
        return len(data)


class _Decompressing:
    """A Readable over zstd frames; a damaged frame is a stream error, not a crash."""

    def __init__(self, source: io.BufferedReader[io.FileIO]) -> None:
        self._reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=1 << 20, read_across_frames=True)

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            return int(self._reader.readinto(buffer))
        except zstandard.ZstdError as exc:
            raise StreamFormatError(f"corrupt zstd-compressed stream: {exc}") from None


def open_wire(source: io.BufferedReader[io.FileIO]) -> Readable:
    """The stream to parse: `source` itself, or its decompression when it starts with zstd's magic."""
    if source.peek(4)[:4] == ZSTD_MAGIC:
        return _Decompressing(source)
    return source
