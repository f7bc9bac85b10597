"""The btrfs send-stream codec on real streams from btrfs on loop devices, on synthetic and damaged streams, and path confinement."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from fuzz.btrfs_targets import recrc as recrc_stream
from hypothesis import given, settings
from hypothesis import strategies as st

from snapferry.btrfs.codec.commands import ATTR_SIZE, SPECS, Attr, Cmd, Command, Compression, Timespec
from snapferry.btrfs.codec.stream import (
    CMD_HEADER_SIZE,
    FINGERPRINT_START,
    MAX_COMMAND_LEN,
    BtrfsStreamReader,
    StreamCommand,
    btrfs_crc32c,
    encode_command,
    fingerprint_extend,
    safe_path_parts,
    stream_header,
)
from snapferry.errors import BtrfsStreamTruncated, StreamFormatError, StreamIntegrityError, StreamTruncated, TransferInterrupted
from snapferry_testkit.btrfs_testbed import mkfs, require_btrfs, run, snapshot, snapshot_pair, stock_sends

ALLOWED = (StreamFormatError, TransferInterrupted)

# --- real streams ------------------------------------------------------------------------------


def _populate(src: Path) -> None:
    """Every kind of inode and attribute a full stream carries."""
    (src / "data").write_bytes(bytes(range(256)) * 1200 + b"tail")
    with open(src / "sparse", "wb") as f:
        f.truncate(10 << 20)
        f.seek(5_000_000)
        f.write(b"hello")
    (src / "dir" / "sub").mkdir(parents=True)
    (src / "dir" / "sub" / "f").write_text("hi\n")
    (src / "hardlink").hardlink_to(src / "data")
    (src / "link").symlink_to("data")
    (src / "dangling").symlink_to("nowhere")
    run("mkfifo", src / "fifo")
    os.setxattr(src / "data", "user.k", b"v1")
    os.setxattr(src / "dir", "user.d", b"x")
    os.chown(src / "dir" / "sub" / "f", 1234, 5678)
    os.chmod(src / "dir" / "sub" / "f", 0o4750)


def _change(src: Path) -> None:
    """What an incremental carries: a reflink (CLONE), renames, deletes, a removed xattr, an append."""
    run("cp", "--reflink=always", src / "data", src / "data_clone")
    (src / "dir" / "sub" / "f").rename(src / "dir" / "moved")
    (src / "hardlink").unlink()
    (src / "dir").rename(src / "dir2")
    os.removexattr(src / "data", "user.k")
    with open(src / "data", "ab") as f:
        f.write(b"appended" * 700)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, bytes]]:
    """Streams from a real btrfs, made once: name -> bytes."""
    require_btrfs()
    base = tmp_path_factory.mktemp("btrfs")
    with ExitStack() as stack:
        mnt = mkfs(stack, base, "mnt", "relatime").mnt
        snapshot_pair(mnt / "src", mnt / "snap1", mnt / "snap2", _populate, _change)
        # Only extents written while compression is on are compressed, so ENCODED_WRITE needs a fresh subvolume.
        run("mount", "-o", "remount,compress=zstd", mnt)
        run("btrfs", "-q", "subvolume", "create", mnt / "csrc")
        (mnt / "csrc" / "text").write_text("snapferry compressible line\n" * 40000)
        snapshot(mnt / "csrc", mnt / "csnap")
        extra: dict[str, list[str | Path]] = {
            "compressed_v2": ["--compressed-data", mnt / "csnap"],
            "nodata_v1": ["--no-data", mnt / "snap1"],
        }
        streams = {name: path.read_bytes() for name, path in stock_sends(base, mnt / "snap1", mnt / "snap2", extra).items()}
    yield streams


def read_all(raw: bytes) -> tuple[int, list[StreamCommand]]:
    reader = BtrfsStreamReader(io.BytesIO(raw))
    commands = list(reader)
    assert reader.bytes_read == len(raw)
    return reader.version, commands


REAL = ["full_v1", "incr_v1", "full_v2", "incr_v2", "compressed_v2", "nodata_v1"]


@pytest.mark.parametrize("name", REAL)
def test_real_stream_parses_and_reencodes_byte_for_byte(real: dict[str, bytes], name: str) -> None:
    raw = real[name]
    version, commands = read_all(raw)
    assert version == (2 if name.endswith("v2") else 1)
    assert commands[-1].command.kind == Cmd.END and all(c.command.kind != Cmd.END for c in commands[:-1])
    assert commands[0].offset == 17
    assert all(a.end_offset == b.offset for a, b in zip(commands, commands[1:], strict=False))
    rebuilt = stream_header(version) + b"".join(encode_command(c.command, version) for c in commands)
    assert rebuilt == raw


def test_real_stream_kinds(real: dict[str, bytes]) -> None:
    kinds = {name: Counter(c.command.kind for c in read_all(real[name])[1]) for name in REAL}
    for name in ("full_v1", "full_v2"):
        k = kinds[name]
        assert k[Cmd.SUBVOL] == 1 and k[Cmd.SNAPSHOT] == 0
        assert k[Cmd.MKFILE] == 3 and k[Cmd.MKDIR] == 2 and k[Cmd.SYMLINK] == 2 and k[Cmd.MKFIFO] == 1 and k[Cmd.LINK] == 1
        assert k[Cmd.SET_XATTR] == 2 and k[Cmd.WRITE] >= 3 and k[Cmd.RENAME] >= 8 and k[Cmd.UTIMES] >= 8
    # v2 writes carry up to 128 KiB where v1 stops at 48 KiB, so fewer of them.
    assert kinds["full_v2"][Cmd.WRITE] < kinds["full_v1"][Cmd.WRITE]
    for name in ("incr_v1", "incr_v2"):
        k = kinds[name]
        assert k[Cmd.SNAPSHOT] == 1 and k[Cmd.CLONE] == 1 and k[Cmd.REMOVE_XATTR] == 1 and k[Cmd.UNLINK] == 2 and k[Cmd.RENAME] >= 1
    assert kinds["compressed_v2"][Cmd.ENCODED_WRITE] >= 5 and kinds["compressed_v2"][Cmd.WRITE] == 0
    assert kinds["nodata_v1"][Cmd.UPDATE_EXTENT] >= 3 and kinds["nodata_v1"][Cmd.WRITE] == 0


def test_real_stream_limits(real: dict[str, bytes]) -> None:
    v1 = max(c.size for c in read_all(real["full_v1"])[1])
    v2 = max(c.size for c in read_all(real["full_v2"])[1])
    assert CMD_HEADER_SIZE + 49152 < v1 <= CMD_HEADER_SIZE + (64 << 10)
    assert CMD_HEADER_SIZE + (128 << 10) < v2 < MAX_COMMAND_LEN


def test_real_stream_typed_fields(real: dict[str, bytes]) -> None:
    commands = [c.command for c in read_all(real["incr_v2"])[1]]
    snapshot = commands[0]
    assert snapshot.kind == Cmd.SNAPSHOT and snapshot.path == b"snap2" and snapshot.clone_ctransid < snapshot.ctransid
    clone = next(c for c in commands if c.kind == Cmd.CLONE)
    assert (clone.path, clone.clone_path, clone.file_offset, clone.clone_offset) == (b"data_clone", b"data", 0, 0)
    assert clone.clone_len == 256 * 1200 + 4 and clone.clone_uuid == snapshot.clone_uuid
    utimes = next(c for c in commands if c.kind == Cmd.UTIMES)
    # Protocol 2 adds the creation time to UTIMES.
    assert isinstance(utimes.otime, Timespec) and utimes.atime.sec > 1_600_000_000 and 0 <= utimes.mtime.nsec < 10**9
    write = next(c for c in commands if c.kind == Cmd.WRITE)
    # The append is sent from the start of the last block it touched.
    assert isinstance(write.data, memoryview) and bytes(write.data) == b"tail" + b"appended" * 700
    assert write.file_offset == 256 * 1200 and write.file_offset + len(write.data) == 256 * 1200 + 4 + 5600
    assert isinstance(write.data.obj, bytearray)  # a view of the command buffer, not a copy
    full = [c.command for c in read_all(real["full_v1"])[1]]
    f = next(c for c in full if c.kind == Cmd.CHOWN and c.path == b"dir/sub/f")
    assert (f.uid, f.gid) == (1234, 5678)
    assert next(c for c in full if c.kind == Cmd.CHMOD and c.path == b"dir/sub/f").mode == 0o4750
    xattr = next(c for c in full if c.kind == Cmd.SET_XATTR and c.path == b"data")
    assert (xattr.xattr_name, bytes(xattr.xattr_data)) == (b"user.k", b"v1")
    assert {c.path_link for c in full if c.kind == Cmd.SYMLINK} == {b"data", b"nowhere"}
    assert any(c.kind == Cmd.UTIMES and c.path == b"" for c in full)  # b"" is the subvolume's root
    encoded = [c.command for c in read_all(real["compressed_v2"])[1] if c.command.kind == Cmd.ENCODED_WRITE]
    assert all(e.compression == Compression.ZSTD and e.encryption == 0 and len(e.data) < e.unencoded_len for e in encoded)
    assert encoded[0].file_offset == 0 and encoded[0].unencoded_file_len == 128 << 10


def _dump(raw: bytes) -> list[tuple[str, str, dict[str, str]]]:
    done = subprocess.run(["btrfs", "receive", "--dump"], input=raw, capture_output=True, check=True, timeout=60)
    lines = []
    for line in done.stdout.decode().splitlines():
        name, path, *rest = line.split()
        lines.append((name, path, dict(f.rstrip(",").split("=", 1) for f in rest if "=" in f)))
    return lines


@pytest.mark.parametrize("name", REAL)
def test_real_stream_agrees_with_btrfs_receive_dump(real: dict[str, bytes], name: str) -> None:
    commands = [c.command for c in read_all(real[name])[1]]
    dump = _dump(real[name])
    assert len(dump) == len(commands) - 1  # END prints nothing
    subvol = ""
    for command, (kind, path, fields) in zip(commands, dump, strict=False):
        assert kind == command.kind.name.lower()
        if command.kind in (Cmd.SUBVOL, Cmd.SNAPSHOT):
            subvol = command.path.decode()
            assert path == f"./{subvol}" and fields["uuid"] == str(command.uuid) and int(fields["transid"]) == command.ctransid
            continue
        assert path == f"./{subvol}/{command.path.decode()}"
        if command.kind == Cmd.RENAME:
            assert fields["dest"] == f"./{subvol}/{command.path_to.decode()}"
        elif command.kind in (Cmd.LINK, Cmd.SYMLINK):
            assert fields["dest"] == command.path_link.decode()
        elif command.kind in (Cmd.WRITE, Cmd.ENCODED_WRITE):
            assert (int(fields["offset"]), int(fields["len"])) == (command.file_offset, len(command.data))
        elif command.kind == Cmd.CLONE:
            assert (int(fields["offset"]), int(fields["len"]), int(fields["clone_offset"])) == (
                command.file_offset,
                command.clone_len,
                command.clone_offset,
            )
            assert fields["from"] == f"./{subvol}/{command.clone_path.decode()}"
        elif command.kind in (Cmd.TRUNCATE,):
            assert int(fields["size"]) == command.size
        elif command.kind == Cmd.UPDATE_EXTENT:
            assert (int(fields["offset"]), int(fields["len"])) == (command.file_offset, command.size)
        elif command.kind == Cmd.CHMOD:
            assert int(fields["mode"], 8) == command.mode
        elif command.kind == Cmd.CHOWN:
            assert (int(fields["uid"]), int(fields["gid"])) == (command.uid, command.gid)
        elif command.kind in (Cmd.SET_XATTR, Cmd.REMOVE_XATTR):
            assert fields["name"] == command.xattr_name.decode()
        if command.kind == Cmd.ENCODED_WRITE:
            assert int(fields["unencoded_len"]) == command.unencoded_len and int(fields["compression"]) == command.compression


def test_fingerprint_chains_over_command_headers(real: dict[str, bytes]) -> None:
    raw = real["incr_v1"]
    _, commands = read_all(raw)
    fp = fingerprint_extend(FINGERPRINT_START, raw[:17])
    for c in commands:
        fp = fingerprint_extend(fp, raw[c.offset : c.offset + CMD_HEADER_SIZE])
        assert c.fingerprint == fp
    assert [c.fingerprint for c in read_all(raw)[1]] == [c.fingerprint for c in commands]
    other = read_all(real["incr_v2"])[1]
    assert other[0].fingerprint != commands[0].fingerprint  # the stream header (version) is in it
    assert len(set(c.fingerprint for c in commands)) == len(commands)


# --- damage --------------------------------------------------------------------------------------


def test_crc_matches_bitwise_definition() -> None:
    def reference(data: bytes) -> int:
        crc = 0  # seed 0, no final inversion
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        return crc

    for data in (b"", b"a", b"123456789", bytes(range(256)) * 3):
        assert btrfs_crc32c(data) == reference(data)
    assert btrfs_crc32c(b"6789", btrfs_crc32c(b"12345")) == btrfs_crc32c(b"123456789")


def test_corrupted_byte_is_an_integrity_error_at_its_command(real: dict[str, bytes]) -> None:
    raw = real["full_v1"]
    _, commands = read_all(raw)
    write = next(c for c in commands if c.command.kind == Cmd.WRITE)
    bad = bytearray(raw)
    bad[write.offset + 100] ^= 0x10
    with pytest.raises(StreamIntegrityError) as e:
        read_all(bytes(bad))
    assert e.value.verified_to == write.offset
    assert str(e.value) == (
        f"crc32c mismatch in the command at stream byte {write.offset}: bytes {write.offset}-{write.end_offset} were corrupted in transit"
    )


def test_every_truncation_is_reported_with_its_offset(real: dict[str, bytes]) -> None:
    raw = real["incr_v1"]
    _, commands = read_all(raw)
    starts = {c.offset for c in commands}
    for cut in range(1, len(raw)):
        with pytest.raises(BtrfsStreamTruncated) as e:
            read_all(raw[:cut])
        assert isinstance(e.value, StreamTruncated) and isinstance(e.value, TransferInterrupted)
        if cut in starts:
            assert str(e.value) == f"input ended at stream byte {cut}, before the END command"
        elif cut > 17:
            assert f"input ended at stream byte {cut}, inside" in str(e.value)
    with pytest.raises(StreamFormatError, match=r"^no btrfs send stream on input \(it was empty\)$"):
        read_all(b"")


def _frame(kind: int, body: bytes) -> bytes:
    header = struct.pack("<IHI", len(body), kind, 0)
    return struct.pack("<IHI", len(body), kind, btrfs_crc32c(header + body)) + body


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"btrfs-stream\0" + (3).to_bytes(4, "little"), "btrfs send stream version 3 is not supported (only 1 and 2)"),
        (b"btrfs-stream\0" + (0).to_bytes(4, "little"), "btrfs send stream version 0 is not supported (only 1 and 2)"),
        (b"ZFS stream, not btrfs", "no btrfs-stream magic at the start of input: not a btrfs send stream"),
        (stream_header(2) + _frame(26, b""), "unknown btrfs send command ENABLE_VERITY (protocol 3) at stream byte 17"),
        (stream_header(2) + _frame(99, b""), "unknown btrfs send command 99 at stream byte 17"),
        (stream_header(1) + _frame(0, b""), "unknown btrfs send command 0 at stream byte 17"),
        (
            stream_header(2) + _frame(Cmd.UNLINK, struct.pack("<HH", 40, 1) + b"x"),
            "unknown attribute 40 in the UNLINK command at stream byte 17",
        ),
        (
            stream_header(2) + _frame(Cmd.UNLINK, struct.pack("<HH", Attr.PATH, 9) + b"x"),
            "PATH attribute of 9 bytes overruns the UNLINK command at stream byte 17",
        ),
        (
            stream_header(2) + _frame(Cmd.UNLINK, struct.pack("<HH", Attr.PATH, 1) + b"x" + b"\x0f"),
            "UNLINK command at stream byte 17 ends inside an attribute header",
        ),
        (stream_header(2) + _frame(Cmd.UNLINK, b""), "UNLINK command has no PATH attribute at stream byte 17"),
        (
            stream_header(2) + _frame(Cmd.UNLINK, (struct.pack("<HH", Attr.PATH, 1) + b"x") * 2),
            "PATH attribute twice in the UNLINK command at stream byte 17",
        ),
        (
            stream_header(2) + _frame(Cmd.TRUNCATE, struct.pack("<HH", Attr.PATH, 1) + b"x" + struct.pack("<HH", Attr.SIZE, 4) + bytes(4)),
            "SIZE attribute of 4 bytes in a TRUNCATE command (expected 8) at stream byte 17",
        ),
        (
            stream_header(2) + _frame(Cmd.RMDIR, struct.pack("<HH", Attr.PATH, 1) + b"x" + struct.pack("<HH", Attr.MODE, 8) + bytes(8)),
            "RMDIR command carries an unexpected MODE attribute at stream byte 17",
        ),
        (
            stream_header(1) + encode_command(Command.build(Cmd.FILEATTR, path=b"f", fileattr=1), 2),
            "FILEATTR command at stream byte 17 in a version 1 stream (it needs version 2)",
        ),
        (
            stream_header(1) + struct.pack("<IHI", (64 << 10) + 1, Cmd.WRITE, 0),
            "command WRITE at stream byte 17 claims 65537 bytes (limit 65536): corrupt stream",
        ),
        (
            stream_header(2) + struct.pack("<IHI", 0xFFFFFFFF, Cmd.WRITE, 0),
            f"command WRITE at stream byte 17 claims {0xFFFFFFFF} bytes (limit {MAX_COMMAND_LEN}): corrupt stream",
        ),
    ],
)
def test_format_errors_name_what_is_wrong(stream: bytes, message: str) -> None:
    with pytest.raises(StreamFormatError) as e:
        list(BtrfsStreamReader(io.BytesIO(stream + _frame(Cmd.END, b""))))
    assert str(e.value) == message
    assert not isinstance(e.value, StreamIntegrityError)


def test_header_truncated_inside_magic_is_truncation() -> None:
    with pytest.raises(BtrfsStreamTruncated, match=r"^input ended inside the btrfs stream header \(15 of 17 bytes\)$"):
        read_all(stream_header(1)[:15])


# --- synthetic streams (hypothesis) ----------------------------------------------------------------


def _value(attr: Attr) -> st.SearchStrategy[bytes]:
    size = ATTR_SIZE[attr]
    if size is not None:
        return st.binary(min_size=size, max_size=size)
    return st.binary(max_size=300)


@st.composite
def commands(draw: st.DrawFn, version: int) -> Command:
    kinds = [k for k in Cmd if k != Cmd.END and (version >= 2 or k < Cmd.FALLOCATE)]
    kind = draw(st.sampled_from(kinds))
    spec = SPECS[kind]
    attrs = list(spec.required) + [a for a in spec.optional if draw(st.booleans())]
    attrs = draw(st.permutations(attrs))
    if Attr.DATA in attrs:
        attrs = [a for a in attrs if a != Attr.DATA] + [Attr.DATA]
    values = {a: draw(_value(a)) for a in attrs}
    if Attr.DATA in values and version >= 2 and draw(st.booleans()):
        values[Attr.DATA] = draw(st.binary(min_size=1, max_size=8)) * 9000  # over a TLV's 16-bit length
    return Command(kind, values)


@st.composite
def streams(draw: st.DrawFn) -> tuple[int, list[Command]]:
    version = draw(st.sampled_from([1, 2]))
    return version, draw(st.lists(commands(version), max_size=12)) + [Command(Cmd.END, {})]


@settings(max_examples=300, deadline=2000)
@given(streams())
def test_synthetic_streams_round_trip(stream: tuple[int, list[Command]]) -> None:
    version, sent = stream
    raw = stream_header(version) + b"".join(encode_command(c, version) for c in sent)
    got_version, got = read_all(raw)
    assert got_version == version
    assert [c.command for c in got] == sent
    assert stream_header(version) + b"".join(encode_command(c.command, version) for c in got) == raw


def _drain(data: bytes) -> None:
    start = time.monotonic()
    try:
        for _ in BtrfsStreamReader(io.BytesIO(data)):
            pass
    except ALLOWED:
        pass
    assert time.monotonic() - start < 1.0


@settings(max_examples=500, deadline=2000)
@given(st.binary(max_size=400), st.sampled_from([b"", stream_header(1), stream_header(2)]))
def test_arbitrary_bytes_raise_only_stream_errors(data: bytes, prefix: bytes) -> None:
    _drain(prefix + data)


@settings(max_examples=500, deadline=3000)
@given(
    st.sampled_from(["incr_v1", "incr_v2", "compressed_v2"]),
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=6),
    st.booleans(),
    st.integers(0, 1 << 20),
)
def test_mutated_real_streams_raise_only_stream_errors(
    real: dict[str, bytes], name: str, flips: list[tuple[int, int]], recrc: bool, cut: int
) -> None:
    raw = bytearray(real[name])
    for pos, xor in flips:
        raw[pos % len(raw)] ^= xor
    data = bytes(raw)
    if recrc:
        data = recrc_stream(data)
    _drain(data[: len(data) - cut % 64])


# --- encoder --------------------------------------------------------------------------------------


def test_build_and_encode_checks() -> None:
    write = Command.build(Cmd.WRITE, path="f", file_offset=4096, data=b"x" * 70_000)
    assert write.file_offset == 4096 and write.path == b"f" and len(write.data) == 70_000
    with pytest.raises(StreamFormatError, match=r"^DATA attribute of 70000 bytes does not fit a TLV \(at most 65535\)$"):
        encode_command(write, 1)
    with pytest.raises(StreamFormatError, match=r"^WRITE command has no DATA attribute$"):
        Command.build(Cmd.WRITE, path="f", file_offset=0)
    with pytest.raises(StreamFormatError, match=r"^DATA is not the last attribute of a WRITE command \(protocol 2 requires it\)$"):
        encode_command(Command(Cmd.WRITE, {Attr.DATA: b"x", Attr.PATH: b"f", Attr.FILE_OFFSET: bytes(8)}), 2)
    with pytest.raises(StreamFormatError, match=r"^FALLOCATE command cannot be sent in a version 1 stream$"):
        encode_command(Command.build(Cmd.FALLOCATE, path="f", fallocate_mode=1, file_offset=0, size=10), 1)
    with pytest.raises(StreamFormatError, match=r"^btrfs send stream version 3 is not supported \(only 1 and 2\)$"):
        stream_header(3)
    times = Command.build(Cmd.UTIMES, path=b"", atime=Timespec(1, 2), mtime=Timespec(3, 4), ctime=Timespec(5, 999_999_999))
    assert times.ctime.ns == 5_999_999_999
    enc = Command.build(Cmd.ENCODED_WRITE, path="f", file_offset=0, unencoded_file_len=8, unencoded_len=8, unencoded_offset=0, data=b"z")
    assert (enc.compression, enc.encryption) == (Compression.NONE, 0)  # absent means none
    with pytest.raises(StreamFormatError, match=r"^SYMLINK command has no CLONE_PATH attribute$"):
        _ = Command.build(Cmd.SYMLINK, path="l", ino=257, path_link="t").clone_path


# --- path confinement -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "."),
        (b"a", "a"),
        (b"dir2/sub/f", "dir2/sub/f"),
        (b"o257-7-0", "o257-7-0"),
        (b"...", "..."),
        (b"a/..b/c..", "a/..b/c.."),
        (b"caf\xc3\xa9", "caf\u00e9"),
        (b"bad\xff", "bad\udcff"),
        (b"n" * 255, "n" * 255),
        (b"/".join([b"d" * 255] * 16)[:4095].rstrip(b"/"), None),
    ],
)
def test_safe_path_parts_accepts(raw: bytes, expected: str | None) -> None:
    parts = safe_path_parts(raw)
    assert b"/".join(parts) == raw and all(parts)
    assert (os.fsdecode(b"/".join(parts)) or ".") == (expected if expected is not None else raw.decode())


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"/etc/passwd", "refused absolute path: b'/etc/passwd'"),
        (b"/", "refused absolute path: b'/'"),
        (b"..", "refused path with a '..' component: b'..'"),
        (b"a/../../etc", "refused path with a '..' component: b'a/../../etc'"),
        (b"a/..", "refused path with a '..' component: b'a/..'"),
        (b".", "refused path with a '.' component: b'.'"),
        (b"./a", "refused path with a '.' component: b'./a'"),
        (b"a//b", "refused path with an empty component: b'a//b'"),
        (b"a/", "refused path with an empty component: b'a/'"),
        (b"a\0b", "refused path with a NUL byte: b'a\\x00b'"),
        (b"n" * 256, f"refused path with a name of 256 bytes (NAME_MAX is 255): {(b'n' * 80)!r}..."),
        (b"d/" * 2048, "refused path of 4096 bytes: longer than PATH_MAX (4096 with its NUL)"),
    ],
)
def test_safe_path_parts_refuses(raw: bytes, message: str) -> None:
    with pytest.raises(StreamFormatError) as e:
        safe_path_parts(raw)
    assert str(e.value) == message
