"""The C command decoder (_btrfsc.c) against decode_command, the pure-Python reference: command for command."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapferry.btrfs.codec import stream
from snapferry.btrfs.codec.commands import ATTR_SIZE, SPECS, Attr, Cmd, Command
from snapferry.btrfs.codec.stream import CMD_HEADER_SIZE, BtrfsStreamReader, decode_command, encode_command, stream_header
from snapferry.errors import StreamFormatError

pytestmark = pytest.mark.skipif(not stream.native_available(), reason="the C extension is not built (python3 setup.py build_ext --inplace)")


def _native(kind: int, body: bytes, version: int) -> dict[Attr, bytes | memoryview] | None:
    assert stream._built is not None
    return stream._built.decode(kind, memoryview(bytearray(body)), version)


def _reference(kind: int, body: bytes, version: int) -> Command | None:
    try:
        return decode_command(kind, memoryview(bytearray(body)), version)
    except StreamFormatError:
        return None


def _same(native: dict[Attr, bytes | memoryview], reference: Command) -> None:
    assert [type(k) for k in native] == [Attr] * len(native)
    assert [(k, bytes(v)) for k, v in native.items()] == [(k, bytes(v)) for k, v in reference.attrs.items()]


def _value(attr: Attr) -> st.SearchStrategy[bytes]:
    size = ATTR_SIZE[attr]
    return st.binary(min_size=size, max_size=size) if size is not None else st.binary(max_size=300)


@st.composite
def well_formed(draw: st.DrawFn) -> tuple[int, Command]:
    version = draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from([k for k in Cmd if version >= 2 or k < Cmd.FALLOCATE]))
    spec = SPECS[kind]
    attrs = draw(st.permutations(list(spec.required) + [a for a in spec.optional if draw(st.booleans())]))
    if Attr.DATA in attrs:
        attrs = [a for a in attrs if a != Attr.DATA] + [Attr.DATA]
    return version, Command(kind, {a: draw(_value(a)) for a in attrs})


@settings(max_examples=400, deadline=None)
@given(well_formed())
def test_well_formed_commands_decode_alike(case: tuple[int, Command]) -> None:
    version, command = case
    raw = encode_command(command, version)
    body = raw[CMD_HEADER_SIZE:]
    native, reference = _native(command.kind, body, version), _reference(command.kind, body, version)
    assert native is not None and reference is not None
    _same(native, reference)
    assert Command(command.kind, native) == command


@st.composite
def mangled(draw: st.DrawFn) -> tuple[int, int, bytes]:
    """Bodies near the well-formed ones (bytes flipped, cut, or added) and plain noise."""
    version, command = draw(well_formed())
    body = bytearray(encode_command(command, version)[CMD_HEADER_SIZE:])
    for _ in range(draw(st.integers(0, 3))):
        if body:
            body[draw(st.integers(0, len(body) - 1))] = draw(st.integers(0, 255))
    body = body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body + draw(st.binary(max_size=8))
    kind = draw(st.one_of(st.just(int(command.kind)), st.integers(0, 70)))
    return draw(st.sampled_from([version, 1, 2, 3])), kind, bytes(body) if draw(st.booleans()) else draw(st.binary(max_size=64))


@settings(max_examples=1500, deadline=None)
@given(mangled())
def test_anything_else_goes_to_the_reference(case: tuple[int, int, bytes]) -> None:
    """C decodes a command only where the reference decodes it to the same attributes; otherwise it hands it over (None)."""
    version, kind, body = case
    native, reference = _native(kind, body, version), _reference(kind, body, version)
    if reference is None:
        assert native is None
    elif native is not None:
        _same(native, reference)


@settings(max_examples=100, deadline=None)
@given(st.lists(well_formed(), max_size=20), st.sampled_from([1, 2]))
def test_streams_read_alike_with_and_without_c(cases: list[tuple[int, Command]], version: int) -> None:
    commands = [c for _, c in cases if c.kind != Cmd.END and (version >= 2 or c.kind < Cmd.FALLOCATE)] + [Command(Cmd.END, {})]
    raw = stream_header(version) + b"".join(encode_command(c, version) for c in commands)
    previous = stream.use_native(True)
    try:
        with_c = [(i.offset, i.fingerprint, i.command) for i in BtrfsStreamReader(io.BytesIO(raw))]
        stream.use_native(False)
        without = [(i.offset, i.fingerprint, i.command) for i in BtrfsStreamReader(io.BytesIO(raw))]
    finally:
        stream.use_native(previous)
    assert with_c == without
    assert [c for _, _, c in with_c] == commands
