"""A throwaway OpenSSH server on 127.0.0.1 for the chaos runner: generated keys, a free port, stopped on close()."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "snapferry-chaos", "-f", str(path)], check=True, timeout=60)


def ensure_sshd() -> None:
    """Install openssh-server when it is missing (as tests/sshd.py does)."""
    if SSHD.exists():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server"]
    if subprocess.run(install, capture_output=True, env=env, timeout=600, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600, check=False)
        subprocess.run(install, capture_output=True, env=env, timeout=600, check=False)
    if not SSHD.exists():
        raise RuntimeError("cannot install openssh-server")


@dataclass
class SshServer:
    port: int
    client_key: Path
    log: Path
    process: subprocess.Popen[bytes]

    def ssh_command(self, port: int | None = None, keepalive: bool = True) -> str:
        """The `--ssh` CMD for snapferry, to `port` (a proxy in front of this server) or to the server itself.

        With `keepalive` ssh gives up after about 3 s without an answer: a stalled link then fails
        the attempt instead of hanging it (the default would wait for TCP, for hours)."""
        words = [
            "ssh",
            "-p",
            str(port or self.port),
            "-i",
            str(self.client_key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=5",
        ]
        if keepalive:
            words += ["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3"]
        return shlex.join(words)

    def run(self, remote: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        argv = [*shlex.split(self.ssh_command()), f"root@{HOST}", remote]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_sshd(base: Path) -> SshServer:
    """sshd -D on a free port of 127.0.0.1 that lets one generated key log in as root."""
    ensure_sshd()
    base.mkdir(parents=True, exist_ok=True)
    host_key, client_key = base / "ssh_host_ed25519_key", base / "client_key"
    _keygen(host_key)
    _keygen(client_key)
    authorized = base / "authorized_keys"
    shutil.copyfile(f"{client_key}.pub", authorized)
    authorized.chmod(0o600)
    port = free_port()
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
                # sync opens a connection per remote command, retries reconnect at once.
                "MaxStartups 200:30:400",
                "MaxSessions 100",
                "LogLevel ERROR",
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
            server.stop()
            raise RuntimeError(f"sshd did not start (exit {process.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.05)
    last = None
    while time.monotonic() < deadline:
        last = server.run("true", timeout=20)
        if last.returncode == 0:
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"ssh login to the chaos sshd fails: {last.stderr if last else ''}")


def remote_snapferry() -> str:
    """This interpreter's snapferry: an ssh session's PATH has no pyenv shims."""
    return f"{shlex.quote(sys.executable)} -m snapferry"
