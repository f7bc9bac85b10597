"""The btrfs fuzz targets: send streams (as sent, and with every crc made right so damage reaches the attribute
parser), snapferry's continuation framing, btrfs resume tokens; their oracles and seeds."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import asdict
from uuid import UUID

from fuzz.contract import attempt as _attempt
from fuzz.contract import check, outcome
from snapferry.btrfs.codec.commands import Cmd, Command, Timespec
from snapferry.btrfs.codec.stream import (
    CMD_HEADER_SIZE,
    CONTINUATION_SIZE,
    STREAM_HEADER_SIZE,
    BtrfsStreamReader,
    Continuation,
    StreamCommand,
    btrfs_crc32c,
    encode_command,
    safe_path_parts,
    stream_header,
)
from snapferry.btrfs.engine.naming import BTRFS_TOKEN_PREFIX
from snapferry.btrfs.resume.checkpoints import BtrfsToken
from snapferry.errors import BtrfsStreamTruncated, MalformedBtrfsToken, StreamFormatError

BTRFS_ERRORS = (StreamFormatError, BtrfsStreamTruncated)
# Input marker bytes: the rest as is, or the rest with every command's crc32c made right.
AS_IS, RECRC = 0, 1
_PATH_ATTRS = ("path", "path_to", "path_link", "clone_path")


def recrc(data: bytes) -> bytes:
    """Every whole command's crc32c set to match its bytes, so that damage gets past the crc check."""
    out = bytearray(data)
    pos = STREAM_HEADER_SIZE
    while pos + CMD_HEADER_SIZE <= len(out):
        (length,) = struct.unpack_from("<I", out, pos)
        end = pos + CMD_HEADER_SIZE + length
        if end > len(out):
            break
        out[pos + 6 : pos + 10] = bytes(4)
        out[pos + 6 : pos + 10] = btrfs_crc32c(out[pos:end]).to_bytes(4, "little")
        pos = end
    return bytes(out)


def _check_commands(items: list[StreamCommand], version: int, data: bytes, start: int, first_offset: int) -> None:
    """Contiguous from first_offset, each the exact bytes of its input once re-encoded, END last, paths confined or refused."""
    offset = first_offset
    pos = start
    for item in items:
        check(item.offset == offset, f"command at {item.offset}, expected {offset}")
        raw = data[pos : pos + item.size]
        check(encode_command(item.command, version) == raw, f"{item.command.kind.name} at {offset} does not encode back to its bytes")
        for name in _PATH_ATTRS:
            try:
                value = getattr(item.command, name)
            except StreamFormatError:
                continue
            _attempt((StreamFormatError,), lambda value=value: safe_path_parts(value))
        offset += item.size
        pos += item.size
    check(bool(items) and items[-1].command.kind == Cmd.END, "a parse that did not end with END")


def _read(data: bytes) -> tuple[list[StreamCommand], int]:
    reader = BtrfsStreamReader(io.BytesIO(data))
    items = list(reader)
    return items, reader.version


def run_btrfs_stream(data: bytes) -> str:
    """The input after a marker byte (AS_IS or RECRC) as a whole btrfs send stream."""
    stream = recrc(data[1:]) if data[:1] == bytes([RECRC]) else data[1:]
    parsed, error = _attempt(BTRFS_ERRORS, lambda: _read(stream))
    if parsed is not None:
        items, version = parsed
        _check_commands(items, version, stream, STREAM_HEADER_SIZE, STREAM_HEADER_SIZE)
    return outcome(error)


def _read_continuation(data: bytes) -> tuple[Continuation, list[StreamCommand], int]:
    continuation = Continuation.decode(data[:STREAM_HEADER_SIZE], data[STREAM_HEADER_SIZE:CONTINUATION_SIZE])
    reader = BtrfsStreamReader(io.BytesIO(data[CONTINUATION_SIZE:]))
    commands = iter(reader)
    first = next(commands)
    reader.jump(continuation.offset, continuation.fingerprint)
    return continuation, [first, *commands], reader.version


def run_btrfs_continuation(data: bytes) -> str:
    """The input after a marker byte as a continuation: its header, the stream's header and first command, the rest."""
    marker, body = data[:1], data[1:]
    stream = body[:CONTINUATION_SIZE] + recrc(body[CONTINUATION_SIZE:]) if marker == bytes([RECRC]) else body
    parsed, error = _attempt(BTRFS_ERRORS, lambda: _read_continuation(stream))
    if parsed is not None:
        continuation, items, version = parsed
        first, rest = items[0], items[1:]
        # Which kind it is the receiver checks (it must name a subvolume), not the framing.
        check(first.offset == STREAM_HEADER_SIZE, f"continuation's first command at {first.offset}")
        if rest:
            body = stream[CONTINUATION_SIZE:]
            _check_commands(rest, version, body, STREAM_HEADER_SIZE + first.size, continuation.offset)
    return outcome(error)


