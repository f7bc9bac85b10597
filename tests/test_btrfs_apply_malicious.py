"""snapferry's btrfs applier on crafted streams: confinement, refusals, synthetic commands and error mapping."""

from __future__ import annotations

import io
import os
import stat
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from snapferry.btrfs.codec.commands import Cmd, Command, Timespec
from snapferry.btrfs.codec.stream import encode_command, stream_header
from snapferry.btrfs.engine import ioctl as ioc
from snapferry.btrfs.engine.apply import BtrfsApplier
from snapferry.errors import BtrfsApplyError, OutOfSpace, StreamFormatError, UnsafeStream
from snapferry_testkit.btrfs_testbed import NS, encoded_extents, fs_flags, mkfs, require_btrfs, run, segments


@dataclass
class Evil:
    mnt: Path
    target: Path
    outside_uuid: UUID


@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Evil]:
    require_btrfs()
    with ExitStack() as stack:
        mnt = mkfs(stack, tmp_path_factory.mktemp("evil"), "evil").mnt
        (mnt / "target").mkdir()
        (mnt / "canary").mkdir()
        (mnt / "canary" / "secret").write_bytes(b"do not touch")
        os.setxattr(mnt / "canary" / "secret", "user.c", b"1")
        run("btrfs", "-q", "subvolume", "create", mnt / "outside")
        (mnt / "outside" / "secret").write_bytes(b"outside secret " * 1000)
        outside_uuid = uuid4()
        fd = os.open(mnt / "outside", os.O_RDONLY)
        try:
            ioc.set_received_subvol(fd, outside_uuid, 5)
        finally:
            os.close(fd)
        yield Evil(mnt, mnt / "target", outside_uuid)


def _outside_state(e: Evil) -> dict[str, object]:
    state: dict[str, object] = {}
    for path in sorted(e.mnt.rglob("*")):
        if path == e.target or e.target in path.parents:
            continue
        st = os.lstat(path)
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        state[str(path)] = (st.st_mode, st.st_uid, st.st_mtime_ns, st.st_size, content, os.listxattr(path, follow_symlinks=False))
    return state


def _stream(*commands: Command, version: int = 2) -> io.BytesIO:
    return io.BytesIO(stream_header(version) + b"".join(encode_command(c, version) for c in [*commands, Command(Cmd.END, {})]))


def _subvol_cmd(name: str) -> Command:
    return Command.build(Cmd.SUBVOL, path=name, uuid=uuid4(), ctransid=9)


_T = Timespec(1, 2)


