"""`snapferry sync` to a real OpenSSH server on 127.0.0.1: streams, --no-stream, cut links, a killed sync, divergence."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from snapferry_testkit import zfs_testbed as tb

if TYPE_CHECKING:
    from snapferry_testkit.sshd_server import SshServer

# sshd_server, ssh_command and remote_snapferry: tests/sshd.py, a plugin registered in conftest.py.

REMOTE = "root@127.0.0.1"
SYNC_TIMEOUT = 120
# Over loopback a 24 MiB sync takes about 3 s: the cut and kill tests slow the link down so that
# the interruption surely lands mid-transfer, and count the bytes that crossed it.
RATE = 8 << 20


@dataclass
class SyncRun:
    returncode: int
    stdout: str
    stderr: str
    events: list[dict[str, object]] = field(default_factory=list)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def named(self, event: str) -> list[dict[str, object]]:
        return [e for e in self.events if e.get("event") == event]

    def steps(self) -> list[str]:
        return [str(step) for plan in self.named("plan") for step in plan.get("steps", [])]  # type: ignore[attr-defined]


def parse_events(stderr: str) -> list[dict[str, object]]:
    events = []
    for line in stderr.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def sync_argv(ssh: str, remote: str, *args: str) -> list[str]:
    return [*tb.SNAPFERRY, "sync", "--ssh", ssh, "--remote-snapferry", remote, *args]


def sync(ssh: str, remote: str, *args: str, timeout: float = SYNC_TIMEOUT) -> SyncRun:
    proc = subprocess.run(
        sync_argv(ssh, remote, *args), capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    return SyncRun(proc.returncode, proc.stdout, proc.stderr, parse_events(proc.stderr))


def dst_files(dataset: str) -> dict[str, str]:
    """The destination's files (snapferry may leave a received dataset unmounted).

    atime=off first: reading with atime on modifies the replica, which blocks the next incremental
    sync (see test_reading_the_replica_does_not_block_the_next_sync).
    """
    tb.sh("zfs", "set", "atime=off", dataset)
    if tb.sh("zfs", "get", "-H", "-o", "value", "mounted", dataset).stdout.decode().strip() != "yes":
        tb.sh("zfs", "mount", dataset)
    return tb.manifest(tb.mountpoint(dataset))


def guids(dataset: str) -> dict[str, int]:
    return {name: tb.guid(f"{dataset}@{name}") for name in tb.snapshot_names(dataset)}


def make_source(bed: tb.Bed, name: str, snaps: list[str], seed: int, megabytes: int = 4) -> tuple[str, dict[str, dict[str, str]]]:
    """A source dataset with the given snapshots, each after a change; returns it and each snapshot's files."""
    fs = bed.dataset(name)
    tb.sh("zfs", "create", fs)
    root = tb.mountpoint(fs)
    tb.write_tree(root, seed=seed, megabytes=megabytes)
    files = {}
    for i, snap in enumerate(snaps):
        if i:
            tb.change_tree(root, seed=seed + i)
        files[snap] = tb.snapshot(f"{fs}@{snap}")[1]
    return fs, files


def add_snapshots(fs: str, snaps: list[str], seed: int) -> dict[str, dict[str, str]]:
    root = tb.mountpoint(fs)
    files = {}
    for i, snap in enumerate(snaps):
        tb.change_tree(root, seed=seed + i)
        files[snap] = tb.snapshot(f"{fs}@{snap}")[1]
    return files


def assert_replica(src: str, dst: str, names: list[str], files: dict[str, str]) -> None:
    assert tb.snapshot_names(dst) == names
    src_guids = guids(src)
    assert guids(dst) == {n: src_guids[n] for n in names}
    assert tb.piece_names(dst) == [], "checkpoint snapshots must be gone after a completed sync"
    assert dst_files(dst) == files


def checkpoints(dataset: str) -> list[str]:
    """The committed checkpoint snapshots of a transfer in progress (not the piece being received)."""
    return [n for n in tb.piece_names(dataset) if not n.endswith("-open")] if tb.exists(dataset) else []


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        out = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True, check=False).stdout
        children = [int(p) for p in out.split()]
        found += children
        todo += children
    return found


def argv_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def ssh_clients(pid: int) -> list[int]:
    return [p for p in descendants(pid) if os.path.basename(argv_of(p)[0]) == "ssh"]


