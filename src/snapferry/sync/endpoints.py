"""Where a dataset or btrfs directory lives: here, or over ssh as `[user@]host:pool/fs` or `host:/path`; how to run commands there."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from snapferry.btrfs.engine.command import is_btrfs_path
from snapferry.errors import UsageError
from snapferry.zfs.engine.command import Zfs

_REMOTE = re.compile(r"^(?:(?P<user>[^@:/\s]+)@)?(?P<host>[^@:/\s]+):(?P<dataset>[^:\s]+)$")
_LOCAL = re.compile(r"^[A-Za-z0-9][\w.:-]*(/[\w.:-]+)*$")


@dataclass(frozen=True)
class Endpoint:
    dataset: str
    host: str | None = None
    user: str | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        remote = _REMOTE.match(text)
        if is_btrfs_path(text):
            endpoint = cls(text)
        elif remote and "/" not in remote["host"]:
            endpoint = cls(remote["dataset"], remote["host"], remote["user"])
        elif _LOCAL.match(text):
            endpoint = cls(text)
        else:
            raise UsageError(f"not a dataset: {text!r} (expected pool/fs or [user@]host:pool/fs, or a btrfs /path or host:/path)")
        if endpoint.is_btrfs and endpoint.host is not None and not endpoint.dataset.startswith("/"):
            raise UsageError(f"a remote btrfs directory must be an absolute path: {text}")
        if "@" in endpoint.dataset and not endpoint.is_btrfs:
            raise UsageError(f"sync takes a file system, not a snapshot: {text}")
        return endpoint

    @property
    def is_btrfs(self) -> bool:
        return is_btrfs_path(self.dataset)

    def __str__(self) -> str:
        if self.host is None:
            return self.dataset
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.dataset}"


@dataclass(frozen=True)
class Shell:
    """Runs commands on an endpoint's host: directly, or through `ssh [user@]host 'quoted argv'`."""

    endpoint: Endpoint
    ssh: tuple[str, ...] = ("ssh",)
    snapferry: tuple[str, ...] = ("snapferry",)

    @property
    def via(self) -> list[str]:
        if self.endpoint.host is None:
            return []
        target = f"{self.endpoint.user}@{self.endpoint.host}" if self.endpoint.user else self.endpoint.host
        return [*self.ssh, target]

    def argv(self, argv: list[str]) -> list[str]:
        return [*self.via, shlex.join(argv)] if self.via else argv

    def snapferry_argv(self, *args: str) -> list[str]:
        return self.argv([*self.snapferry, *args])

    def zfs(self) -> Zfs:
        return Zfs(["zfs"], via=self.via) if self.via else Zfs()
