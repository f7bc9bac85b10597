"""Decoding of btrfs compressed extents (ENCODED_WRITE payloads) to plain bytes, for kernels that cannot take them encoded."""

from __future__ import annotations

import io
import zlib

import zstandard

from snapferry.btrfs.codec.commands import Compression
from snapferry.errors import StreamFormatError


def compression_name(kind: int) -> str:
    return Compression(kind).name if kind in Compression._value2member_map_ else str(kind)


def decode_extent(kind: int, data: bytes | bytearray | memoryview, unencoded_len: int) -> bytes:
    """The extent's unencoded_len plain bytes; never more, however the data inflates.

    zlib and zstd only: btrfs's LZO framing (per-sector segments) has no maintained Python decoder.
    """
    try:
        if kind == Compression.NONE:
            plain = bytes(data[:unencoded_len])
        elif kind == Compression.ZLIB:
            plain = zlib.decompressobj().decompress(bytes(data), unencoded_len)
        elif kind == Compression.ZSTD:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bytes(data))) as reader:
                plain = reader.read(unencoded_len)
        else:
            raise StreamFormatError(f"{compression_name(kind)} data cannot be decompressed by snapferry")
    except (zlib.error, zstandard.ZstdError) as e:
        raise StreamFormatError(f"corrupt {compression_name(kind)} data: {e}") from None
    # btrfs pads an extent's last block with zeros that the compressed data does not hold.
    return plain + bytes(max(0, unencoded_len - len(plain)))
