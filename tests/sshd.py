"""A real OpenSSH server on 127.0.0.1 for the remote-side tests (one per session).

Use it from a test module either as a plugin, `pytest_plugins = ["tests.sshd"]`, or by importing the
fixtures, `from tests.sshd import remote_snapferry, ssh_command, sshd_server  # noqa: F401`. Both
ways share the one server. (PYTEST_DONT_REWRITE: no asserts here, and no warning when a module has
imported this one before another names it in pytest_plugins.)

`ssh_command` is the `--ssh` string for snapferry (a key-only login as root@127.0.0.1 on a free
port, no host-key prompts); `remote_snapferry` runs this interpreter's snapferry, because an ssh
session's PATH does not hold the pyenv shims.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = Path("/usr/sbin/sshd")
HOST = "127.0.0.1"


@dataclass
class SshServer:
    port: int
    client_key: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def command(self) -> str:
        return " ".join(
            [
                "ssh",
                "-i",
                shlex.quote(str(self.client_key)),
                "-p",
                str(self.port),
                "-o StrictHostKeyChecking=no",
                "-o UserKnownHostsFile=/dev/null",
                "-o BatchMode=yes",
                "-o LogLevel=ERROR",
                "-o ConnectTimeout=10",
            ]
        )

    @property
    def login(self) -> str:
        return f"root@{HOST}"

    def run(self, remote: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`ssh root@127.0.0.1 REMOTE` through this server."""
        argv = [*shlex.split(self.command), self.login, remote]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def _ensure_sshd() -> None:
    if SSHD.exists():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600, check=False)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600, check=False)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600, check=False)
    if not SSHD.exists():
        pytest.fail(f"cannot install openssh-server: {result.stdout[-2000:]}{result.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "snapferry-test", "-f", str(path)], check=True, timeout=60)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _start(base: Path) -> SshServer:
    host_key = base / "ssh_host_ed25519_key"
    client_key = base / "client_key"
    _keygen(host_key)
    _keygen(client_key)
    authorized = base / "authorized_keys"
    shutil.copyfile(f"{client_key}.pub", authorized)
    authorized.chmod(0o600)
    port = _free_port()
    config = base / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"ListenAddress {HOST}",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {authorized}",
                f"PidFile {base / 'sshd.pid'}",
                "PermitRootLogin yes",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "StrictModes no",
                "UsePAM no",
                "UseDNS no",
                "MaxStartups 100:30:200",
                "MaxSessions 100",
                "LogLevel INFO",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation directory
    log = base / "sshd.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = SshServer(port, client_key, log, process)
    deadline = time.monotonic() + 30
    while not _accepts(port):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(server)
            pytest.fail(f"sshd did not start (exit {process.returncode}): {log.read_text()[-3000:]}")
        time.sleep(0.05)
    last = None
    while time.monotonic() < deadline:
        last = server.run("true", timeout=20)
        if last.returncode == 0:
            return server
        time.sleep(0.2)
    _stop(server)
    pytest.fail(f"ssh login to the test sshd fails: {last.stderr if last else ''} / sshd: {log.read_text()[-3000:]}")


def _stop(server: SshServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)


# Each module that imports the fixtures gets its own session-scoped fixture definition: they share
# this server, stopped when the last of them is torn down.
_shared: dict[str, object] = {"server": None, "users": 0}


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    if os.geteuid() != 0:
        pytest.fail("the ssh tests need root (they log in as root@127.0.0.1)")
    server = _shared["server"]
    if not isinstance(server, SshServer) or server.process.poll() is not None:
        _ensure_sshd()
        server = _shared["server"] = _start(tmp_path_factory.mktemp("sshd"))
    _shared["users"] = int(_shared["users"]) + 1  # type: ignore[call-overload]
    try:
        yield server
    finally:
        _shared["users"] = int(_shared["users"]) - 1  # type: ignore[call-overload]
        if _shared["users"] == 0:
            _stop(server)
            _shared["server"] = None


@pytest.fixture(scope="session")
def ssh_command(sshd_server: SshServer) -> str:
    """The `--ssh` CMD: `CMD root@127.0.0.1 'remote command'` reaches the test server."""
    return sshd_server.command


@pytest.fixture(scope="session")
def remote_snapferry() -> str:
    """The `--remote-snapferry` CMD: this interpreter's snapferry (an ssh session has no pyenv shims on PATH)."""
    return f"{shlex.quote(sys.executable)} -m snapferry"
