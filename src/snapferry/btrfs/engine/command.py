"""The btrfs commands and facts a sender needs: `btrfs send`'s command line and errors, and the subvolumes in a directory."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from snapferry.btrfs.engine import ioctl as ioc
from snapferry.core.process import Tool, last_line
from snapferry.errors import BtrfsCommandError, DatasetMissing, Refused

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOT_READ_ONLY = re.compile(r"is not read-only", re.I)
_MISSING = re.compile(r"No such file or directory|cannot find|does not exist|unable to resolve", re.I)
_NOT_SUBVOL = re.compile(r"not a (btrfs )?subvolume|not on a btrfs|Inappropriate ioctl", re.I)


@dataclass(frozen=True)
class Subvolume:
    """A btrfs subvolume as the kernel describes it, found at `path`."""

    path: Path
    uuid: UUID
    received_uuid: UUID
    parent_uuid: UUID
    ctransid: int
    otransid: int
    readonly: bool
    otime: int = 0  # when it was created, unix seconds

    @property
    def name(self) -> str:
        return self.path.name

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "uuid": str(self.uuid),
            "received_uuid": str(self.received_uuid),
            "parent_uuid": str(self.parent_uuid),
            "ctransid": self.ctransid,
            "otransid": self.otransid,
            "readonly": self.readonly,
            "otime": self.otime,
        }

    @classmethod
    def from_json(cls, directory: Path, data: dict[str, object]) -> Subvolume:
        def text(key: str) -> str:
            value = data[key]
            if not isinstance(value, str):
                raise ValueError(key)
            return value

        def number(key: str) -> int:
            value = data[key]
            if not isinstance(value, int):
                raise ValueError(key)
            return value

        return cls(
            directory / text("name"),
            UUID(text("uuid")),
            UUID(text("received_uuid")),
            UUID(text("parent_uuid")),
            number("ctransid"),
            number("otransid"),
            data["readonly"] is True,
            number("otime") if "otime" in data else 0,
        )


def _from_fd(path: Path, fd: int) -> Subvolume:
    info = ioc.subvol_info(fd)
    return Subvolume(path, info.uuid, info.received_uuid, info.parent_uuid, info.ctransid, info.otransid, info.readonly, info.otime)


def subvolume_at(path: Path) -> Subvolume:
    """The subvolume whose top directory is `path`, or a one-line refusal saying what path is instead."""
    try:
        fd = os.open(path, _O_DIR)
    except FileNotFoundError:
        raise DatasetMissing(f"{path} does not exist") from None
    except NotADirectoryError:
        raise Refused(f"{path} is not a btrfs subvolume (not a directory)") from None
    try:
        if not ioc.is_subvolume_root(os.fstat(fd)):
            raise Refused(f"{path} is not a btrfs subvolume (its top directory)")
        try:
            return _from_fd(path, fd)
        except OSError:
            raise Refused(f"{path} is not on a btrfs file system") from None
    finally:
        os.close(fd)


def subvolumes_in(directory: Path) -> list[Subvolume]:
    """The subvolumes directly in `directory`, oldest first (by the transaction that created them)."""
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        raise DatasetMissing(f"{directory} does not exist") from None
    found: list[Subvolume] = []
    for name in names:
        try:
            fd = os.open(directory / name, _O_DIR | os.O_NOFOLLOW)
        except OSError:
            continue  # gone, or not ours to read
        try:
            if ioc.is_subvolume_root(os.fstat(fd)):
                found.append(_from_fd(directory / name, fd))
        finally:
            os.close(fd)
    return sorted(found, key=lambda s: (s.otransid, s.name))


def send_argv(
    path: Path,
    parent: Path | None = None,
    clones: tuple[Path, ...] = (),
    proto: int | None = None,
    compressed: bool = False,
    *,
    no_data: bool = False,
) -> list[str]:
    argv = ["btrfs", "send", "-q", *(["--no-data"] if no_data else [])]
    if parent is not None:
        argv += ["-p", str(parent)]
    for clone in clones:
        argv += ["-c", str(clone)]
    if proto is not None:
        argv += ["--proto", str(proto)]
    if compressed:
        argv.append("--compressed-data")
    return [*argv, str(path)]


def classify_btrfs_failure(action: str, stderr: str) -> Exception:
    """Turn a failed btrfs command's stderr into the error a user can act on."""
    message = last_line(stderr).removeprefix("ERROR: ")
    if _NOT_READ_ONLY.search(stderr):
        return Refused(f"{action}: {message} (send snapshots: btrfs subvolume snapshot -r)")
    if _NOT_SUBVOL.search(stderr):
        return Refused(f"{action}: {message}")
    if _MISSING.search(stderr):
        return DatasetMissing(f"{action}: {message}")
    return BtrfsCommandError(f"{action}: {message}")


BTRFS_TOOL = Tool(classify_btrfs_failure, "install btrfs-progs")