def btrfs_token_text(data: bytes) -> str:
    if data[:1] == bytes([RECRC]):  # the body under the checksum, as for sf1 tokens
        body = data[1:]
        return f"{BTRFS_TOKEN_PREFIX}{base64.urlsafe_b64encode(zlib.compress(body, 9)).decode().rstrip('=')}-{zlib.crc32(body):08x}"
    return data.decode("utf-8", "surrogateescape")


def run_btrfs_token(data: bytes) -> str:
    text = btrfs_token_text(data)
    token, error = _attempt((MalformedBtrfsToken,), lambda: BtrfsToken.decode(text))
    if token is not None:
        check(BtrfsToken.decode(token.encode()) == token, "btrfs token does not survive encode and decode")
    return outcome(error)


# --- seeds ----------------------------------------------------------------------------------------------

_UUID = UUID("8ee5f67c-154c-204b-ab6a-782898311757")
_PARENT = UUID("0015160d-ce06-c24b-9f0c-de02fd1e5e9a")


def _commands(version: int, incremental: bool) -> list[Command]:
    t = Timespec(1_700_000_000, 123_456_789)
    begin = (
        Command.build(Cmd.SNAPSHOT, path="day2", uuid=_UUID, ctransid=42, clone_uuid=_PARENT, clone_ctransid=40)
        if incremental
        else Command.build(Cmd.SUBVOL, path="day1", uuid=_UUID, ctransid=42)
    )
    commands = [
        begin,
        Command.build(Cmd.MKDIR, path="o257-7-0", ino=257),
        Command.build(Cmd.RENAME, path="o257-7-0", path_to="dir"),
        Command.build(Cmd.MKFILE, path="o258-7-0", ino=258),
        Command.build(Cmd.RENAME, path="o258-7-0", path_to="dir/file"),
        Command.build(Cmd.WRITE, path="dir/file", file_offset=0, data=b"snapferry " * 50),
        Command.build(
            Cmd.CLONE,
            path="dir/file",
            file_offset=4096,
            clone_len=4096,
            clone_uuid=_UUID,
            clone_ctransid=42,
            clone_path="dir/file",
            clone_offset=0,
        ),
        Command.build(Cmd.SET_XATTR, path="dir/file", xattr_name="user.k", xattr_data=b"v"),
        Command.build(Cmd.SYMLINK, path="link", ino=259, path_link="../../etc/passwd"),
        Command.build(Cmd.LINK, path="hard", path_link="dir/file"),
        Command.build(Cmd.TRUNCATE, path="dir/file", size=9000),
        Command.build(Cmd.CHOWN, path="dir/file", uid=1000, gid=100),
        Command.build(Cmd.CHMOD, path="dir/file", mode=0o4755),
        Command.build(Cmd.UTIMES, path="dir/file", atime=t, mtime=t, ctime=t),
        Command.build(Cmd.UNLINK, path="old"),
        Command.build(Cmd.RMDIR, path="gone"),
    ]
    if version >= 2:
        commands += [
            Command.build(Cmd.FALLOCATE, path="dir/file", fallocate_mode=1, file_offset=0, size=4096),
            Command.build(Cmd.FILEATTR, path="dir/file", fileattr=1 << 9),
            Command.build(
                Cmd.ENCODED_WRITE,
                path="dir/file",
                file_offset=0,
                unencoded_file_len=4096,
                unencoded_len=4096,
                unencoded_offset=0,
                compression=1,
                data=zlib.compress(b"z" * 4096),
            ),
        ]
    return [*commands, Command.build(Cmd.UTIMES, path="", atime=t, mtime=t, ctime=t), Command.build(Cmd.END)]


def synthetic_stream(version: int, incremental: bool) -> bytes:
    return stream_header(version) + b"".join(encode_command(c, version) for c in _commands(version, incremental))


def btrfs_stream_seeds() -> tuple[bytes, ...]:
    streams = [synthetic_stream(v, incremental) for v in (1, 2) for incremental in (False, True)]
    return (*(bytes([AS_IS]) + s for s in streams), *(bytes([RECRC]) + s for s in streams), bytes([AS_IS]) + streams[0] * 2)


def btrfs_continuation_seeds() -> tuple[bytes, ...]:
    out = []
    for version in (1, 2):
        stream = synthetic_stream(version, True)
        items = list(BtrfsStreamReader(io.BytesIO(stream)))
        cut = items[len(items) // 2]
        first = items[0]
        head = stream[: first.end_offset]
        out.append(Continuation(cut.end_offset, cut.fingerprint).encode() + head + stream[cut.end_offset :])
    return tuple(bytes([marker]) + c for c in out for marker in (AS_IS, RECRC))


def btrfs_token_seeds() -> tuple[bytes, ...]:
    tokens = [
        BtrfsToken("day1", _UUID.hex, 42, "0" * 32, 3, 1 << 28, "00112233445566778899aabbccddeeff"),
        BtrfsToken("a b.c", _UUID.hex, (1 << 64) - 1, _PARENT.hex, 999_999, 1 << 50, "f" * 32),
    ]
    return (*(t.encode().encode() for t in tokens), *(bytes([RECRC]) + json.dumps(asdict(t)).encode() for t in tokens))
