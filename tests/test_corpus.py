"""The damaged-input corpus in tests/corpus/: each file is refused by its parser with the expected one-line error."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
from fuzz.targets import RAW_BEGIN, TARGETS

from snapferry.btrfs.codec.commands import Attr, Cmd
from snapferry.btrfs.codec.stream import CONTINUATION_SIZE, STREAM_HEADER_SIZE, BtrfsStreamReader, Continuation, safe_path_parts
from snapferry.btrfs.resume.checkpoints import BtrfsToken
from snapferry.core.streamio import Readable
from snapferry.transport.wire import open_wire
from snapferry.zfs.codec import nvlist, openzfs_token
from snapferry.zfs.codec.records import chained_begin_payload
from snapferry.zfs.codec.replication import read_header
from snapferry.zfs.codec.stream import StreamReader
from snapferry.zfs.codec.token import ResumeToken

CORPUS = Path(__file__).parent / "corpus"
EXPECTED: dict[str, dict[str, str]] = json.loads((CORPUS / "expected.json").read_text())


def read_all(source: Readable, *, trusting: bool = False) -> int:
    """Every substream of `source` to its END, as the receivers read it; the number of records."""
    reader = StreamReader(source)
    count = 0
    while (first := reader.read_begin()) is not None:
        _, begin_bytes = first
        read = reader.records_trusting_stamps if trusting else reader.records
        count += sum(1 for _ in read(begin_bytes, len(begin_bytes), len(begin_bytes)))
    return count


def _wire(data: bytes) -> int:
    return read_all(open_wire(cast("io.BufferedReader[io.FileIO]", io.BufferedReader(io.BytesIO(data)))))


def _btrfs_stream(data: bytes) -> int:
    return sum(1 for _ in BtrfsStreamReader(io.BytesIO(data)))


def _btrfs_paths(data: bytes) -> int:
    """The stream read, and every path in it confined as the applier confines it."""
    count = 0
    for item in BtrfsStreamReader(io.BytesIO(data)):
        for attr in (Attr.PATH, Attr.PATH_TO, Attr.PATH_LINK, Attr.CLONE_PATH):
            # A symlink's target is stored, never followed: it may point anywhere, as in the source.
            if attr in item.command.attrs and not (attr == Attr.PATH_LINK and item.command.kind == Cmd.SYMLINK):
                safe_path_parts(item.command.attrs[attr])
        count += 1
    return count


def _btrfs_continuation(data: bytes) -> int:
    Continuation.decode(data[:STREAM_HEADER_SIZE], data[STREAM_HEADER_SIZE:CONTINUATION_SIZE])
    return _btrfs_stream(data[CONTINUATION_SIZE:])


PARSERS: dict[str, Callable[[bytes], object]] = {
    "stream": lambda data: read_all(io.BytesIO(data)),
    "stream-trusting": lambda data: read_all(io.BytesIO(data), trusting=True),
    "wire": _wire,
    "token": lambda data: ResumeToken.decode(data.decode()),
    "openzfs-token": lambda data: openzfs_token.decode(data.decode()),
    "nvlist": nvlist.decode,
    "chained-begin": lambda data: chained_begin_payload(RAW_BEGIN, data),
    "replication-header": read_header,
    "btrfs-stream": _btrfs_stream,
    "btrfs-paths": _btrfs_paths,
    "btrfs-continuation": _btrfs_continuation,
    "btrfs-token": lambda data: BtrfsToken.decode(data.decode()),
}
# The btrfs and -R header fuzz targets read a marker byte first: 0 = the input as it is.
TARGET_PREFIX = {"btrfs-stream": b"\0", "btrfs-continuation": b"\0", "replication-header": b"\0"}


def test_corpus_is_complete() -> None:
    files = sorted(p.name for p in CORPUS.iterdir() if p.suffix in (".bin", ".txt"))
    assert files == sorted(EXPECTED)
    assert len(files) >= 20
    assert {entry["target"] for entry in EXPECTED.values()} == set(PARSERS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_refused_with_its_message(name: str) -> None:
    expected = EXPECTED[name]
    data = (CORPUS / name).read_bytes()
    with pytest.raises(Exception) as info:
        PARSERS[expected["target"]](data)
    message = str(info.value)
    assert type(info.value).__name__ == expected["exception"], f"{type(info.value).__name__}: {message}"
    assert re.search(expected["message"], message), message
    assert "\n" not in message
    # The fuzz target for the same parser agrees, and its oracles hold on the file (path confinement is the applier's).
    if expected["target"] in TARGETS:
        assert TARGETS[expected["target"]].run(TARGET_PREFIX.get(expected["target"], b"") + data).split("/")[0] == expected["exception"]


def test_corpus_regenerates_byte_for_byte() -> None:
    from tests.corpus import make_corpus  # here: a broken generator fails this test, not the collection of the others

    if not make_corpus.SOURCE.is_file():
        pytest.skip("OpenZFS fixtures not available")
    cases = make_corpus.build()
    assert {case.name: (case.target, case.exception, case.message) for case in cases} == {
        name: (e["target"], e["exception"], e["message"]) for name, e in EXPECTED.items()
    }
    for case in cases:
        assert (CORPUS / case.name).read_bytes() == case.data, case.name
