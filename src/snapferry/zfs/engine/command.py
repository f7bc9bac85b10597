"""Drives the real `zfs` command: argv building, `-H -p` output parsing, stderr classification."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from snapferry.core.lock import host_lock
from snapferry.core.process import Tool, last_line
from snapferry.errors import DatasetMissing, OutOfSpace, PartialReceiveInTheWay, Refused, TransferInterrupted, ZfsCommandError

ZFS_ENV = "SNAPFERRY_ZFS"
MOUNT_LOCK = "#zfs-mount"  # "#" is in no dataset name: no dataset lock is this file

# stderr patterns, each seen from real zfs-fuse 0.7 / OpenZFS runs.
_OUT_OF_SPACE = re.compile(r"out of space|no space left|quota exceeded", re.I)
_DAEMON_GONE = re.compile(
    r"connect: |failed to initialize ZFS library|Connection refused|ioctl_read_loop|file descriptor closed"
    # ssh's own words when the link, not the command, failed
    r"|timed out|Connection reset|Connection closed|Broken pipe|No route to host|Network is unreachable"
    r"|kex_exchange_identification|Could not resolve hostname",
    re.I,
)
_MISSING = re.compile(r"does not exist|dataset does not exist|no such pool", re.I)
_MODIFIED = re.compile(r"has been modified\s+since most recent snapshot", re.I)
_BUSY = re.compile(r"dataset is busy|pool or dataset is busy", re.I)
_NOT_MATCHING = re.compile(r"does not match incremental source|most recent snapshot of .* does not", re.I)
_BUSY_RETRIES = 10
# OpenZFS's words for the kernel's saved receive state ("zfs receive -s") being in the way.
_PARTIAL_STATE = re.compile(r"contains partially-complete state|/%recv", re.I)
_RESUMABLE_SAVED = re.compile(r"Partially received snapshot is saved", re.I)
_TAG_EXISTS = re.compile(r"tag already exists", re.I)
_NO_SUCH_TAG = re.compile(r"no such tag", re.I)
_NO_SUCH_PROPERTY = re.compile(r"invalid property|bad property list|unsupported property", re.I)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not line.startswith("receiving ")]
    return lines[0] if lines else "(no message)"


def classify_failure(action: str, stderr: str) -> Exception:
    """Turn a failed zfs command's stderr into the error a user can act on."""
    message = " ".join(stderr.split()) or "(no message)"
    if _OUT_OF_SPACE.search(stderr):
        return OutOfSpace(f"{action}: destination is out of space ({message}); free space or raise the quota, then resume")
    if _RESUMABLE_SAVED.search(stderr):
        return TransferInterrupted(f"{action}: the stream stopped early ({_first_line(stderr)}); the kernel kept what arrived")
    if _PARTIAL_STATE.search(stderr):
        return PartialReceiveInTheWay(f"{action}: {message}")
    if _DAEMON_GONE.search(stderr):
        return TransferInterrupted(f"{action}: the ZFS service or the link to it is not answering ({last_line(stderr)})")
    if _MODIFIED.search(stderr):
        return Refused(f"{action}: {message}; use -F to roll it back to its last snapshot")
    if _NOT_MATCHING.search(stderr):
        return Refused(f"{action}: {message}")
    if _BUSY.search(stderr):
        return TransferInterrupted(f"{action}: {message}; try again when it is no longer in use")
    if _MISSING.search(stderr):
        return DatasetMissing(f"{action}: {message}")
    return ZfsCommandError(f"{action}: {message}")


ZFS_TOOL = Tool(classify_failure, f"set --zfs or {ZFS_ENV}")


@dataclass(frozen=True)
class Snapshot:
    name: str
    guid: int
    createtxg: int
    creation: int = 0  # unix seconds
    userrefs: int = 0  # user holds (zfs hold)

    @property
    def dataset(self) -> str:
        return self.name.partition("@")[0]

    @property
    def short_name(self) -> str:
        return self.name.partition("@")[2]


