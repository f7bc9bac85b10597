"""pass_on: a producer's pipe passed on unchanged, spliced in the kernel where the sink allows it, copied where not."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from snapferry.core.streamio import pass_on
from snapferry.transport.wire import Compression, WireSink, open_wire

# A producer that writes many small pieces, as btrfs send writes one command at a time.
PRODUCER = "import os, random, sys; r = random.Random(7); [os.write(1, r.randbytes(r.randrange(1, 9000))) for _ in range(3000)]"


def expected() -> bytes:
    r = random.Random(7)
    return b"".join(r.randbytes(r.randrange(1, 9000)) for _ in range(3000))


def producer() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", PRODUCER], stdout=subprocess.PIPE)


@pytest.mark.parametrize("append", [False, True], ids=["spliced", "append-mode file: copied"])
def test_every_byte_arrives_in_order(tmp_path: Path, append: bool) -> None:
    """A plain sink is spliced into; a file opened for appending refuses splice (EINVAL), and the bytes are copied."""
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0))
    proc = producer()
    assert proc.stdout is not None
    seen: list[int] = []
    try:
        sent = pass_on(proc.stdout, WireSink(fd), 1 << 20, seen.append)  # type: ignore[arg-type]
    finally:
        os.close(fd)
    assert proc.wait() == 0
    assert out.read_bytes() == expected()
    assert sent == len(expected()) == seen[-1]
    assert seen == sorted(seen)


def test_a_compressing_sink_gets_every_byte_through_itself(tmp_path: Path) -> None:
    out = tmp_path / "out.zst"
    with open(out, "wb") as file:
        sink = WireSink(file.fileno(), compression=Compression(3))
        assert sink.splice_fd() is None
        proc = producer()
        assert proc.stdout is not None
        pass_on(proc.stdout, sink, 1 << 20, lambda sent: None)  # type: ignore[arg-type]
        sink.close()
    assert proc.wait() == 0
    with open(out, "rb") as source:
        stream = open_wire(source)  # type: ignore[arg-type]
        got = bytearray()
        buffer = memoryview(bytearray(1 << 16))
        while n := stream.readinto(buffer):
            got += buffer[:n]
    assert bytes(got) == expected()