def _cases(e: Evil) -> list[tuple[str, list[Command], type[Exception], str]]:
    canary = str(e.mnt / "canary")
    b = Command.build
    big = 1 << 63
    return [
        ("dotdot", [b(Cmd.MKFILE, path="../escape", ino=257)], StreamFormatError, "refused path with a '..' component: b'../escape'"),
        ("absolute", [b(Cmd.MKFILE, path=f"{canary}/x", ino=257)], StreamFormatError, f"refused absolute path: b'{canary}/x'"),
        (
            "dir_symlink",
            [b(Cmd.SYMLINK, path="ln", ino=257, path_link=canary), b(Cmd.WRITE, path="ln/secret", file_offset=0, data=b"pwned")],
            UnsafeStream,
            "refused WRITE ln/secret: ln is a symlink",
        ),
        (
            "dir_symlink_up",
            [b(Cmd.SYMLINK, path="up", ino=257, path_link="../../canary"), b(Cmd.MKFILE, path="up/new", ino=258)],
            UnsafeStream,
            "refused MKFILE up/new: up is a symlink",
        ),
        (
            "file_symlink",
            [b(Cmd.SYMLINK, path="lf", ino=257, path_link=f"{canary}/secret"), b(Cmd.WRITE, path="lf", file_offset=0, data=b"pwned")],
            UnsafeStream,
            "refused WRITE lf: it is a symlink",
        ),
        (
            "truncate_symlink",
            [b(Cmd.SYMLINK, path="lf", ino=257, path_link=f"{canary}/secret"), b(Cmd.TRUNCATE, path="lf", size=0)],
            UnsafeStream,
            "refused TRUNCATE lf: it is a symlink",
        ),
        (
            "chmod_symlink",
            [b(Cmd.SYMLINK, path="lf", ino=257, path_link=f"{canary}/secret"), b(Cmd.CHMOD, path="lf", mode=0o777)],
            UnsafeStream,
            "refused CHMOD lf: it is a symlink",
        ),
        (
            "write_device",
            [
                b(Cmd.MKNOD, path="disk", ino=257, mode=stat.S_IFCHR | 0o600, rdev=os.makedev(1, 3)),
                b(Cmd.WRITE, path="disk", file_offset=0, data=b"to a device"),
            ],
            UnsafeStream,
            "refused WRITE disk: it is not a regular file",
        ),
        (
            "write_fifo",
            [b(Cmd.MKFIFO, path="p", ino=257), b(Cmd.WRITE, path="p", file_offset=0, data=b"would block")],
            UnsafeStream,
            "refused WRITE p: it is not a regular file",
        ),
        (
            "rename_through_symlink",
            [
                b(Cmd.SYMLINK, path="ln", ino=257, path_link=canary),
                b(Cmd.MKFILE, path="f", ino=258),
                b(Cmd.RENAME, path="f", path_to="ln/planted"),
            ],
            UnsafeStream,
            "refused RENAME ln/planted: ln is a symlink",
        ),
        (
            "link_through_symlink",
            [
                b(Cmd.SYMLINK, path="ln", ino=257, path_link=canary),
                b(Cmd.LINK, path="stolen", path_link="ln/secret"),
            ],
            UnsafeStream,
            "refused LINK ln/secret: ln is a symlink",
        ),
        (
            "clone_from_outside",
            [
                b(Cmd.MKFILE, path="f", ino=257),
                b(
                    Cmd.CLONE,
                    path="f",
                    file_offset=0,
                    clone_len=4096,
                    clone_uuid=e.outside_uuid,
                    clone_ctransid=5,
                    clone_path="secret",
                    clone_offset=0,
                ),
            ],
            UnsafeStream,
            f"refused CLONE f from secret: CLONE: no subvolume under {e.target} was received as {e.outside_uuid} "
            "(receive the parent snapshot first)",
        ),
        (
            "clone_path_escape",
            [
                b(Cmd.MKFILE, path="f", ino=257),
                b(
                    Cmd.CLONE,
                    path="f",
                    file_offset=0,
                    clone_len=4096,
                    clone_uuid=uuid4(),
                    clone_ctransid=9,
                    clone_path="../outside/secret",
                    clone_offset=0,
                ),
            ],
            StreamFormatError,
            "refused path with a '..' component: b'../outside/secret'",
        ),
        (
            "huge_write",
            [b(Cmd.MKFILE, path="f", ino=257), b(Cmd.WRITE, path="f", file_offset=big, data=b"x")],
            UnsafeStream,
            f"refused WRITE f: the write reaches byte {big + 1}, over the limit of {big - 1}",
        ),
        (
            "huge_truncate",
            [b(Cmd.MKFILE, path="f", ino=257), b(Cmd.TRUNCATE, path="f", size=(1 << 64) - 1)],
            UnsafeStream,
            f"refused TRUNCATE f: the new size reaches byte {(1 << 64) - 1}, over the limit of {big - 1}",
        ),
        (
            "huge_clone",
            [
                b(Cmd.MKFILE, path="f", ino=257),
                b(Cmd.CLONE, path="f", file_offset=0, clone_len=big, clone_uuid=uuid4(), clone_ctransid=9, clone_path="f", clone_offset=0),
            ],
            UnsafeStream,
            f"refused CLONE f: the clone reaches byte {big}, over the limit of {big - 1}",
        ),
        (
            "huge_encoded",
            [
                b(Cmd.MKFILE, path="f", ino=257),
                b(
                    Cmd.ENCODED_WRITE,
                    path="f",
                    file_offset=0,
                    unencoded_file_len=4096,
                    unencoded_len=1 << 40,
                    unencoded_offset=0,
                    compression=2,
                    data=b"x",
                ),
            ],
            UnsafeStream,
            f"refused ENCODED_WRITE f: 4096 bytes at 0 of an extent of {1 << 40} bytes (at most {16 << 20})",
        ),
    ]


CASES = [
    "dotdot",
    "absolute",
    "dir_symlink",
    "dir_symlink_up",
    "file_symlink",
    "truncate_symlink",
    "chmod_symlink",
    "write_device",
    "write_fifo",
    "rename_through_symlink",
    "link_through_symlink",
    "clone_from_outside",
    "clone_path_escape",
    "huge_write",
    "huge_truncate",
    "huge_clone",
    "huge_encoded",
]


