"""Framing of btrfs send streams: header, command crc32c, TLV attributes, reading, encoding, path confinement."""

from __future__ import annotations

import hashlib
import importlib
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import crc32c

from snapferry.btrfs.codec.commands import ATTR_SIZE, CMD_ENABLE_VERITY, FIRST_V2_CMD, SPECS, Attr, Cmd, Command
from snapferry.core.streamio import Readable, read_exact
from snapferry.errors import BtrfsStreamTruncated, PrefixMismatch, StreamFormatError, StreamIntegrityError

MAGIC = b"btrfs-stream\0"
STREAM_HEADER_SIZE = len(MAGIC) + 4
VERSIONS = (1, 2)
CMD_HEADER_SIZE = 10
TLV_HEADER_SIZE = 4
# Checked before any allocation. A v1 command fits the kernel's 64 KiB send buffer; for v2 the kernel
# promises no limit (its buffer is 16 KiB + one 128 KiB compressed extent today), so allow far more.
MAX_COMMAND_LEN_V1 = 64 << 10
MAX_COMMAND_LEN = 16 << 20
PATH_MAX = 4096
NAME_MAX = 255

CONTINUATION_MAGIC = b"snapferry-resume\0"
_CONTINUATION = struct.Struct("<Q16s")
_CMD_HEADER = struct.Struct("<IHI")
_TLV = struct.Struct("<HH")
_ZERO_CRC = bytes(4)
_DATA = Attr.DATA.value
_END = Cmd.END.value
FINGERPRINT_SIZE = 16
# Chained from this value: a fingerprint after N commands is blake2b(previous || command header).
FINGERPRINT_START = bytes(FINGERPRINT_SIZE)
CONTINUATION_SIZE = len(CONTINUATION_MAGIC) + _CONTINUATION.size


def btrfs_crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The send stream's crc32c: seed 0 and no final inversion, which standard crc32c with both inversions undone gives.

    Chainable: btrfs_crc32c(b, btrfs_crc32c(a)) == btrfs_crc32c(a + b).
    """
    return crc32c.crc32c(data, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def stream_header(version: int) -> bytes:
    check_version(version)
    return MAGIC + version.to_bytes(4, "little")


def check_version(version: int) -> None:
    if version not in VERSIONS:
        raise StreamFormatError(f"btrfs send stream version {version} is not supported (only 1 and 2)")


def parse_stream_header(header: bytes | bytearray | memoryview) -> int:
    """The stream's protocol version, from its first 17 bytes."""
    if bytes(header[: len(MAGIC)]) != MAGIC:
        raise StreamFormatError("no btrfs-stream magic at the start of input: not a btrfs send stream")
    version = int.from_bytes(header[len(MAGIC) : STREAM_HEADER_SIZE], "little")
    check_version(version)
    return version


def fingerprint_extend(fingerprint: bytes, command_header: bytes | bytearray | memoryview) -> bytes:
    """The fingerprint after one more command, from its 10-byte header.

    The header holds the command's verified crc32c, which covers all its bytes; hashing every data
    byte again would cost more than the crc did. A changed command goes unnoticed only if its
    length, kind and crc32c all match (a 2^-32 chance per changed command).
    """
    return hashlib.blake2b(bytes(fingerprint) + bytes(command_header), digest_size=FINGERPRINT_SIZE).digest()


@dataclass(frozen=True)
class Continuation:
    """What precedes a snapferry btrfs continuation: the stream resumes after byte `offset`, whose fingerprint it gives.

    A continuation is this 41-byte header, then the stream's own header and first command (which name the
    stream), then its commands from `offset` on. Its magic is as long as btrfs's, so a stock
    `btrfs receive` refuses it before creating anything.
    """

    offset: int
    fingerprint: bytes

    def encode(self) -> bytes:
        return CONTINUATION_MAGIC + _CONTINUATION.pack(self.offset, self.fingerprint)

    @classmethod
    def decode(cls, header: bytes | bytearray | memoryview, rest: bytes | bytearray | memoryview) -> Continuation:
        """From the 17-byte magic and the 24 bytes after it."""
        if bytes(header) != CONTINUATION_MAGIC:
            raise StreamFormatError("not a snapferry btrfs continuation")
        if len(rest) < _CONTINUATION.size:
            raise BtrfsStreamTruncated(
                f"input ended inside the continuation header ({len(header) + len(rest)} of {CONTINUATION_SIZE} bytes)"
            )
        offset, fingerprint = _CONTINUATION.unpack(rest[: _CONTINUATION.size])
        return cls(offset, fingerprint)


