"""The btrfs part of the damaged-input corpus: send streams, continuations and sf1b tokens (synthetic, no file system needed)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import asdict
from typing import Protocol

from fuzz.btrfs_targets import recrc, synthetic_stream

from snapferry.btrfs.codec.commands import Cmd, Command
from snapferry.btrfs.codec.stream import CMD_HEADER_SIZE, BtrfsStreamReader, Continuation, encode_command, stream_header
from snapferry.btrfs.resume.checkpoints import BtrfsToken


class CaseType(Protocol):
    def __call__(self, name: str, target: str, exception: str, message: str, data: bytes) -> object: ...


def _offsets(stream: bytes) -> dict[str, int]:
    """Where the first command of each kind starts."""
    found: dict[str, int] = {}
    for item in BtrfsStreamReader(io.BytesIO(stream)):
        found.setdefault(item.command.kind.name, item.offset)
    return found


def _command(kind: int, body: bytes) -> bytes:
    """A command of any kind number with a correct crc32c."""
    return recrc(stream_header(1) + struct.pack("<IHI", len(body), kind, 0) + body)[17:]


def _token(body: bytes) -> bytes:
    return f"sf1b-{base64.urlsafe_b64encode(zlib.compress(body, 9)).decode().rstrip('=')}-{zlib.crc32(body):08x}\n".encode()


def btrfs_cases(case: CaseType) -> list[object]:
    v1 = synthetic_stream(1, False)
    at = _offsets(v1)
    end = at["END"]
    write = at["WRITE"]
    flipped = bytearray(v1)
    flipped[write + CMD_HEADER_SIZE + 40] ^= 0x10
    oversized = bytearray(v1)
    struct.pack_into("<I", oversized, write, 0xFFFFFFF0)
    encoded = Command.build(
        Cmd.ENCODED_WRITE, path="f", file_offset=0, unencoded_file_len=1, unencoded_len=1, unencoded_offset=0, compression=1, data=b"x"
    )
    v2_in_v1 = v1[:end] + recrc(stream_header(2) + encode_command(encoded, 2))[17:] + v1[end:]
    overrun = bytearray(_command(Cmd.UNLINK, struct.pack("<HH", 15, 200) + b"short"))
    twice = _command(Cmd.UNLINK, struct.pack("<HH", 15, 1) + b"a" + struct.pack("<HH", 15, 1) + b"b")
    dotdot = v1[:end] + encode_command(Command.build(Cmd.UNLINK, path="dir/../../etc/passwd"), 1) + v1[end:]
    absolute = v1[:end] + encode_command(Command.build(Cmd.MKFILE, path="/etc/cron.d/x", ino=300), 1) + v1[end:]
    items = list(BtrfsStreamReader(io.BytesIO(v1)))
    cut = items[len(items) // 2]
    continuation = Continuation(cut.end_offset, cut.fingerprint).encode() + v1[: items[0].end_offset] + v1[cut.end_offset :]
    token = BtrfsToken("day1", "8ee5f67c154c204bab6a782898311757", 42, "0" * 32, 3, 1 << 28, "00112233445566778899aabbccddeeff")
    body = json.dumps(asdict(token)).encode()
    wrong_type = json.dumps(dict(asdict(token), offset="1000")).encode()
    escaping = json.dumps(dict(asdict(token), subvolume="../etc")).encode()
    good = token.encode()
    return [
        case(
            "btrfs-not-a-stream.bin", "btrfs-stream", "StreamFormatError", r"^no btrfs-stream magic at the start of input", b"ZFS?" + v1[4:]
        ),
        case(
            "btrfs-version-3.bin",
            "btrfs-stream",
            "StreamFormatError",
            r"^btrfs send stream version 3 is not supported",
            stream_header(1)[:13] + b"\3\0\0\0" + v1[17:],
        ),
        case(
            "btrfs-crc-mismatch.bin",
            "btrfs-stream",
            "StreamIntegrityError",
            rf"^crc32c mismatch in the command at stream byte {write}: ",
            bytes(flipped),
        ),
        case(
            "btrfs-oversized-length.bin",
            "btrfs-stream",
            "StreamFormatError",
            r"claims 4294967280 bytes \(limit 65536\): corrupt stream$",
            bytes(oversized),
        ),
        case(
            "btrfs-unknown-command.bin",
            "btrfs-stream",
            "StreamFormatError",
            r"^unknown btrfs send command 99 at stream byte 67$",
            v1[:67] + _command(99, b"") + v1[67:],
        ),
        case(
            "btrfs-verity-command.bin",
            "btrfs-stream",
            "StreamFormatError",
            r"^unknown btrfs send command ENABLE_VERITY \(protocol 3\)",
            v1[:67] + _command(26, b"") + v1[67:],
        ),
        case(
            "btrfs-v2-command-in-v1.bin",
            "btrfs-stream",
            "StreamFormatError",
            r"^ENCODED_WRITE command at stream byte \d+ in a version 1 stream",
            v2_in_v1,
        ),
        case(
            "btrfs-attribute-overrun.bin",
            "btrfs-stream",
            "StreamFormatError",
            r"^PATH attribute of 200 bytes overruns the UNLINK command",
            v1[:67] + bytes(overrun) + v1[67:],
        ),
        case(
            "btrfs-attribute-twice.bin",
            "btrfs-stream",
            "StreamFormatError",
            r"^PATH attribute twice in the UNLINK command",
            v1[:67] + twice + v1[67:],
        ),
        case(
            "btrfs-truncated.bin",
            "btrfs-stream",
            "BtrfsStreamTruncated",
            rf"^input ended at stream byte {write + 100}, inside the WRITE command at byte {write}$",
            v1[: write + 100],
        ),
        case(
            "btrfs-no-end.bin",
            "btrfs-stream",
            "BtrfsStreamTruncated",
            rf"^input ended at stream byte {end}, before the END command$",
            v1[:end],
        ),
        case(
            "btrfs-path-dotdot.bin",
            "btrfs-paths",
            "StreamFormatError",
            r"^refused path with a '\.\.' component: b'dir/\.\./\.\./etc/passwd'$",
            dotdot,
        ),
        case("btrfs-path-absolute.bin", "btrfs-paths", "StreamFormatError", r"^refused absolute path: b'/etc/cron\.d/x'$", absolute),
        case(
            "btrfs-continuation-cut.bin",
            "btrfs-continuation",
            "BtrfsStreamTruncated",
            r"^input ended inside the continuation header \(30 of 41 bytes\)$",
            continuation[:30],
        ),
        case(
            "btrfs-continuation-no-stream.bin",
            "btrfs-continuation",
            "StreamFormatError",
            r"^no btrfs-stream magic at the start of input",
            continuation[:41] + b"garbage" * 5,
        ),
        case(
            "token-sf1b-bad-crc.txt",
            "btrfs-token",
            "MalformedBtrfsToken",
            r"^malformed token: it was damaged in copying",
            good[:-3].encode() + b"000\n",
        ),
        case(
            "token-sf1b-wrong-type.txt",
            "btrfs-token",
            "MalformedBtrfsToken",
            r"^malformed token: a field has the wrong type or form$",
            _token(wrong_type),
        ),
        case(
            "token-sf1b-subvolume-escape.txt",
            "btrfs-token",
            "MalformedBtrfsToken",
            r"^malformed token: its subvolume name is not one path component$",
            _token(escaping),
        ),
        case(
            "token-sf1b-not-json.txt",
            "btrfs-token",
            "MalformedBtrfsToken",
            r"^malformed token: it was damaged in copying",
            _token(body[:-5]),
        ),
    ]
