"""The jump to a checkpoint (snapferry.zfs.resume.jump): positions in sf1- tokens, the kernel token, the resumed BEGIN."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapferry.errors import MalformedToken
from snapferry.zfs.codec.openzfs_token import OpenZfsToken
from snapferry.zfs.codec.records import HEADER_SIZE, RecordType, record_position, unresumed_begin
from snapferry.zfs.codec.stream import StreamReader
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.engine.command import Snapshot
from snapferry.zfs.resume.checkpoints import _NEXT, next_record_value
from snapferry.zfs.resume.jump import kernel_token
from snapferry_testkit.shared_data import OPENZFS_DATA
from tests.test_token import SAMPLE, fields_token, tokens

U64 = (1 << 64) - 1
SOURCE = Snapshot("tank/src@s1", SAMPLE.toguid, 1)


@st.composite
def positioned(draw: st.DrawFn) -> ResumeToken:
    token = draw(tokens())
    kind = draw(st.sampled_from([k for k in RecordType if k not in (RecordType.BEGIN, RecordType.END)]))
    u64 = st.integers(min_value=0, max_value=U64)
    return dataclasses.replace(token, next_kind=int(kind), next_object=draw(u64), next_offset=draw(u64))


@given(positioned())
@settings(max_examples=300, deadline=None)
def test_position_roundtrips(token: ResumeToken) -> None:
    assert ResumeToken.decode(token.encode()) == token
    assert token.has_position


def test_a_token_without_position_is_what_older_snapferry_made() -> None:
    # The exact text of a token from before positions existed still decodes, with no position.
    old = fields_token()
    decoded = ResumeToken.decode(old)
    assert decoded == SAMPLE and not decoded.has_position
    assert "next_kind" not in json.dumps(SAMPLE.describe())
    assert SAMPLE.encode() == ResumeToken.decode(SAMPLE.encode()).encode()


@pytest.mark.parametrize(
    "fields",
    [
        {"next_kind": 3},
        {"next_kind": 3, "next_object": 2},
        {"next_kind": 0, "next_object": 2, "next_offset": 0},
        {"next_kind": 3, "next_object": -1, "next_offset": 0},
        {"next_kind": 3, "next_object": 2, "next_offset": 1 << 64},
        {"next_kind": "3", "next_object": 2, "next_offset": 0},
    ],
)
def test_a_damaged_position_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(MalformedToken, match="next record's position"):
        ResumeToken.decode(fields_token(**fields))


@given(positioned(), st.sampled_from(["", "L", "e", "c", "Lec", "ec"]))
@settings(max_examples=200, deadline=None)
def test_kernel_token_roundtrips_through_the_openzfs_decoder(token: ResumeToken, flags: str) -> None:
    token = dataclasses.replace(token, send_flags=flags)
    decoded = OpenZfsToken.decode(kernel_token(token, SOURCE))
    assert (decoded.object, decoded.toguid, decoded.toname, decoded.bytes) == (token.next_object, token.toguid, SOURCE.name, token.offset)
    assert decoded.offset == (0 if token.next_kind == RecordType.OBJECT else token.next_offset)
    assert decoded.fromguid == (token.fromguid or None)
    assert (decoded.largeblockok, decoded.embedok, decoded.compressok, decoded.rawok) == ("L" in flags, "e" in flags, "c" in flags, False)


@pytest.mark.parametrize("version", ["zfs-2.3.2", "zfs-2.1.11"])
@pytest.mark.parametrize("name", ["full_s1", "incr_s1_s2"])
def test_kernel_resume_is_the_whole_streams_rest(version: str, name: str) -> None:
    """What jump.py relies on, on real OpenZFS streams: the BEGIN less its resume pairs is the whole stream's, and
    after the resumed object's OBJECT and FREE the records are the whole stream's from the same record on."""
    where = OPENZFS_DATA / version
    token = OpenZfsToken.decode((where / f"{name}.token").read_text())

    def read(path: str) -> tuple[bytes, list[tuple[RecordType, tuple[int, int], bytes]]]:
        reader = StreamReader(io.BytesIO((where / path).read_bytes()))
        first = reader.read_begin()
        assert first is not None
        records = [
            (r.kind, record_position(r.kind, r.header), bytes(r.header[:280]) + bytes(r.payload))
            for r in reader.records(first[1], len(first[1]), len(first[1]))
            if r.kind != RecordType.END
        ]
        return first[1], records

    whole_begin, whole = read(f"{name}.stream")
    resumed_begin, resumed = read(f"{name}.resume.stream")
    kernel = StreamReader(io.BytesIO(resumed_begin)).read_begin()
    assert kernel is not None
    begin, payload = unresumed_begin(kernel[0], kernel[1][HEADER_SIZE:])
    assert begin.encode() + payload == whole_begin
    assert [(k, p[0]) for k, p, _ in resumed[:2]] == [(RecordType.OBJECT, token.object), (RecordType.FREE, token.object)]
    at = resumed[2][:2]
    assert at == (RecordType.WRITE, (token.object, token.offset))
    start = next(i for i, r in enumerate(whole) if r[:2] == at)
    assert resumed[2:] == whole[start:]


def test_property_value_parses_back() -> None:
    match = _NEXT.match(next_record_value(3, 0x3B, 0x1C0000))
    assert match is not None and (match["kind"], match["object"], match["offset"]) == ("3", "3b", "1c0000")
