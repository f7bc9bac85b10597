"""Short fuzzing of every parser for CI: arbitrary and damaged inputs end in a correct parse or an allowed one-line error.

The long, coverage-guided runs are `python3 -m fuzz.fuzz_parsers --all` (docs/FUZZING.md); these use the
same targets and oracles (fuzz/targets.py) with hypothesis, a few thousand inputs in all.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
from fuzz import targets
from fuzz.contract import OK, ContractViolation
from fuzz.targets import TARGETS, mutations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapferry.errors import StreamFormatError
from snapferry.transport import wire
from snapferry.transport.wire import Compression, WireSink
from snapferry.zfs.codec import nvlist
from snapferry.zfs.codec.nvlist import NvList, NvPair, NvType
from snapferry.zfs.codec.records import chained_begin_payload

CORPUS = Path(__file__).parent / "corpus"

# Inputs per target: the stream targets cost milliseconds per input, the token and nvlist ones microseconds.
BUDGET = {
    "stream": 500,
    "stream-trusting": 400,
    "stream-mutated": 600,
    "stream-native": 300,
    "wire": 500,
    "begin": 800,
    "token": 800,
    "openzfs-token": 800,
    "nvlist": 1000,
    "chained-begin": 800,
    "nvlist-xdr": 1000,
    "replication-header": 800,
    "btrfs-stream": 800,
    "btrfs-continuation": 600,
    "btrfs-token": 800,
    "offsite-record": 800,
    "tree-token": 800,
}


def test_every_target_has_a_budget() -> None:
    assert set(BUDGET) == set(TARGETS)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_keeps_its_contract(name: str) -> None:
    """Half raw bytes, half mutated seeds; any exception out of run() (or a slow input) fails the test."""
    target = TARGETS[name]
    seeds = target.seeds()
    inputs = st.one_of(st.binary(max_size=min(target.max_len, 4096)), mutations(seeds, target.max_len))

    @settings(
        max_examples=BUDGET[name],
        deadline=timedelta(seconds=2),
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(inputs)
    def fuzz(data: bytes) -> None:
        target.run(data)

    fuzz()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_keep_the_contract(name: str) -> None:
    for seed in TARGETS[name].seeds():
        TARGETS[name].run(seed)


def test_well_formed_inputs_parse() -> None:
    """The oracles hold on correct parses too: every well-formed seed is accepted, not only refusals checked."""
    streams = targets.valid_streams()
    for name in ("stream", "stream-trusting", "wire"):
        assert [TARGETS[name].run(s) for s in streams] == [OK] * len(streams), name
    assert TARGETS["stream-mutated"].run(b"") == OK  # the program that changes nothing
    assert TARGETS["stream-native"].run(b"") == OK
    for name in ("token", "openzfs-token", "nvlist"):
        assert {TARGETS[name].run(seed) for seed in TARGETS[name].seeds()} == {OK}, name
    assert [TARGETS["chained-begin"].run(seed) for seed in targets.chained_seeds()] == [OK, OK, "StreamFormatError", OK]


def test_a_leaked_exception_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contract is enforced: an exception outside the allowed ones escapes run(), as would a real bug."""

    def broken(data: bytes) -> NvList:
        raise KeyError("a bug")

    monkeypatch.setattr(nvlist, "decode", broken)
    with pytest.raises(KeyError):
        TARGETS["nvlist"].run(TARGETS["nvlist"].seeds()[0])


def test_a_multi_line_message_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def vague(data: bytes) -> NvList:
        raise nvlist.NvlistError("two\nlines")

    monkeypatch.setattr(nvlist, "decode", vague)
    with pytest.raises(ContractViolation, match="one-line"):
        TARGETS["nvlist"].run(b"\0" * 16)


