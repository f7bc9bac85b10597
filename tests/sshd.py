"""The pytest fixtures around snapferry_testkit.sshd_server: one real OpenSSH server per session.

Use it from a test module either as a plugin, `pytest_plugins = ["tests.sshd"]`, or by importing the
fixtures, `from tests.sshd import remote_snapferry, ssh_command, sshd_server  # noqa: F401`. Both
ways share the one server. (PYTEST_DONT_REWRITE: no asserts here, and no warning when a module has
imported this one before another names it in pytest_plugins.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from snapferry_testkit import sshd_server as server_module
from snapferry_testkit.sshd_server import SshdError, SshServer

__all__ = ["SshServer", "remote_snapferry", "ssh_command", "sshd_server"]

# Each module that imports the fixtures gets its own session-scoped fixture definition: they share
# this server, stopped when the last of them is torn down.
_shared: dict[str, object] = {"server": None, "users": 0}


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    if os.geteuid() != 0:
        pytest.fail("the ssh tests need root (they log in as root@127.0.0.1)")
    server = _shared["server"]
    if not isinstance(server, SshServer) or server.process.poll() is not None:
        try:
            server = _shared["server"] = server_module.start_sshd(tmp_path_factory.mktemp("sshd"))
        except SshdError as exc:
            pytest.fail(str(exc))
    _shared["users"] = int(_shared["users"]) + 1  # type: ignore[call-overload]
    try:
        yield server
    finally:
        _shared["users"] = int(_shared["users"]) - 1  # type: ignore[call-overload]
        if _shared["users"] == 0:
            server.stop()
            _shared["server"] = None


@pytest.fixture(scope="session")
def ssh_command(sshd_server: SshServer) -> str:
    """The `--ssh` CMD: `CMD root@127.0.0.1 'remote command'` reaches the test server."""
    return sshd_server.command


@pytest.fixture(scope="session")
def remote_snapferry() -> str:
    """The `--remote-snapferry` CMD: this interpreter's snapferry (see sshd_server.remote_snapferry)."""
    return server_module.remote_snapferry()
