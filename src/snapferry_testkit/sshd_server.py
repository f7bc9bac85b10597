"""A throwaway OpenSSH server on 127.0.0.1: generated keys, a free port, a root login by key only.

Plain code without pytest, shared by the test fixtures (tests/sshd.py) and the bench scripts
(chaos, sync_bench). Failures raise SshdError.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from snapferry_testkit.loopback import HOST, accepts, free_port

SSHD = Path("/usr/sbin/sshd")


class SshdError(RuntimeError):
    """The server cannot be installed, started or logged into."""


@dataclass
class SshServer:
    port: int
    client_key: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def login(self) -> str:
        return f"root@{HOST}"

    @property
    def command(self) -> str:
        """The `--ssh` CMD for snapferry: `CMD root@127.0.0.1 'remote command'` reaches this server."""
        return self.ssh_command()

    def ssh_command(self, port: int | None = None, keepalive: bool = False) -> str:
        """The `--ssh` CMD to `port` (a proxy in front of this server) or to the server itself.

        With `keepalive` ssh gives up after about 3 s without an answer: a stalled link then fails
        the attempt instead of hanging it (the default would wait for TCP, for hours)."""
        words = ["ssh", "-i", str(self.client_key), "-p", str(port or self.port)]
        words += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"]
        words += ["-o", "LogLevel=ERROR", "-o", f"ConnectTimeout={5 if keepalive else 10}"]
        if keepalive:
            words += ["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3"]
        return shlex.join(words)

    def run(self, remote: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`ssh root@127.0.0.1 REMOTE` through this server."""
        argv = [*shlex.split(self.command), self.login, remote]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def ensure_sshd() -> None:
    """Install openssh-server when it is missing."""
    if SSHD.exists():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600, check=False)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600, check=False)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600, check=False)
    if not SSHD.exists():
        raise SshdError(f"cannot install openssh-server: {result.stdout[-2000:]}{result.stderr[-2000:]}")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "snapferry-test", "-f", str(path)], check=True, timeout=60)


def _write_config(base: Path, port: int, host_key: Path, authorized: Path) -> Path:
    config = base / "sshd_config"
    lines = [
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
        # sync opens a connection per remote command, and its retries reconnect at once.
        "MaxStartups 200:30:400",
        "MaxSessions 100",
        "LogLevel INFO",
    ]
    config.write_text("\n".join(lines) + "\n")
    return config


def start_sshd(base: Path) -> SshServer:
    """sshd -D on a free port of 127.0.0.1 that lets one generated key log in as root; files go in `base`."""
    ensure_sshd()
    base.mkdir(parents=True, exist_ok=True)
    host_key, client_key = base / "ssh_host_ed25519_key", base / "client_key"
    _keygen(host_key)
    _keygen(client_key)
    authorized = base / "authorized_keys"
    shutil.copyfile(f"{client_key}.pub", authorized)
    authorized.chmod(0o600)
    port = free_port()
    config = _write_config(base, port, host_key, authorized)
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation directory
    log = base / "sshd.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = SshServer(port, client_key, log, process)
    deadline = time.monotonic() + 30
    while not accepts(port):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise SshdError(f"sshd did not start (exit {process.returncode}): {log.read_text()[-3000:]}")
        time.sleep(0.05)
    last = None
    while time.monotonic() < deadline:
        last = server.run("true", timeout=20)
        if last.returncode == 0:
            return server
        time.sleep(0.2)
    server.stop()
    raise SshdError(f"ssh login to the test sshd fails: {last.stderr if last else ''} / sshd: {log.read_text()[-3000:]}")


def remote_snapferry() -> str:
    """The `--remote-snapferry` CMD: this interpreter's snapferry.

    An ssh session's PATH has no pyenv shims, and its environment no PYTHONPATH: one set here (a
    checkout run without installing it) is passed on, so both ends run the same code."""
    command = f"{shlex.quote(sys.executable)} -m snapferry"
    path = os.environ.get("PYTHONPATH")
    return f"env PYTHONPATH={shlex.quote(path)} {command}" if path else command