@pytest.mark.parametrize("case", CASES)
def test_malicious_stream_is_refused_and_writes_nothing_outside(evil: Evil, case: str) -> None:
    name, commands, error, message = next(c for c in _cases(evil) if c[0] == case)
    before = _outside_state(evil)
    with BtrfsApplier(evil.target) as applier, pytest.raises(error) as e:
        applier.apply_stream(_stream(_subvol_cmd(f"e_{name}"), *commands))
    assert str(e.value) == message
    assert _outside_state(evil) == before


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../evil", "refused path with a '..' component: b'../evil'"),
        ("a/b", "refused SUBVOL a/b: a received subvolume's name must be one path component"),
        ("", "refused SUBVOL .: a received subvolume's name must be one path component"),
    ],
)
def test_subvolume_names_are_confined(evil: Evil, path: str, message: str) -> None:
    before = _outside_state(evil)
    with BtrfsApplier(evil.target) as applier, pytest.raises(StreamFormatError) as e:
        applier.apply(Command.build(Cmd.SUBVOL, path=path, uuid=uuid4(), ctransid=1))
    assert str(e.value) == message
    assert _outside_state(evil) == before


def test_symlink_metadata_commands_touch_only_the_link(evil: Evil) -> None:
    before = _outside_state(evil)
    secret = str(evil.mnt / "canary" / "secret")
    b = Command.build
    with BtrfsApplier(evil.target) as applier:
        applier.apply_stream(
            _stream(
                _subvol_cmd("e_meta"),
                b(Cmd.SYMLINK, path="lf", ino=257, path_link=secret),
                b(Cmd.CHOWN, path="lf", uid=4321, gid=4321),
                b(Cmd.UTIMES, path="lf", atime=_T, mtime=_T, ctime=_T),
                b(Cmd.SET_XATTR, path="lf", xattr_name="trusted.t", xattr_data=b"on the link"),
            )
        )
    link = evil.target / "e_meta" / "lf"
    st = os.lstat(link)
    assert (st.st_uid, st.st_mtime_ns) == (4321, 1 * NS + 2)
    assert os.getxattr(link, "trusted.t", follow_symlinks=False) == b"on the link"
    assert _outside_state(evil) == before


def test_fileattr_sets_flags_and_seals_at_end(evil: Evil) -> None:
    b = Command.build
    nodump, append = 1 << 8, 1 << 7  # BTRFS_INODE_NODUMP, BTRFS_INODE_APPEND
    with BtrfsApplier(evil.target) as applier:
        got = applier.apply_stream(
            _stream(
                _subvol_cmd("e_attr"),
                b(Cmd.MKFILE, path="f", ino=257),
                b(Cmd.FILEATTR, path="f", fileattr=nodump | append),
                b(Cmd.WRITE, path="f", file_offset=0, data=b"written after FILEATTR"),
                b(Cmd.UTIMES, path="f", atime=_T, mtime=_T, ctime=_T),
                b(Cmd.MKDIR, path="d", ino=258),
                b(Cmd.FILEATTR, path="d", fileattr=nodump),
            )
        )
    assert fs_flags(got / "f") & 0x60 == 0x60  # FS_NODUMP_FL | FS_APPEND_FL
    assert fs_flags(got / "d") & 0x40 and (got / "f").read_bytes() == b"written after FILEATTR"
    assert os.stat(got / "f").st_mtime_ns == 1 * NS + 2


def test_fallocate_and_update_extent(evil: Evil) -> None:
    b = Command.build
    keep_size_punch = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    with BtrfsApplier(evil.target) as applier:
        got = applier.apply_stream(
            _stream(
                _subvol_cmd("e_alloc"),
                b(Cmd.MKFILE, path="pre", ino=257),
                b(Cmd.FALLOCATE, path="pre", fallocate_mode=0, file_offset=0, size=1 << 20),
                b(Cmd.MKFILE, path="holed", ino=258),
                b(Cmd.WRITE, path="holed", file_offset=0, data=b"d" * (256 << 10)),
                b(Cmd.FALLOCATE, path="holed", fallocate_mode=keep_size_punch, file_offset=64 << 10, size=64 << 10),
                b(Cmd.UPDATE_EXTENT, path="holed", file_offset=0, size=4096),
            )
        )
    st = os.stat(got / "pre")
    assert st.st_size == 1 << 20 and st.st_blocks * 512 >= 1 << 20
    data = (got / "holed").read_bytes()
    assert data == b"d" * (64 << 10) + bytes(64 << 10) + b"d" * (128 << 10)
    fd = os.open(got / "holed", os.O_RDONLY)
    try:
        assert segments(fd, len(data)) == [(0, 64 << 10), (128 << 10, 256 << 10)]
    finally:
        os.close(fd)