def _command_name(raw: int) -> str:
    try:
        return Cmd(raw).name
    except ValueError:
        return "ENABLE_VERITY (protocol 3)" if raw == CMD_ENABLE_VERITY else str(raw)


_CMDS = {c.value: c for c in Cmd}
_ATTRS = {a.value: a for a in Attr}
_ATTR_SIZE = {attr.value: size for attr, size in ATTR_SIZE.items()}


class _Rule(NamedTuple):
    """What decode_command checks a kind of command against, looked up once per command."""

    cmd: Cmd
    sizes: dict[int, int | None]  # the attributes it may carry, by raw type, and their fixed sizes
    required: frozenset[Attr]


_RULES = {
    cmd.value: _Rule(cmd, {a.value: ATTR_SIZE[a] for a in (*spec.required, *spec.optional)}, frozenset(spec.required))
    for cmd, spec in SPECS.items()
}


def decode_command(kind: int, body: memoryview, version: int, offset: int = 0) -> Command:
    """A command from its kind and the bytes after its header; `offset` (of its header) is for messages."""
    rule = _RULES.get(kind)
    if rule is None:
        raise StreamFormatError(f"unknown btrfs send command {_command_name(kind)} at stream byte {offset}")
    cmd, sizes, required = rule
    if version < 2 and cmd >= FIRST_V2_CMD:
        raise StreamFormatError(f"{cmd.name} command at stream byte {offset} in a version {version} stream (it needs version 2)")
    attrs: dict[Attr, memoryview] = {}
    pos, end = 0, len(body)
    # Whether every attribute is one this kind carries, at its fixed size: if not, Command.validate says which is wrong.
    fits = True
    while pos < end:
        if end - pos >= TLV_HEADER_SIZE:
            raw_type, length = _TLV.unpack_from(body, pos)
        elif end - pos < 2:
            raise StreamFormatError(f"{cmd.name} command at stream byte {offset} ends inside an attribute header")
        else:
            raw_type, length = body[pos] | body[pos + 1] << 8, -1
        attr = _ATTRS.get(raw_type)
        if attr is None:
            raise StreamFormatError(f"unknown attribute {raw_type} in the {cmd.name} command at stream byte {offset}")
        if version >= 2 and raw_type == _DATA:
            # Protocol 2: DATA has no length and runs to the end of the command.
            start, length = pos + 2, end - pos - 2
        else:
            if length < 0:
                raise StreamFormatError(f"{cmd.name} command at stream byte {offset} ends inside an attribute header")
            start = pos + TLV_HEADER_SIZE
            if length > end - start:
                raise StreamFormatError(f"{attr.name} attribute of {length} bytes overruns the {cmd.name} command at stream byte {offset}")
        if attr in attrs:
            raise StreamFormatError(f"{attr.name} attribute twice in the {cmd.name} command at stream byte {offset}")
        pos = start + length
        attrs[attr] = body[start:pos]
        if fits:
            size = sizes.get(raw_type, -1)
            fits = size is None or size == length
    command = Command(cmd, attrs)
    if not fits or not attrs.keys() >= required or (version >= 2 and _DATA in attrs and raw_type != _DATA):
        try:
            command.validate(version)
        except StreamFormatError as e:
            raise StreamFormatError(f"{e} at stream byte {offset}") from None
    return command


# The C decoder (_btrfsc.c) takes the commands that are well formed and hands every other one to
# decode_command, which stays the reference (tests/test_btrfs_native.py compares the two) and the
# fallback where there was no compiler. SNAPFERRY_PURE=1 turns it off.
_built: ModuleType | None
try:
    _built = importlib.import_module("snapferry.btrfs.codec._btrfsc")
except ImportError:
    _built = None
if _built is not None:
    _built.configure(
        tuple(_ATTRS.get(t) for t in range(32)),
        tuple(
            (
                cmd.value,
                int(cmd >= FIRST_V2_CMD),
                tuple(-2 if t not in sizes else -1 if sizes[t] is None else sizes[t] for t in range(32)),
                sum(1 << a.value for a in required),
            )
            for cmd, sizes, required in _RULES.values()
        ),
    )
_native: Callable[[int, memoryview, int], dict[Attr, bytes | memoryview] | None] | None = (
    None if _built is None or os.environ.get("SNAPFERRY_PURE") else _built.decode
)


def native_available() -> bool:
    """Whether the C decoder was built and can be imported."""
    return _built is not None