def test_wire_oracle_catches_a_frame_dropped_at_a_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the frame check in wire.py, a zstd input cut in its second frame read as a clean end after the first."""
    data = (CORPUS / "zstd-second-frame-cut.bin").read_bytes()
    assert TARGETS["wire"].run(data) == "StreamTruncated"
    monkeypatch.setattr(wire._Frames, "between_frames", property(lambda self: True))
    with pytest.raises(ContractViolation, match="not whole, valid zstd frames"):
        TARGETS["wire"].run(data)


@pytest.mark.parametrize("kind", [NvType.STRING, NvType.UINT64_ARRAY, NvType.BOOLEAN, NvType.NVLIST])
def test_chained_begin_refuses_a_mistyped_to_ivset_guid(kind: NvType) -> None:
    """Regression: a to_ivset_guid that is not a UINT64 leaked ValueError from nvlist.encode."""
    value = {NvType.STRING: "7", NvType.UINT64_ARRAY: (7,), NvType.BOOLEAN: None, NvType.NVLIST: NvList()}[kind]
    keys = NvList((NvPair("to_ivset_guid", kind, value),))
    payload = nvlist.encode(NvList((NvPair("crypt_keydata", NvType.NVLIST, keys),)))
    with pytest.raises(StreamFormatError, match=f"^raw stream whose to_ivset_guid is a {kind.name}, not a UINT64"):
        chained_begin_payload(targets.RAW_BEGIN, payload)


def _through_wire_sink(data: bytes, *, parts: int) -> bytes:
    with tempfile.TemporaryFile() as f:
        sink = WireSink(f.fileno(), compression=Compression(3))
        step = -(-len(data) // parts)
        for start in range(0, len(data), step):
            sink([data[start : start + step]])
        sink.close()
        f.seek(0)
        return f.read()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, len(targets.valid_streams()) - 1), st.integers(1, 5), st.data())
def test_wire_sink_output_reads_back_and_every_cut_is_an_interruption(index: int, parts: int, data: st.DataObject) -> None:
    """What WireSink writes parses like the raw stream; cut anywhere short of its end it is StreamTruncated."""
    stream = targets.valid_streams()[index]
    compressed = _through_wire_sink(stream, parts=parts)
    raw_result = TARGETS["wire"].run(stream)
    assert TARGETS["wire"].run(compressed) == raw_result
    cut = data.draw(st.integers(1, len(compressed) - 1))
    assert TARGETS["wire"].run(compressed[:cut]) == "StreamTruncated"
    # Two sends back to back (two frames): whole, both substreams; the second cut, never a clean end.
    if raw_result == OK:
        assert TARGETS["wire"].run(compressed + compressed) == OK
        assert TARGETS["wire"].run(compressed + compressed[:cut]) == "StreamTruncated"


def test_zstd_magic_alone_is_not_an_empty_stream() -> None:
    assert TARGETS["wire"].run(wire.ZSTD_MAGIC) == "StreamTruncated"
    assert TARGETS["wire"].run(b"") == OK  # no input at all is a clean (empty) end; the receivers refuse it


def test_sf1_token_inflation_is_bounded() -> None:
    """Regression: an sf1 token of a few KiB inflated to whatever its zlib stream held (400 MiB from 270 KiB)."""
    text = (CORPUS / "token-sf1-zlib-bomb.txt").read_text()
    assert len(text) < 16 << 10
    assert TARGETS["token"].run(text.encode()) == "MalformedToken"


def test_fuzz_runner_runs_a_target() -> None:
    """The runner's fallback loop end to end, briefly (the atheris one is what docs/FUZZING.md reports)."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "fuzz.fuzz_parsers", "--target", "nvlist", "--runs", "200", "--hypothesis"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root / "src")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nvlist: 200 inputs" in result.stdout


def test_a_decompressing_wire_is_freed_at_once() -> None:
    """The RSS bound of the wire target caught this: a reference cycle through zstandard's reader kept every one alive."""
    source = io.BufferedReader(io.BytesIO(targets.wire_seeds()[0]))
    readable = wire.open_wire(source)  # type: ignore[arg-type]
    assert TARGETS["wire"].run(targets.wire_seeds()[0]) == OK
    gone = weakref.ref(readable)
    del readable
    assert gone() is None