@pytest.mark.parametrize("encoded", [True, False])
def test_zlib_encoded_write_with_and_without_the_ioctl(evil: Evil, encoded: bool) -> None:
    plain = b"zlib extent " * 700 + b"!" * 200  # 8600 bytes in an extent of 3 blocks
    b = Command.build
    write = b(
        Cmd.ENCODED_WRITE,
        path="z",
        file_offset=0,
        unencoded_file_len=len(plain),
        unencoded_len=3 * 4096,
        unencoded_offset=0,
        compression=1,
        data=zlib.compress(plain + bytes(3 * 4096 - len(plain))),
    )
    with BtrfsApplier(evil.target, encoded_write=encoded) as applier:
        got = applier.apply_stream(_stream(_subvol_cmd(f"e_zlib_{encoded}"), b(Cmd.MKFILE, path="z", ino=257), write))
    assert (got / "z").read_bytes() == plain
    assert encoded_extents(got / "z") == (1 if encoded else 0)


@pytest.mark.parametrize(
    ("compression", "data", "message"),
    [
        (3, b"lzo", "ENCODED_WRITE f: LZO_4K data cannot be decompressed by snapferry"),
        (2, b"not zstd", "ENCODED_WRITE f: corrupt ZSTD data: zstd decompress error: Unknown frame descriptor"),
        (1, b"not zlib", "ENCODED_WRITE f: corrupt ZLIB data: Error -3 while decompressing data: incorrect header check"),
    ],
)
def test_undecodable_extents_are_refused_without_the_ioctl(evil: Evil, compression: int, data: bytes, message: str) -> None:
    b = Command.build
    write = b(
        Cmd.ENCODED_WRITE,
        path="f",
        file_offset=0,
        unencoded_file_len=4096,
        unencoded_len=4096,
        unencoded_offset=0,
        compression=compression,
        data=data,
    )
    with BtrfsApplier(evil.target, encoded_write=False) as applier, pytest.raises(StreamFormatError) as e:
        applier.apply_stream(_stream(_subvol_cmd(f"e_bad_{compression}"), b(Cmd.MKFILE, path="f", ino=257), write))
    assert str(e.value) == message


def test_commands_before_a_subvolume_are_refused(evil: Evil) -> None:
    with (
        BtrfsApplier(evil.target) as applier,
        pytest.raises(StreamFormatError, match=r"^MKFILE command before any SUBVOL or SNAPSHOT command$"),
    ):
        applier.apply(Command.build(Cmd.MKFILE, path="f", ino=257))


def test_filesystem_errors_name_command_path_and_errno(evil: Evil) -> None:
    with BtrfsApplier(evil.target) as applier:
        applier.apply(_subvol_cmd("e_errors"))
        with pytest.raises(BtrfsApplyError, match=r"^cannot apply UNLINK dir/nothere: No such file or directory$"):
            applier.apply(Command.build(Cmd.UNLINK, path="dir/nothere"))
        applier.apply(Command.build(Cmd.MKFILE, path="f", ino=257))
        with pytest.raises(BtrfsApplyError, match=r"^cannot apply MKFILE f: File exists$"):
            applier.apply(Command.build(Cmd.MKFILE, path="f", ino=258))
        with pytest.raises(BtrfsApplyError, match=r"^cannot apply RENAME f -> no/such/dir: No such file or directory$"):
            applier.apply(Command.build(Cmd.RENAME, path="f", path_to="no/such/dir"))


def test_out_of_space_is_resumable_out_of_space(evil: Evil) -> None:
    run("btrfs", "quota", "enable", evil.mnt)
    with BtrfsApplier(evil.target) as applier:
        applier.apply(_subvol_cmd("e_quota"))
        applier.apply(Command.build(Cmd.MKFILE, path="big", ino=257))
        run("btrfs", "qgroup", "limit", "1M", evil.target / "e_quota")
        chunk = os.urandom(64 << 10)
        with pytest.raises(OutOfSpace, match=r"^out of space receiving btrfs stream: (WRITE|FALLOCATE) big: Disk quota exceeded$"):
            for i in range(64):
                applier.apply(Command.build(Cmd.WRITE, path="big", file_offset=i * len(chunk), data=chunk))
            os.sync()
            applier.apply(Command.build(Cmd.FALLOCATE, path="big", fallocate_mode=0, file_offset=0, size=64 << 20))