def wait_for(condition: object, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if proc is not None and proc.poll() is not None:
            lines = log.read_text().splitlines() if log is not None else []
            tail = "\n".join(line for line in lines if '"progress"' not in line and '"checkpoint"' not in line)[-3000:]
            pytest.fail(f"sync ended (exit {proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def remote_receives(dataset: str) -> list[int]:
    """The snapferry receive processes (started by sshd) still working on `dataset`."""
    pattern = f"snapferry receive .*{dataset}( |$)"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def slow_ssh(ssh: str, log: Path, down: Path | None = None) -> str:
    """The --ssh CMD through the throttle; the link is down while the file `down` exists."""
    words = [sys.executable, "-m", "snapferry_testkit.throttle", str(log), str(RATE), str(down or log.with_suffix(".never"))]
    return f"{shlex.join(words)} {ssh}"


def logged_bytes(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


@pytest.fixture(scope="module")
def big_source(bed: tb.Bed) -> tuple[str, dict[str, str], int]:
    """~24 MiB of random data in one snapshot: its dataset, files, and the length of its snapferry stream."""
    fs, files = make_source(bed, "big", ["s1"], seed=40, megabytes=24)
    return fs, files["s1"], len(tb.send_bytes(f"{fs}@s1"))


@pytest.fixture
def background() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Background syncs; any still running at the end of a test are killed with their process group."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def start_sync(procs: list[subprocess.Popen[bytes]], argv: list[str], stderr: Path) -> subprocess.Popen[bytes]:
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    procs.append(proc)
    return proc


# ---------------------------------------------------------------------------------------------------


def test_sshd_fixture_reaches_zfs_and_snapferry(bed: tb.Bed, sshd_server: SshServer, remote_snapferry: str) -> None:
    listed = sshd_server.run(f"zfs list -H -o name {bed.src.name}")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == bed.src.name
    token = sshd_server.run(f"{remote_snapferry} token {bed.dst.name}/nothing")
    assert token.returncode == 1, token.stderr
    assert "no resume token" in token.stderr


def test_sync_streams_every_snapshot_then_increments_then_is_up_to_date(bed: tb.Bed, ssh_command: str, remote_snapferry: str) -> None:
    src, files = make_source(bed, "stream", ["a", "b", "c"], seed=10)
    dst = bed.target("stream")
    target = f"{REMOTE}:{dst}"

    first = sync(ssh_command, remote_snapferry, "--json", src, target)
    assert first.returncode == 0, first.stderr
    assert_replica(src, dst, ["a", "b", "c"], files["c"])
    assert first.named("attempt") and first.named("attempt")[0]["number"] == 1
    assert first.steps() and all(isinstance(s, str) for s in first.steps())
    assert first.named("done") and not first.named("retry")

    files.update(add_snapshots(src, ["d", "e"], seed=20))
    second = sync(ssh_command, remote_snapferry, "--json", src, target)
    assert second.returncode == 0, second.stderr
    assert_replica(src, dst, ["a", "b", "c", "d", "e"], files["e"])

    third = sync(ssh_command, remote_snapferry, src, target)
    assert third.returncode == 0, third.stderr
    assert "up to date" in third.output.lower()
    assert tb.snapshot_names(dst) == ["a", "b", "c", "d", "e"]


def test_the_far_end_starts_once_per_step(
    bed: tb.Bed, sshd_server: SshServer, ssh_command: str, remote_snapferry: str, tmp_path: Path
) -> None:
    """Each start of snapferry on the far end costs an ssh session and Python's start-up: a sync asks for its status
    in a session, whose same process then receives the first step, and plans each next step from what the receive
    before reports at its end (receive --status-after), not from one more status call. All of it over one ssh
    connection (a login costs 0.26 s on loopback): the streams share the status call's."""
    logins_before = sshd_server.log.read_text().count("Accepted publickey")
    verbs = tmp_path / "verbs"
    logged = tmp_path / "snapferry-logged"
    logged.write_text(f'#!/bin/sh\necho "$1" >> {verbs}\nexec {remote_snapferry} "$@"\n')
    logged.chmod(0o755)
    src, files = make_source(bed, "starts", ["a", "b"], seed=31)
    dst = bed.target("starts")
    done = sync(ssh_command, str(logged), "--json", src, f"{REMOTE}:{dst}")
    assert done.returncode == 0, done.stderr
    assert_replica(src, dst, ["a", "b"], files["b"])
    far_end = verbs.read_text().split()  # the local end runs this interpreter's snapferry, not --remote-snapferry
    assert done.steps() and far_end == ["session"] * len(done.steps())
    assert len(done.steps()) == 2
    assert sshd_server.log.read_text().count("Accepted publickey") - logins_before == 1


def test_reading_the_replica_does_not_block_the_next_sync(bed: tb.Bed, ssh_command: str, remote_snapferry: str) -> None:
    """A replica that someone merely looked at (ls, cat: atime updates) must still take the next sync."""
    src, files = make_source(bed, "browsed", ["a"], seed=70)
    dst = bed.target("browsed")
    target = f"{REMOTE}:{dst}"
    first = sync(ssh_command, remote_snapferry, "-q", src, target)
    assert first.returncode == 0, first.stderr
    if tb.sh("zfs", "get", "-H", "-o", "value", "mounted", dst).stdout.decode().strip() != "yes":
        tb.sh("zfs", "mount", dst)
    root = tb.mountpoint(dst)
    subprocess.run(["ls", "-laR", str(root)], capture_output=True, check=True, timeout=30)
    (root / "numbers.txt").read_bytes()

    files.update(add_snapshots(src, ["b"], seed=80))
    second = sync(ssh_command, remote_snapferry, src, target)
    assert second.returncode == 0, second.stderr
    assert_replica(src, dst, ["a", "b"], files["b"])


def test_no_stream_sends_only_the_newest(bed: tb.Bed, ssh_command: str, remote_snapferry: str) -> None:
    src, files = make_source(bed, "newest", ["a", "b", "c"], seed=30)
    dst = bed.target("newest")
    result = sync(ssh_command, remote_snapferry, "--no-stream", "-q", src, f"{REMOTE}:{dst}")
    assert result.returncode == 0, result.stderr
    assert_replica(src, dst, ["c"], files["c"])


def test_pull_from_a_remote_source(bed: tb.Bed, ssh_command: str, remote_snapferry: str, tmp_path: Path) -> None:
    """The far end sends: its status, holds and the first step's send share one snapferry process there (a session,
    whose stream follows its one-frame answer on the same pipe)."""
    verbs = tmp_path / "verbs"
    logged = tmp_path / "snapferry-logged"
    logged.write_text(f'#!/bin/sh\necho "$1" >> {verbs}\nexec {remote_snapferry} "$@"\n')
    logged.chmod(0o755)
    src, files = make_source(bed, "pulled", ["a", "b"], seed=35)
    dst = bed.target("pulled")
    result = sync(ssh_command, str(logged), "--json", f"{REMOTE}:{src}", dst)
    assert result.returncode == 0, result.stderr
    assert_replica(src, dst, ["a", "b"], files["b"])
    # Each step's send takes a session, and the releases and the last plan after it take one more.
    assert verbs.read_text().split() == ["session"] * (len(result.steps()) + 1)


def test_an_unnamed_first_piece_left_by_a_crash_is_discarded_and_sent_again(bed: tb.Bed, ssh_command: str, remote_snapferry: str) -> None:
    """The daemon died after zfs receive committed the first piece and before its rename to a checkpoint."""
    src, files = make_source(bed, "unnamed", ["a", "b"], seed=37)
    dst = bed.target("unnamed")
    open_piece = f"snapferry-{tb.guid(f'{src}@a'):016x}-{0:016x}-0-open"
    # The piece has its own guid and only part of the tree: another small snapshot stands in for it.
    part, _ = make_source(bed, "unnamed-part", ["p"], seed=38, megabytes=1)
    tb.sh("zfs", "receive", f"{dst}@{open_piece}", input=tb.sh("zfs", "send", f"{part}@p").stdout)
    assert tb.snapshot_names(dst) == [open_piece]

    result = sync(ssh_command, remote_snapferry, "--json", src, f"{REMOTE}:{dst}")
    assert result.returncode == 0, result.stderr
    assert [e["reason"] for e in result.named("discard")] == ["uncommitted piece"]
    assert_replica(src, dst, ["a", "b"], files["b"])


def test_cut_connection_is_retried_until_done(
    bed: tb.Bed,
    ssh_command: str,
    remote_snapferry: str,
    big_source: tuple[str, dict[str, str], int],
    tmp_path: Path,
    background: list[subprocess.Popen[bytes]],
) -> None:
    src, files, _ = big_source
    dst = bed.target("cut")
    ssh = slow_ssh(ssh_command, tmp_path / "bytes.log")
    err = tmp_path / "sync.err"
    proc = start_sync(background, sync_argv(ssh, remote_snapferry, "--json", "--checkpoint", "1M", src, f"{REMOTE}:{dst}"), err)

    wait_for(lambda: checkpoints(dst), 60, "a checkpoint on the destination", proc, err)
    clients = ssh_clients(proc.pid)
    assert clients, "no ssh client under the running sync"
    for pid in clients:
        os.kill(pid, signal.SIGKILL)

    proc.wait(timeout=SYNC_TIMEOUT)
    stderr = err.read_text()
    assert proc.returncode == 0, stderr
    events = parse_events(stderr)
    retries = [e for e in events if e.get("event") == "retry"]
    assert retries, stderr
    assert retries[0]["delay"] == 1
    assert [e["number"] for e in events if e.get("event") == "attempt"][:2] == [1, 2]
    assert [e for e in events if e.get("event") == "done"]
    assert_replica(src, dst, ["s1"], files)


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A port that completes the TCP handshake but never speaks: ssh times out in the banner exchange."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])


def test_link_down_for_a_while_is_retried(
    silent_port: int,
    bed: tb.Bed,
    ssh_command: str,
    remote_snapferry: str,
    big_source: tuple[str, dict[str, str], int],
    tmp_path: Path,
    background: list[subprocess.Popen[bytes]],
) -> None:
    """The link drops mid-transfer and stays down past the first retry: sync keeps backing off until it is back."""
    src, files, _ = big_source
    dst = bed.target("outage")
    down, err = tmp_path / "link-down", tmp_path / "sync.err"
    ssh = slow_ssh(ssh_command, tmp_path / "bytes.log", down)
    proc = start_sync(background, sync_argv(ssh, remote_snapferry, "--json", "--checkpoint", "1M", src, f"{REMOTE}:{dst}"), err)

    wait_for(lambda: checkpoints(dst), 60, "a checkpoint on the destination", proc, err)
    # From now on ssh meets "Connection timed out during banner exchange" (exit 255), as over a dead link.
    # (A closed port, "Connection refused", is what test_gives_up_with_exit_3_after_retries_or_deadline meets.)
    down.write_text(str(silent_port))
    for pid in ssh_clients(proc.pid):
        os.kill(pid, signal.SIGKILL)

    def retries() -> list[dict[str, object]]:
        return [e for e in parse_events(err.read_text()) if e.get("event") == "retry"]

    # The first retry (after 1 s) finds the host unreachable: back off again.
    wait_for(lambda: len(retries()) >= 2, 30, "a second retry while the link is down", proc, err)
    down.unlink()
    proc.wait(timeout=SYNC_TIMEOUT)
    stderr = err.read_text()
    assert proc.returncode == 0, stderr
    assert [e["delay"] for e in retries()][:2] == [1, 2], stderr
    assert_replica(src, dst, ["s1"], files)


def test_gives_up_with_exit_3_after_retries_or_deadline(bed: tb.Bed, ssh_command: str, remote_snapferry: str, tmp_path: Path) -> None:
    """A host that stays unreachable: --retries N, or --deadline, ends the sync with exit 3 (run it again later)."""
    src, _ = make_source(bed, "unreachable", ["a"], seed=90, megabytes=1)
    down = tmp_path / "link-down"
    down.write_text("1")
    ssh = slow_ssh(ssh_command, tmp_path / "bytes.log", down)
    target = f"{REMOTE}:{bed.target('unreachable')}"

    result = sync(ssh, remote_snapferry, "--json", "--retries", "2", src, target, timeout=60)
    assert result.returncode == 3, result.stderr
    assert [e["delay"] for e in result.named("retry")] == [1, 2], result.stderr
    assert [e["number"] for e in result.named("attempt")] == [1, 2, 3]
    assert "resume" in result.stderr.splitlines()[-1].lower(), result.stderr

    started = time.monotonic()
    result = sync(ssh, remote_snapferry, "-q", "--retries", "100", "--deadline", "2", src, target, timeout=60)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started < 10
    down.unlink()
    assert not tb.exists(bed.target("unreachable"))


def test_zfs_daemon_restart_is_retried(
    bed: tb.Bed,
    ssh_command: str,
    remote_snapferry: str,
    big_source: tuple[str, dict[str, str], int],
    tmp_path: Path,
    background: list[subprocess.Popen[bytes]],
) -> None:
    """kill -9 of the zfs-fuse daemon (both ends live on this host) mid-transfer, restarted, pools re-imported."""
    src, files, _ = big_source
    dst = bed.target("restart")
    err = tmp_path / "sync.err"
    ssh = slow_ssh(ssh_command, tmp_path / "bytes.log")
    proc = start_sync(background, sync_argv(ssh, remote_snapferry, "--json", "--checkpoint", "1M", src, f"{REMOTE}:{dst}"), err)

    wait_for(lambda: checkpoints(dst), 60, "a checkpoint on the destination", proc, err)
    tb.reboot_daemon([bed.src.directory, bed.dst.directory], [bed.src.name, bed.dst.name])
    proc.wait(timeout=SYNC_TIMEOUT)
    stderr = err.read_text()
    assert proc.returncode == 0, stderr
    assert [e for e in parse_events(stderr) if e.get("event") == "retry"], stderr
    assert_replica(src, dst, ["s1"], files)


def test_killed_sync_resumes_where_it_stopped(
    bed: tb.Bed,
    ssh_command: str,
    remote_snapferry: str,
    big_source: tuple[str, dict[str, str], int],
    tmp_path: Path,
    background: list[subprocess.Popen[bytes]],
) -> None:
    src, files, stream_len = big_source
    dst = bed.target("killed")
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    args = ["--json", "--checkpoint", "1M", src, f"{REMOTE}:{dst}"]
    err = tmp_path / "first.err"
    proc = start_sync(background, sync_argv(slow_ssh(ssh_command, first_log), remote_snapferry, *args), err)

    # A "reboot" of the sending host: the sync and everything it started die at once.
    wait_for(lambda: len(checkpoints(dst)) >= 2, 60, "two checkpoints on the destination", proc, err)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The receiving host notices the lost connection and its receive ends (exit 3, checkpoints kept).
    wait_for(lambda: not remote_receives(dst), 60, "the remote receive to end")
    token = tb.snapferry("token", dst)
    assert token.returncode == 0, token.stderr
    committed = json.loads(tb.snapferry("token", "--decode", token.stdout.decode().strip()).stdout)["offset"]
    assert 0 < committed < stream_len

    second = sync(slow_ssh(ssh_command, second_log), remote_snapferry, *args)
    assert second.returncode == 0, second.stderr
    assert_replica(src, dst, ["s1"], files)
    assert any("resum" in step.lower() for step in second.steps()), second.steps()
    # Nothing committed crossed the link again: the rest of the stream, a new BEGIN and END, and no more.
    resent = logged_bytes(second_log)
    assert resent <= stream_len - committed + (64 << 10), (resent, stream_len, committed)


def test_diverged_destination_is_refused_and_kept(bed: tb.Bed, ssh_command: str, remote_snapferry: str) -> None:
    src, _ = make_source(bed, "diverged", ["a", "b"], seed=50)
    dst = bed.target("diverged")
    target = f"{REMOTE}:{dst}"
    assert sync(ssh_command, remote_snapferry, "-q", src, target).returncode == 0
    add_snapshots(src, ["c"], seed=60)
    tb.sh("zfs", "snapshot", f"{dst}@local")  # taken on the destination only, after the common @b
    before = guids(dst)

    result = sync(ssh_command, remote_snapferry, src, target)
    assert result.returncode == 4, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "diverged" in lines[0], result.stderr
    assert guids(dst) == before == {**{n: g for n, g in guids(src).items() if n in ("a", "b")}, "local": before["local"]}

    # --force rolls the destination back to the common @b (dropping @local), then syncs.
    forced = sync(ssh_command, remote_snapferry, "-q", "--force", src, target)
    assert forced.returncode == 0, forced.stderr
    assert guids(dst) == guids(src)

    # No common snapshot at all, while the destination has snapshots: refused too.
    stranger = bed.target("stranger")
    tb.sh("zfs", "create", stranger)
    tb.sh("zfs", "snapshot", f"{stranger}@own")
    before = guids(stranger)
    result = sync(ssh_command, remote_snapferry, src, f"{REMOTE}:{stranger}")
    assert result.returncode == 4, result.output
    assert "diverged" in result.stderr
    assert guids(stranger) == before
