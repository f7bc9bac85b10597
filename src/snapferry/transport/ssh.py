"""Running a command on a host: here as it is, or through `ssh [user@]host 'quoted argv'`."""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Shell:
    """Runs argv on `host` (None: this host) with `ssh`; `snapferry` is the command that runs snapferry there."""

    host: str | None = None
    user: str | None = None
    ssh: tuple[str, ...] = ("ssh",)
    snapferry: tuple[str, ...] = ("snapferry",)

    @property
    def via(self) -> list[str]:
        if self.host is None:
            return []
        return [*self.ssh, f"{self.user}@{self.host}" if self.user else self.host]

    def argv(self, argv: list[str]) -> list[str]:
        # ssh hands the remote shell one string: quote every word of it.
        return [*self.via, shlex.join(argv)] if self.via else argv

    def snapferry_argv(self, *args: str) -> list[str]:
        return self.argv([*self.snapferry, *args])