def test_the_new_files_fd_follows_only_its_own_renames(evil: Evil) -> None:
    """MKFILE keeps the new file open for the commands after it; a rename onto its name, or of a directory above it, drops that."""
    b = Command.build
    with BtrfsApplier(evil.target) as applier:
        applier.apply_stream(
            _stream(
                _subvol_cmd("e_held"),
                b(Cmd.MKDIR, path="d", ino=256),
                b(Cmd.MKFILE, path="o1", ino=257),
                b(Cmd.RENAME, path="o1", path_to="d/a"),
                b(Cmd.WRITE, path="d/a", file_offset=0, data=b"first"),
                b(Cmd.CHMOD, path="d/a", mode=0o640),
                b(Cmd.MKFILE, path="o2", ino=258),
                b(Cmd.RENAME, path="d/a", path_to="o2"),  # o2, the file held open, is replaced by d/a's inode
                b(Cmd.WRITE, path="o2", file_offset=5, data=b"+second"),
                b(Cmd.CHMOD, path="o2", mode=0o604),
                b(Cmd.UTIMES, path="o2", atime=Timespec(5, 6), mtime=Timespec(7, 8), ctime=_T),
                b(Cmd.MKFILE, path="d/c", ino=259),
                b(Cmd.RENAME, path="d", path_to="e"),  # the held d/c is now e/c
                b(Cmd.WRITE, path="e/c", file_offset=0, data=b"moved"),
                b(Cmd.CHOWN, path="e/c", uid=11, gid=12),
            )
        )
    root = evil.target / "e_held"
    assert (root / "o2").read_bytes() == b"first+second"
    st = os.stat(root / "o2")
    assert stat.S_IMODE(st.st_mode) == 0o604 and st.st_mtime_ns == 7 * NS + 8 and st.st_atime_ns == 5 * NS + 6
    assert not (root / "d").exists() and (root / "e" / "c").read_bytes() == b"moved"
    assert (os.stat(root / "e" / "c").st_uid, os.stat(root / "e" / "c").st_gid) == (11, 12)


def test_a_new_inode_and_its_rename_are_made_under_the_new_name(evil: Evil) -> None:
    """apply_created_as saves the rename where the name is free, and otherwise applies both as they come, failing as they would."""
    b = Command.build
    with BtrfsApplier(evil.target) as applier:
        applier.apply(_subvol_cmd("e_created_as"))
        applier.apply(b(Cmd.MKDIR, path="d", ino=256))
        root = evil.target / "e_created_as"
        applier.apply_created_as(b(Cmd.MKFILE, path="o1", ino=257), b(Cmd.RENAME, path="o1", path_to="d/f"))
        applier.apply(b(Cmd.WRITE, path="d/f", file_offset=0, data=b"new"))
        assert sorted(os.listdir(root)) == ["d"] and (root / "d" / "f").read_bytes() == b"new"
        # The name is taken: the rename replaces what is there, as it would.
        applier.apply_created_as(b(Cmd.MKFILE, path="o2", ino=258), b(Cmd.RENAME, path="o2", path_to="d/f"))
        applier.apply(b(Cmd.WRITE, path="d/f", file_offset=0, data=b"2"))
        assert sorted(os.listdir(root)) == ["d"] and (root / "d" / "f").read_bytes() == b"2"
        # A RENAME of another file: both applied as they come.
        applier.apply_created_as(b(Cmd.MKFILE, path="o3", ino=259), b(Cmd.RENAME, path="d/f", path_to="g"))
        assert sorted(os.listdir(root)) == ["d", "g", "o3"] and (root / "g").read_bytes() == b"2"
        with pytest.raises(BtrfsApplyError, match=r"^cannot apply RENAME o4 -> no/such/f: No such file or directory$"):
            applier.apply_created_as(b(Cmd.MKFILE, path="o4", ino=260), b(Cmd.RENAME, path="o4", path_to="no/such/f"))
        assert (root / "o4").is_file()
        os.symlink(evil.mnt / "canary", root / "ln")
        before = _outside_state(evil)
        with pytest.raises(UnsafeStream, match=r"^refused RENAME ln/f: ln is a symlink$"):
            applier.apply_created_as(b(Cmd.MKFILE, path="o5", ino=261), b(Cmd.RENAME, path="o5", path_to="ln/f"))
        assert _outside_state(evil) == before and (root / "o5").is_file()
        applier.apply_created_as(b(Cmd.MKDIR, path="o6", ino=262), b(Cmd.RENAME, path="o6", path_to="d/sub"))
        applier.apply_created_as(b(Cmd.SYMLINK, path="o7", ino=263, path_link="../f"), b(Cmd.RENAME, path="o7", path_to="d/sub/l"))
        applier.apply_created_as(b(Cmd.MKFIFO, path="o8", ino=264), b(Cmd.RENAME, path="o8", path_to="d/sub/p"))
        assert sorted(os.listdir(root / "d" / "sub")) == ["l", "p"] and os.readlink(root / "d" / "sub" / "l") == "../f"
        assert stat.S_ISFIFO(os.lstat(root / "d" / "sub" / "p").st_mode)
        assert not any(name.startswith(("o6", "o7", "o8")) for name in os.listdir(root))
