"""The damaged-input corpus in tests/corpus/: each file is refused by its parser with the expected one-line error."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import cast

import pytest
from fuzz.targets import RAW_BEGIN, TARGETS

from snapferry.codec import nvlist, openzfs_token
from snapferry.codec.token import ResumeToken
from snapferry.codec.zfs_records import chained_begin_payload
from snapferry.codec.zfs_stream import Readable, StreamReader
from snapferry.transport.wire import open_wire

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


PARSERS: dict[str, Callable[[bytes], object]] = {
    "stream": lambda data: read_all(io.BytesIO(data)),
    "stream-trusting": lambda data: read_all(io.BytesIO(data), trusting=True),
    "wire": _wire,
    "token": lambda data: ResumeToken.decode(data.decode()),
    "openzfs-token": lambda data: openzfs_token.decode(data.decode()),
    "nvlist": nvlist.decode,
    "chained-begin": lambda data: chained_begin_payload(RAW_BEGIN, data),
}


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
    # The fuzz target for the same parser agrees, and its oracles hold on the file.
    assert TARGETS[expected["target"]].run(data).split("/")[0] == expected["exception"]


def _make_corpus() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_corpus_regenerates_byte_for_byte() -> None:
    make_corpus = _make_corpus()
    if not make_corpus.SOURCE.is_file():
        pytest.skip("OpenZFS fixtures not available")
    cases = make_corpus.build()
    assert {case.name: (case.target, case.exception, case.message) for case in cases} == {
        name: (e["target"], e["exception"], e["message"]) for name, e in EXPECTED.items()
    }
    for case in cases:
        assert (CORPUS / case.name).read_bytes() == case.data, case.name
