"""Running a command on a host: here as it is, or through `ssh [user@]host 'quoted argv'`, short calls over one shared connection."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

# snapferry here is this interpreter's: the same code as the running command, without whatever wrapper (a venv's
# or pyenv's shim: 0.05 s of bash per start) stands first on PATH.
LOCAL_SNAPFERRY = (sys.executable, "-m", "snapferry")


@dataclass(frozen=True)
class Shell:
    """Runs argv on `host` (None: this host) with `ssh`; `snapferry` is the command that runs snapferry there.

    With `control_dir`, short calls (status, holds, clean-up) share one OpenSSH connection (a ControlMaster
    socket in that directory): each new connection costs a key exchange and a login, 0.26 s even on loopback,
    paid several times per dataset in a tree sync. Streams share it too when `shared_streams` (one transfer at
    a time); otherwise each gets its own connection, so that parallel transfers do not share one ssh
    process's encryption.
    """

    host: str | None = None
    user: str | None = None
    ssh: tuple[str, ...] = ("ssh",)
    snapferry: tuple[str, ...] = ("snapferry",)
    control_dir: str | None = None
    shared_streams: bool = False

    @property
    def destination(self) -> str:
        assert self.host is not None
        return f"{self.user}@{self.host}" if self.user else self.host

    def _shares_connections(self) -> bool:
        return self.control_dir is not None and os.path.basename(self.ssh[0]) == "ssh"

    def _via(self, stream: bool) -> list[str]:
        if self.host is None:
            return []
        if not self._shares_connections():
            return [*self.ssh, self.destination]
        # After the user's own words: ssh takes the first value given for an option, so theirs win.
        if stream and not self.shared_streams:
            return [*self.ssh, "-o", "ControlPath=none", self.destination]
        shared = ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.control_dir}/%C", "-o", "ControlPersist=60"]
        return [*self.ssh, *shared, self.destination]

    def argv(self, argv: list[str], stream: bool = False) -> list[str]:
        # ssh hands the remote shell one string: quote every word of it.
        via = self._via(stream)
        return [*via, shlex.join(argv)] if via else argv

    @property
    def sessions_carry_streams(self) -> bool:
        """Whether a stream may go over a session's connection: when streams share it anyway, or when every call
        has a connection of its own (no ControlMaster to share)."""
        return self.shared_streams or not self._shares_connections()

    def snapferry_argv(self, *args: str, stream: bool = False) -> list[str]:
        return self.argv([*(self.snapferry if self.host is not None else LOCAL_SNAPFERRY), *args], stream)

    def close(self) -> None:
        """Stop the shared connection, if one was started (it would otherwise linger for ControlPersist)."""
        if self.host is None or not self._shares_connections():
            return
        # If this fails the master ends by itself after ControlPersist; the sync's outcome stands.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(
                [*self.ssh, "-o", f"ControlPath={self.control_dir}/%C", "-O", "exit", self.destination],
                capture_output=True,
                check=False,
                timeout=10,
            )