def use_native(enabled: bool) -> bool:
    """Switch between the C decoder and decode_command alone (for tests and benches); returns the previous setting."""
    global _native
    previous = _native is not None
    _native = _built.decode if enabled and _built is not None else None
    return previous


def encode_command(command: Command, version: int) -> bytes:
    """The command's bytes, crc included; attributes in the command's order."""
    check_version(version)
    command.validate(version)
    if version < 2 and command.kind >= FIRST_V2_CMD:
        raise StreamFormatError(f"{command.kind.name} command cannot be sent in a version 1 stream")
    parts = [bytes(CMD_HEADER_SIZE)]
    for attr, raw in command.attrs.items():
        if version >= 2 and attr == Attr.DATA:
            parts.append(attr.to_bytes(2, "little"))
        elif len(raw) > 0xFFFF:
            raise StreamFormatError(f"{attr.name} attribute of {len(raw)} bytes does not fit a TLV (at most 65535)")
        else:
            parts.append(_TLV.pack(attr, len(raw)))
        parts.append(bytes(raw))
    out = bytearray().join(parts)
    length = len(out) - CMD_HEADER_SIZE
    if length > (MAX_COMMAND_LEN if version >= 2 else MAX_COMMAND_LEN_V1):
        raise StreamFormatError(f"{command.kind.name} command of {length} bytes is over the limit for version {version}")
    _CMD_HEADER.pack_into(out, 0, length, command.kind, 0)
    _CMD_HEADER.pack_into(out, 0, length, command.kind, btrfs_crc32c(out))
    return bytes(out)


class StreamCommand:
    """A command as read: where it was, its bytes, and the fingerprint of the stream up to its end.

    A plain class with slots, not a dataclass: one is made per command, and a frozen dataclass's
    constructor costs several times as much.
    """

    __slots__ = ("offset", "size", "end_offset", "command", "fingerprint", "header", "body")

    def __init__(self, offset: int, size: int, command: Command, fingerprint: bytes, header: bytes, body: bytearray) -> None:
        self.offset = offset
        self.size = size
        self.end_offset = offset + size
        self.command = command
        self.fingerprint = fingerprint
        self.header = header
        self.body = body

    def __repr__(self) -> str:
        return f"StreamCommand(offset={self.offset}, size={self.size}, command={self.command!r})"