def _number(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0


class Zfs:
    """The `zfs` command of this host (sync reaches other hosts through snapferry verbs, never raw zfs)."""

    def __init__(self, command: Sequence[str] | None = None) -> None:
        if command is None:
            command = shlex.split(os.environ.get(ZFS_ENV, "zfs"))
        self.command = list(command)
        # pool -> is_modern(): a property of this host's zfs, asked once (each zfs call costs 20-40 ms on zfs-fuse).
        self._modern: dict[str, bool] = {}

    def argv(self, *args: str) -> list[str]:
        return [*self.command, *args]

    def run(self, action: str, *args: str) -> str:
        try:
            proc = subprocess.run(self.argv(*args), capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise ZfsCommandError(f"cannot run {self.command[0]!r}: not found (set --zfs or {ZFS_ENV})") from None
        if proc.returncode != 0:
            raise classify_failure(action, proc.stderr)
        return proc.stdout

    def exists(self, dataset: str) -> bool:
        try:
            self.run(f"cannot look up {dataset}", "get", "-H", "-o", "value", "type", dataset)
        except DatasetMissing:
            return False
        return True

    def local_properties(self, dataset: str) -> dict[str, str]:
        """The properties set on the dataset itself (`zfs get -s local`), not inherited or default ones."""
        out = self.run(f"cannot read the properties of {dataset}", "get", "-H", "-p", "-s", "local", "-o", "property,value", "all", dataset)
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)

    def get_properties(self, dataset: str, *names: str, recursive_depth: int | None = None) -> dict[str, dict[str, str]]:
        """{dataset name: {property: value}} from `zfs get -Hp`, for one dataset or its children."""
        args = ["get", "-H", "-p", "-o", "name,property,value"]
        if recursive_depth is not None:
            args += ["-r", "-d", str(recursive_depth)]
        out = self.run(f"cannot read properties of {dataset}", *args, ",".join(names), dataset)
        table: dict[str, dict[str, str]] = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                table.setdefault(parts[0], {})[parts[1]] = parts[2]
        return table

    def snapshots(self, dataset: str) -> list[Snapshot]:
        """The snapshots of one dataset, oldest first."""
        return self._type_and_snapshots(dataset)[1]

    def type_and_snapshots(self, dataset: str) -> tuple[str | None, list[Snapshot]]:
        """The dataset's type (filesystem, volume) and snapshots() in one zfs call; (None, []) if there is no such dataset."""
        try:
            return self._type_and_snapshots(dataset)
        except DatasetMissing:
            return None, []

    def _type_and_snapshots(self, dataset: str) -> tuple[str | None, list[Snapshot]]:
        table = self.get_properties(dataset, "type", "guid", "createtxg", "creation", "userrefs", recursive_depth=1)
        snaps = [
            Snapshot(name, int(props["guid"]), int(props["createtxg"]), _number(props.get("creation")), _number(props.get("userrefs")))
            for name, props in table.items()
            if name.startswith(dataset + "@") and "guid" in props and "createtxg" in props
        ]
        return table.get(dataset, {}).get("type"), sorted(snaps, key=lambda s: s.createtxg)

    def all_snapshots(self) -> list[Snapshot]:
        """Every snapshot of every imported pool (for finding a snapshot by guid)."""
        out = self.run("cannot list snapshots", "get", "-H", "-p", "-r", "-o", "name,property,value", "guid,createtxg")
        table: dict[str, dict[str, str]] = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and "@" in parts[0]:
                table.setdefault(parts[0], {})[parts[1]] = parts[2]
        return [Snapshot(n, int(p["guid"]), int(p["createtxg"])) for n, p in table.items() if len(p) == 2]

    def guid(self, name: str) -> int:
        return int(self.run(f"cannot read the guid of {name}", "get", "-H", "-p", "-o", "value", "guid", name).strip())

    def destroy(self, name: str, *, recursive: bool = False) -> None:
        # A mount that was just read can stay busy for a moment (seen on zfs-fuse): retry briefly.
        for attempt in range(_BUSY_RETRIES):
            try:
                self.run(f"cannot destroy {name}", "destroy", *(["-r"] if recursive else []), name)
                return
            except TransferInterrupted as exc:
                if attempt == _BUSY_RETRIES - 1 or "busy" not in str(exc):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def set_property(self, dataset: str, name: str, value: str) -> None:
        self.run(f"cannot set {name} on {dataset}", "set", f"{name}={value}", dataset)

    def inherit_property(self, dataset: str, name: str) -> None:
        self.run(f"cannot clear {name} on {dataset}", "inherit", name, dataset)

    def locally_set(self, dataset: str, name: str) -> dict[str, str]:
        """{dataset: value} for `dataset` and its descendants where property `name` is set on the dataset itself,
        locally or as received (not inherited, not a default)."""
        # Filtered here, not with -s: zfs-fuse may not know the source "received".
        out = self.run(f"cannot read {name} below {dataset}", "get", "-H", "-r", "-o", "name,value,source", name, dataset)
        rows = (line.split("\t") for line in out.splitlines() if line.count("\t") == 2)
        return {where: value for where, value, source in rows if "@" not in where and source in ("local", "received")}

    def snapshot(self, name: str, *, recursive: bool = False) -> None:
        self.run(f"cannot snapshot {name}", "snapshot", *(["-r"] if recursive else []), name)

    def descendants(self, dataset: str) -> list[str]:
        """dataset and the file systems and volumes below it, parents first; [] when it does not exist."""
        try:
            out = self.run(
                f"cannot list the datasets below {dataset}", "list", "-H", "-r", "-o", "name", "-t", "filesystem,volume", dataset
            )
        except DatasetMissing:
            return []
        names = [line.strip() for line in out.splitlines() if line.strip()]
        return sorted((n for n in names if n == dataset or n.startswith(dataset + "/")), key=lambda n: (n.count("/"), n))

    def hold(self, tag: str, snapshot: str) -> bool:
        """A user hold; False when the snapshot already has this tag."""
        try:
            self.run(f"cannot hold {snapshot}", "hold", tag, snapshot)
        except ZfsCommandError as exc:
            if _TAG_EXISTS.search(str(exc)):
                return False
            raise
        return True

    def release(self, tag: str, snapshot: str) -> bool:
        """Take a user hold off; False when the snapshot has no such tag."""
        try:
            self.run(f"cannot release {snapshot}", "release", tag, snapshot)
        except ZfsCommandError as exc:
            if _NO_SUCH_TAG.search(str(exc)):
                return False
            raise
        return True

    def hold_tags(self, snapshot: str) -> list[str] | None:
        """The tags of a snapshot's user holds; None where this zfs cannot list them (zfs-fuse's `zfs holds` is broken)."""
        try:
            out = self.run(f"cannot list the holds of {snapshot}", "holds", "-H", snapshot)
        except ZfsCommandError:
            return None
        return [line.split("\t")[1] for line in out.splitlines() if line.count("\t") >= 2]

    def rename(self, old: str, new: str) -> None:
        self.run(f"cannot rename {old}", "rename", old, new)

    def rollback(self, snapshot: str) -> None:
        self.run(f"cannot roll back to {snapshot}", "rollback", "-r", snapshot)

    def is_mounted(self, dataset: str) -> bool:
        return self.run(f"cannot read mounted of {dataset}", "get", "-H", "-o", "value", "mounted", dataset).strip() == "yes"

    # One mount or unmount at a time on this host: zfs-fuse can deadlock (a `zfs mount` stuck in the kernel
    # for good) when a tree's receives, --jobs of them at once, mount and unmount side by side.
    def unmount(self, dataset: str) -> None:
        with host_lock(MOUNT_LOCK):
            self.run(f"cannot unmount {dataset}", "unmount", dataset)

    def mount(self, dataset: str) -> None:
        with host_lock(MOUNT_LOCK):
            self.run(f"cannot mount {dataset}", "mount", dataset)

    def zpool_argv(self, *args: str) -> list[str]:
        """`zpool` beside the zfs command in use (a --zfs path names its directory)."""
        zpool = [*self.command[:-1], os.path.join(os.path.dirname(self.command[-1]), "zpool")]
        return [*zpool, *args]

    def is_modern(self, dataset: str) -> bool:
        """Whether this host's zfs (for dataset's pool) is OpenZFS 0.7 or later: it knows the
        receive_resume_token property, has `zfs send -t`, and checks every record's running checksum
        on receive. zfs-fuse and other pool-v28-era ZFS have none of these."""
        pool = dataset.split("/", 1)[0].partition("@")[0]
        if pool not in self._modern:
            try:
                self.run(f"cannot read receive_resume_token of {pool}", "get", "-H", "-o", "value", "receive_resume_token", pool)
                self._modern[pool] = True
            except ZfsCommandError as exc:
                if not _NO_SUCH_PROPERTY.search(str(exc)):
                    raise
                self._modern[pool] = False
        return self._modern[pool]

    def native_resume(self, dataset: str) -> bool:
        """Whether the kernel resumes receives into this dataset's pool: OpenZFS's `zfs receive -s`
        needs the property (0.7+) and the pool feature extensible_dataset."""
        if not self.is_modern(dataset):
            return False
        pool = dataset.split("/", 1)[0].partition("@")[0]
        proc = subprocess.run(
            self.zpool_argv("get", "-H", "-o", "value", "feature@extensible_dataset", pool), capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            failure = classify_failure(f"cannot read the features of pool {pool}", proc.stderr)
            if isinstance(failure, ZfsCommandError) and _NO_SUCH_PROPERTY.search(proc.stderr):
                return False
            raise failure
        return proc.stdout.strip() in ("enabled", "active")

    def resume_token(self, dataset: str) -> str | None:
        """OpenZFS's token for an interrupted `zfs receive -s` into dataset, if there is one."""
        try:
            value = self.run(f"cannot read receive_resume_token of {dataset}", "get", "-H", "-o", "value", "receive_resume_token", dataset)
        except DatasetMissing:
            return None
        except ZfsCommandError as exc:
            if _NO_SUCH_PROPERTY.search(str(exc)):
                return None
            raise
        value = value.strip()
        return None if value in ("", "-") else value

    def resume_tokens(self, dataset: str) -> dict[str, str]:
        """{file system: OpenZFS token} for `dataset` and every file system below it that holds an interrupted
        `zfs receive -s`, in one call; {} where this zfs has no kernel resume."""
        try:
            out = self.run(
                f"cannot read the receive_resume_token below {dataset}",
                "get", "-H", "-r", "-o", "name,value", "receive_resume_token", dataset,
            )  # fmt: skip
        except ZfsCommandError as exc:
            if _NO_SUCH_PROPERTY.search(str(exc)):
                return {}
            raise
        found = (line.split("\t", 1) for line in out.splitlines() if line.count("\t") == 1)
        return {name: value.strip() for name, value in found if "@" not in name and value.strip() not in ("", "-")}

    def abort_receive(self, dataset: str) -> None:
        self.run(f"cannot abort the interrupted receive into {dataset}", "receive", "-A", dataset)

    def receive_argv(self, dataset: str, *, force: bool, resumable: bool = False, unmounted: bool = False) -> list[str]:
        """`unmounted` (-u, OpenZFS only): leave the received dataset unmounted."""
        flags = [flag for flag, wanted in (("-s", resumable), ("-F", force), ("-u", unmounted)) if wanted]
        return self.argv("receive", *flags, dataset)

    def send_token_argv(self, token: str, flags: Sequence[str] = ()) -> list[str]:
        return self.argv("send", *flags, "-t", token)

    def send_argv(self, snapshot: str, *, incremental_from: str | None = None, flags: Sequence[str] = ()) -> list[str]:
        return self.argv("send", *flags, *(["-i", incremental_from] if incremental_from else []), snapshot)
