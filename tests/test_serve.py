"""`snapferry serve` as a real SSH forced command: a restricted key syncs only where it is allowed."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from snapferry.transport.session import RemoteSession
from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.sshd_server import SshServer


def restricted_key(server: SshServer, name: str, serve_args: str) -> str:
    """Add a key whose only command is `snapferry serve SERVE_ARGS`; return the --ssh CMD for it."""
    key = server.client_key.parent / name
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        forced = f"{sys.executable} -m snapferry serve {serve_args}"
        line = f'command="{forced}",no-pty,no-port-forwarding {Path(f"{key}.pub").read_text().strip()}\n'
        with open(server.client_key.parent / "authorized_keys", "a") as keys:
            keys.write(line)
    return server.command.replace(shlex.quote(str(server.client_key)), shlex.quote(str(key)))


def sync(ssh: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [*tb.SNAPFERRY, "sync", "-q", "--ssh", ssh, "--remote-snapferry", "snapferry", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def source(bed: tb.Bed) -> str:
    fs = bed.dataset("served")
    tb.sh("zfs", "create", fs)
    tb.write_tree(tb.mountpoint(fs), seed=90, megabytes=4)
    tb.snapshot(f"{fs}@a")
    tb.sh("zfs", "create", f"{bed.dst.name}/allowed")
    return fs


def test_restricted_key_syncs_into_its_prefix(bed: tb.Bed, sshd_server: SshServer, source: str) -> None:
    ssh = restricted_key(sshd_server, "writer_key", f"--allow {bed.dst.name}/allowed")
    dst = f"{bed.dst.name}/allowed/fs"
    result = sync(ssh, source, f"root@127.0.0.1:{dst}")
    assert result.returncode == 0, result.stderr
    assert tb.guid(f"{dst}@a") == tb.guid(f"{source}@a")


def test_restricted_key_is_refused_outside_its_prefix(bed: tb.Bed, sshd_server: SshServer, source: str) -> None:
    ssh = restricted_key(sshd_server, "writer_key", f"--allow {bed.dst.name}/allowed")
    result = sync(ssh, source, f"root@127.0.0.1:{bed.dst.name}/other")
    assert result.returncode == 4, result.stderr
    assert "outside --allow" in result.stderr and "Traceback" not in result.stderr
    assert not tb.exists(f"{bed.dst.name}/other")
    shell = subprocess.run(
        [*shlex.split(ssh), "root@127.0.0.1", "cat /etc/shadow"], capture_output=True, text=True, timeout=60, check=False
    )
    assert shell.returncode == 4 and "cat is not allowed" in shell.stderr


def test_read_only_key_cannot_receive(bed: tb.Bed, sshd_server: SshServer, source: str) -> None:
    ssh = restricted_key(sshd_server, "reader_key", f"--allow {bed.dst.name}/allowed --read-only")
    result = sync(ssh, source, f"root@127.0.0.1:{bed.dst.name}/allowed/ro")
    assert result.returncode == 4, result.stderr
    assert "read-only" in result.stderr
    assert not tb.exists(f"{bed.dst.name}/allowed/ro")


def _as_key(ssh: str, command: str) -> subprocess.CompletedProcess[str]:
    """Run `command` as the restricted key's holder would ask for it (SSH_ORIGINAL_COMMAND)."""
    return subprocess.run([*shlex.split(ssh), "root@127.0.0.1", command], capture_output=True, text=True, timeout=60, check=False)


def test_restricted_key_cannot_roll_back_raw_or_outside_or_over_a_clone_outside(bed: tb.Bed, sshd_server: SshServer) -> None:
    """No raw zfs reaches the host (zfs rollback -R destroys clones wherever they are), and snapferry rollback
    is refused when anything it would destroy, clones included, is outside --allow. Nothing changes."""
    allowed = f"{bed.dst.name}/allowed"
    tb.sh("zfs", "create", "-p", allowed)
    ssh = restricted_key(sshd_server, "writer_key", f"--allow {allowed}")
    fs, outside = f"{allowed}/rb", f"{bed.dst.name}/rb_outside"
    tb.sh("zfs", "create", fs)
    tb.sh("zfs", "create", outside)
    for snap in ("a", "b"):
        tb.snapshot(f"{fs}@{snap}")
        tb.snapshot(f"{outside}@{snap}")
    clone = f"{bed.dst.name}/rb_clone"
    tb.sh("zfs", "clone", f"{fs}@b", clone)
    before = (tb.snapshot_names(fs), tb.snapshot_names(outside))

    raw = _as_key(ssh, f"zfs rollback -R {fs}@a")
    assert raw.returncode == 4 and "snapferry: serve: zfs is not allowed for this key" in raw.stderr
    elsewhere = _as_key(ssh, f"snapferry rollback -r {outside}@a")
    assert elsewhere.returncode == 4 and f"dataset {outside} is outside --allow" in elsewhere.stderr
    over_clone = _as_key(ssh, f"snapferry rollback --json -r {fs}@a")
    assert over_clone.returncode == 4 and f"dataset {clone} is outside --allow" in over_clone.stderr
    assert '"event": "error", "class": "Refused", "code": 4' in over_clone.stderr  # what sync reads
    assert (tb.snapshot_names(fs), tb.snapshot_names(outside)) == before and tb.exists(clone)

    # Even unrestricted, snapferry rollback never destroys a clone: zfs rollback -r would refuse anyway, this says why.
    local = tb.snapferry("rollback", "-r", f"{fs}@a")
    assert local.returncode == 4 and f"later snapshots have clones ({clone})" in local.stderr
    plain = f"{allowed}/rb_plain"
    tb.sh("zfs", "create", plain)
    for snap in ("a", "b"):
        tb.snapshot(f"{plain}@{snap}")
    done = _as_key(ssh, f"snapferry rollback -r {plain}@a")
    assert done.returncode == 0, done.stderr
    assert tb.snapshot_names(plain) == ["a"] and tb.snapshot_names(fs) == before[0]


def test_a_restricted_keys_session_checks_every_request(bed: tb.Bed, sshd_server: SshServer, source: str) -> None:
    """sync's session under serve: each request passes the same policy as a command of its own, a refusal does not
    end the session, and a refused stream says why on stderr, as sync reads it."""
    ssh = restricted_key(sshd_server, "writer_key", f"--allow {bed.dst.name}/allowed")
    session = RemoteSession([*shlex.split(ssh), "root@127.0.0.1", "snapferry session"])
    try:
        allowed = session.call(["status", "--json", f"{bed.dst.name}/allowed"])
        assert allowed.returncode == 0 and b'"exists": true' in allowed.stdout
        outside = session.call(["status", "--json", f"{bed.dst.name}/other"])
        assert outside.returncode == 4
        assert outside.stderr_lines[-1] == f"snapferry: serve: dataset {bed.dst.name}/other is outside --allow {bed.dst.name}/allowed"
        raw = session.call(["--zfs", "/bin/sh", "status", "--json", f"{bed.dst.name}/allowed"])
        assert raw.returncode == 4 and "not allowed" in raw.stderr_lines[-1]
        assert session.call(["status", "--json", f"{bed.dst.name}/allowed"]).returncode == 0  # still the same session
        stream = session.stream(["receive", "--json", "-s", f"{bed.dst.name}/other"])
        os.close(stream.fd)
        assert stream.proc.wait(timeout=60) == 4
        assert stream.proc.stderr is not None and b"outside --allow" in stream.proc.stderr.read()
    finally:
        session.close()
    assert not tb.exists(f"{bed.dst.name}/other")
