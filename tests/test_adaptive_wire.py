"""--compress auto: plain zstd on the wire whichever way each window goes, and the way chosen by how fast the link takes it."""

from __future__ import annotations

import io
import random
import tempfile
import time
from collections.abc import Sequence

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from snapferry.core.streamio import Buffer
from snapferry.errors import StreamTruncated, UsageError
from snapferry.transport import adaptive
from snapferry.transport.adaptive import AdaptiveCompressor
from snapferry.transport.wire import Compression, open_wire, parse_compression


def _written(data: bytes, cuts: Sequence[int]) -> tuple[bytes, AdaptiveCompressor]:
    out = bytearray()
    sink = AdaptiveCompressor(lambda parts: out.extend(b"".join(bytes(p) for p in parts)), level=3)
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        sink([data[start:cut]])
        start = cut
    sink.close()
    return bytes(out), sink


def _read_back(wire_bytes: bytes) -> bytes:
    """Through snapferry's own receiving side (open_wire), which also knows a frame cut short."""
    with tempfile.NamedTemporaryFile() as file:
        file.write(wire_bytes)
        file.flush()
        with open(file.name, "rb") as source:
            stream = open_wire(source)
            out = bytearray()
            buffer = memoryview(bytearray(1 << 16))
            while n := stream.readinto(buffer):
                out += buffer[:n]
    return bytes(out)


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=50000), st.lists(st.integers(0, 50000), max_size=6), st.data())
def test_what_it_writes_is_plain_zstd_and_reads_back(data: bytes, cuts: list[int], draw: st.DataObject) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adaptive, "WINDOW", 4096)
        patch.setattr(adaptive, "RECHECK_EVERY", 2)
        patch.setattr(adaptive, "MARGIN", 0.0)  # zstd from the third window, whatever the data: both ways are taken
        wire_bytes, sink = _written(data, [c for c in cuts if c < len(data)])
    assert sink.bytes_in["zstd"] + sink.bytes_in["stored"] == len(data)
    if len(data) > 3 * 4096:
        assert sink.bytes_in["zstd"] and sink.bytes_in["stored"]  # both ways were taken
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(wire_bytes), read_across_frames=True).read() == data
    assert _read_back(wire_bytes) == data
    cut = draw.draw(st.integers(len(adaptive.ZSTD_MAGIC), len(wire_bytes) - 1))  # shorter is no zstd at all
    with pytest.raises(StreamTruncated):
        _read_back(wire_bytes[:cut])


def _link(rate: float) -> tuple[list[int], adaptive.Write]:
    """A link that takes `rate` bytes a second (sleeping for the time the bytes would take), counting what crosses it."""
    crossed = [0]

    def write(parts: Sequence[Buffer]) -> None:
        size = sum(len(p) for p in parts)
        crossed[0] += size
        time.sleep(size / rate)

    return crossed, write


def test_a_slow_link_gets_compressible_data_compressed_and_is_measured_without_leaving_zstd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for the link while compressing measures the link: two windows go stored (the first also waits for the
    far end to start, so it measures nothing; a sample of it says what zstd would do), none after them."""
    monkeypatch.setattr(adaptive, "WINDOW", 1 << 20)
    monkeypatch.setattr(adaptive, "RECHECK_EVERY", 2)
    rng = random.Random(2)
    text = b"".join(b"%d host%d GET /index.html %d\n" % (i, rng.randrange(50), rng.randrange(1000)) for i in range(400000))
    crossed, write = _link(4e6)
    sink = AdaptiveCompressor(write, level=3)
    for start in range(0, len(text), 65536):
        sink([text[start : start + 65536]])
    sink.close()
    assert sink.bytes_in["stored"] <= 2 << 20, sink.bytes_in
    assert crossed[0] < (2 << 20) + (len(text) - (2 << 20)) / 3, (crossed[0], len(text))


def test_a_fast_link_gets_incompressible_data_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adaptive, "WINDOW", 1 << 20)
    noise = random.Random(1).randbytes(24 << 20)
    crossed = [0]
    sink = AdaptiveCompressor(lambda parts: crossed.__setitem__(0, crossed[0] + sum(len(p) for p in parts)), level=3)
    for start in range(0, len(noise), 1 << 20):
        sink([noise[start : start + (1 << 20)]])
    sink.close()
    # Every window, the rechecks included, finds from its sample that zstd would not shrink it: nothing is compressed.
    assert sink.bytes_in == {"zstd": 0, "stored": len(noise)}


def test_zstd_gives_way_where_it_slows_the_rest_of_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A link the model says zstd beats (compressible text, 100 MB/s), on a host where compressing takes the CPU the
    producer needs (here: the producer is slower while zstd runs). The wall time per window sees it: stored wins."""
    monkeypatch.setattr(adaptive, "WINDOW", 1 << 20)
    rng = random.Random(3)
    text = b"".join(b"%d host%d GET /index.html %d\n" % (i, rng.randrange(50), rng.randrange(1000)) for i in range(800000))
    crossed, write = _link(100e6)
    sink = AdaptiveCompressor(write, level=3)
    for start in range(0, len(text), 65536):
        part = text[start : start + 65536]
        compressing = sink._way == "zstd"  # noqa: SLF001 (the test plays the host's other processes)
        sink([part])
        if compressing:
            time.sleep(len(part) / 30e6)  # what zstd took from the producer
    sink.close()
    # The first two windows store (the second measures the link), the third compresses (the model), then stored to the end.
    assert sink.bytes_in["zstd"] <= 3 << 20 and sink.bytes_in["stored"] >= len(text) - (3 << 20), sink.bytes_in
    assert crossed[0] > len(text) * 0.8


@pytest.mark.parametrize(
    ("text", "expected"),
    [("auto", Compression(3, True)), ("auto:1", Compression(1, True)), ("zstd:5", Compression(5)), ("none", Compression())],
)
def test_compression_spellings(text: str, expected: Compression) -> None:
    assert parse_compression(text) == expected


def test_a_wrong_spelling_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="use auto, zstd, zstd:LEVEL"):
        parse_compression("lz4")