class BtrfsStreamReader:
    """Reads one btrfs send stream from a binary source, verifying every command's crc32c.

    Iterating yields StreamCommands up to and including END, then stops without reading further
    (a concatenated next stream stays unread in the source).
    """

    def __init__(self, source: Readable, *, max_command_len: int = MAX_COMMAND_LEN) -> None:
        self._source = source
        self._max = max_command_len
        self.bytes_read = 0
        self.version = 0
        self.fingerprint = FINGERPRINT_START

    def _read_exact(self, view: memoryview) -> int:
        got = read_exact(self._source, view)
        self.bytes_read += got
        return got

    def read_header(self) -> int:
        """The stream's version; reads the 17-byte stream header (iteration does it if not done yet)."""
        header = bytearray(STREAM_HEADER_SIZE)
        got = self._read_exact(memoryview(header))
        if got == 0:
            raise StreamFormatError("no btrfs send stream on input (it was empty)")
        seen = min(got, len(MAGIC))
        if got < STREAM_HEADER_SIZE and header[:seen] == MAGIC[:seen]:
            raise BtrfsStreamTruncated(f"input ended inside the btrfs stream header ({got} of {STREAM_HEADER_SIZE} bytes)")
        self.version = parse_stream_header(header)
        self.fingerprint = fingerprint_extend(FINGERPRINT_START, header)
        return self.version

    def jump(self, offset: int, fingerprint: bytes) -> None:
        """Continue as if the commands up to `offset`, ending in `fingerprint`, had been read (a continuation's gap)."""
        self.bytes_read = offset
        self.fingerprint = fingerprint

    def __iter__(self) -> Iterator[StreamCommand]:
        if not self.version:
            self.read_header()
        limit = min(self._max, MAX_COMMAND_LEN if self.version >= 2 else MAX_COMMAND_LEN_V1)
        source, version = self._source, self.version
        crc32c_of, blake2b, unpack_header = crc32c.crc32c, hashlib.blake2b, _CMD_HEADER.unpack
        offset, fingerprint = self.bytes_read, self.fingerprint
        native = _native
        while True:
            header_view = memoryview(bytearray(CMD_HEADER_SIZE))
            # The common case, a whole header (or body) in one call, without read_exact's loop. The
            # method is looked up each time: Prefixed hands over to its source's once its head is read.
            got = source.readinto(header_view) or 0
            if got < CMD_HEADER_SIZE:
                got += read_exact(source, header_view[got:])
                if got < CMD_HEADER_SIZE:
                    self.bytes_read = offset + got
                    where = "before the END command" if got == 0 else "inside a command header"
                    raise BtrfsStreamTruncated(f"input ended at stream byte {offset + got}, {where}")
            header = bytes(header_view)
            length, kind, crc = unpack_header(header)
            if length > limit:
                self.bytes_read = offset + CMD_HEADER_SIZE
                raise StreamFormatError(
                    f"command {_command_name(kind)} at stream byte {offset} claims {length} bytes (limit {limit}): corrupt stream"
                )
            body = bytearray(length)
            view = memoryview(body)
            got = (source.readinto(view) or 0) if length else 0
            if got < length:
                got += read_exact(source, view[got:])
                if got < length:
                    self.bytes_read = offset + CMD_HEADER_SIZE + got
                    name = _command_name(kind)
                    at = offset + CMD_HEADER_SIZE + got
                    raise BtrfsStreamTruncated(f"input ended at stream byte {at}, inside the {name} command at byte {offset}")
            # btrfs_crc32c(body, btrfs_crc32c(header with a zero crc)), with the seed inversions folded together.
            if crc32c_of(body, crc32c_of(header[:6] + _ZERO_CRC, 0xFFFFFFFF)) ^ 0xFFFFFFFF != crc:
                self.bytes_read = offset + CMD_HEADER_SIZE + length
                raise StreamIntegrityError(
                    f"crc32c mismatch in the command at stream byte {offset}: "
                    f"bytes {offset}-{offset + CMD_HEADER_SIZE + length} were corrupted in transit",
                    offset,
                )
            size = CMD_HEADER_SIZE + length
            self.bytes_read = offset + size
            attrs = native(kind, view, version) if native is not None else None
            command = Command(_CMDS[kind], attrs) if attrs is not None else decode_command(kind, view, version, offset)
            # fingerprint_extend, inline: it runs once per command.
            fingerprint = self.fingerprint = blake2b(fingerprint + header, digest_size=FINGERPRINT_SIZE).digest()
            yield StreamCommand(offset, size, command, fingerprint, header, body)
            if kind == _END:
                return
            # Read back: jump() may have moved both while the caller held the command.
            offset, fingerprint = self.bytes_read, self.fingerprint


def skip_applied(commands: Iterator[StreamCommand], offset: int, fingerprint: bytes) -> Iterator[StreamCommand]:
    """Yield the commands that end before `offset`, then stop; PrefixMismatch unless one ends exactly there with `fingerprint`.

    The fingerprint chains every command header, crc included, so a match means the same commands.
    """
    for item in commands:
        if item.end_offset < offset and item.command.kind != Cmd.END:
            yield item
            continue
        if item.end_offset == offset and item.fingerprint == fingerprint:
            return
        break
    raise PrefixMismatch(offset)


def _shown(raw: bytes) -> str:
    text = repr(raw[:80])
    return text + "..." if len(raw) > 80 else text


def safe_path_parts(raw: bytes | bytearray | memoryview) -> tuple[bytes, ...]:
    """The components of a stream path checked to stay inside the subvolume being received; () for b"" (its root).

    Refuses what could escape or alias: absolute paths, "." and ".." components, empty components
    (doubled or trailing slashes), NUL bytes, and names or paths over NAME_MAX / PATH_MAX.
    """
    raw = bytes(raw)
    if not raw:
        return ()
    if len(raw) >= PATH_MAX:
        raise StreamFormatError(f"refused path of {len(raw)} bytes: longer than PATH_MAX ({PATH_MAX} with its NUL)")
    if b"\0" in raw:
        raise StreamFormatError(f"refused path with a NUL byte: {_shown(raw)}")
    if raw.startswith(b"/"):
        raise StreamFormatError(f"refused absolute path: {_shown(raw)}")
    parts = tuple(raw.split(b"/"))
    for name in parts:
        if not name:
            raise StreamFormatError(f"refused path with an empty component: {_shown(raw)}")
        if name in (b".", b".."):
            raise StreamFormatError(f"refused path with a {name.decode()!r} component: {_shown(raw)}")
        if len(name) > NAME_MAX:
            raise StreamFormatError(f"refused path with a name of {len(name)} bytes (NAME_MAX is {NAME_MAX}): {_shown(raw)}")
    return parts
