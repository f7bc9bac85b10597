"""Shared helpers for the zfs-fuse benchmarks: scratch pools, data sets, timed pipelines.

Every pool made here is named sfbench<tag><role>, lives on a sparse file in the work directory,
and is destroyed (with its file) by ScratchPools.close(); nothing else is ever touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from snapferry_testkit.sshd_server import SshServer

MiB = 1 << 20
GiB = 1 << 30


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def zfs_get(name: str, prop: str) -> str:
    return run("zfs", "get", "-H", "-p", "-o", "value", prop, name).stdout.strip()


def exists(name: str) -> bool:
    return run("zfs", "list", "-H", "-o", "name", name, check=False).returncode == 0


def rename(name: str, new_name: str, attempts: int = 20) -> None:
    """zfs rename with retries: zfs-fuse answers 'dataset is busy' for a while after a receive."""
    for attempt in range(attempts):
        proc = run("zfs", "rename", name, new_name, check=False)
        if proc.returncode == 0:
            return
        if "busy" not in proc.stderr or attempt == attempts - 1:
            raise RuntimeError(f"zfs rename {name} {new_name}: {proc.stderr.strip()}")
        time.sleep(0.5)


def destroy(name: str, attempts: int = 20) -> None:
    """zfs destroy -r with retries: zfs-fuse answers 'dataset is busy' for a while after reads."""
    for attempt in range(attempts):
        if not exists(name):
            return
        proc = run("zfs", "destroy", "-r", name, check=False)
        if proc.returncode == 0:
            return
        if "busy" not in proc.stderr or attempt == attempts - 1:
            raise RuntimeError(f"zfs destroy -r {name}: {proc.stderr.strip()}")
        time.sleep(0.5)


def daemon_pid() -> int | None:
    proc = run("pgrep", "-x", "zfs-fuse", check=False)
    pids = proc.stdout.split()
    return int(pids[0]) if pids else None


def proc_cpu_seconds(pid: int | None) -> float:
    """utime + stime of a running process from /proc (0 when unknown)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ScratchPools:
    """Uniquely named file-backed pools, destroyed with their files on close()."""

    def __init__(self, workdir: str, label: str) -> None:
        self.workdir = Path(workdir)
        self.tag = f"{label}{os.getpid()}{secrets.token_hex(2)}"
        self.pools: list[tuple[str, Path]] = []

    def create(self, role: str, size_bytes: int) -> str:
        name = f"sfbench{self.tag}{role}"
        image = self.workdir / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size_bytes)
        self.pools.append((name, image))
        run("zpool", "create", "-O", "atime=off", name, str(image))
        log(f"created pool {name} on {image} ({size_bytes / GiB:.0f} GiB sparse)")
        return name

    def close(self) -> None:
        for name, image in reversed(self.pools):
            for attempt in range(20):
                proc = run("zpool", "destroy", name, check=False)
                if proc.returncode == 0 or "no such pool" in proc.stderr:
                    break
                if attempt == 19:
                    log(f"WARNING: could not destroy pool {name}: {proc.stderr.strip()}")
                time.sleep(0.5)
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
        self.pools.clear()

    def __enter__(self) -> ScratchPools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fill_random(directory: str, total_mib: int, file_mib: int = 64, prefix: str = "f", seed: int = 0) -> list[str]:
    """Write total_mib of incompressible random data as files of about file_mib each."""
    import numpy as np

    rng = np.random.default_rng(seed)
    written = []
    remaining = total_mib
    index = 0
    while remaining > 0:
        size = min(file_mib, remaining)
        path = os.path.join(directory, f"{prefix}{index:04d}")
        with open(path, "wb") as f:
            for _ in range(size // 4):
                f.write(rng.bytes(4 * MiB))
            if size % 4:
                f.write(rng.bytes((size % 4) * MiB))
        written.append(path)
        remaining -= size
        index += 1
    os.sync()
    return written


def tree_digest(directory: str) -> dict[str, str]:
    """sha256 of every regular file under directory, by relative path."""
    digests = {}
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            path = os.path.join(root, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(4 * MiB):
                    h.update(chunk)
            digests[os.path.relpath(path, directory)] = h.hexdigest()
    return digests


def stream_size(snapshot: str) -> int:
    """Bytes of `zfs send snapshot` (also warms the caches for the timed runs)."""
    proc = subprocess.Popen(["zfs", "send", snapshot], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    buf = bytearray(4 * MiB)
    total = 0
    while n := proc.stdout.readinto(buf):
        total += n
    if proc.wait() != 0:
        raise RuntimeError(f"zfs send {snapshot} failed")
    return total


@dataclass
class StageResult:
    argv: list[str]
    returncode: int
    user: float
    sys: float
    maxrss_kib: int
    stderr: str = ""


@dataclass
class PipelineResult:
    wall: float
    stages: list[StageResult] = field(default_factory=list)
    daemon_cpu: float = 0.0
    host_cpu: float = 0.0  # CPU seconds the whole host was busy during the run, every process and the kernel's threads

    @property
    def ok(self) -> bool:
        return all(s.returncode == 0 for s in self.stages)


def host_busy_seconds() -> float:
    """CPU seconds the host has been busy since boot, over all cores (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def settle(window_s: float = 0.25, busy_below: float = 0.1, limit_s: float = 5.0) -> float:
    """Wait until the host is quiet: the zfs-fuse daemon writing out the last run's data and freeing a destroyed
    dataset's blocks in the background would otherwise slow whichever variant runs next. Returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        before = host_busy_seconds()
        time.sleep(window_s)
        if (host_busy_seconds() - before) / window_s < busy_below * (os.cpu_count() or 1):
            break
    return time.monotonic() - start


def run_pipeline(stages: Sequence[Sequence[str]], env: dict[str, str] | None = None) -> PipelineResult:
    """Run `a | b | ...` and return wall time plus each process's own rusage (via wait4).

    wait4's rusage of a process also covers the children it waited for, so a snapferry receive
    stage includes the `zfs receive` processes it ran (those are thin clients of the daemon).
    """
    dpid = daemon_pid()
    daemon_before = proc_cpu_seconds(dpid)
    host_before = host_busy_seconds()
    procs: list[subprocess.Popen[bytes]] = []
    start = time.perf_counter()
    prev = None
    for i, argv in enumerate(stages):
        last = i == len(stages) - 1
        p = subprocess.Popen(
            list(argv),
            stdin=prev,
            stdout=subprocess.DEVNULL if last else subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        if prev is not None:
            prev.close()
        prev = p.stdout
        procs.append(p)
    # Drain stderr of all stages without blocking: they write little, so read them at the end
    # through temporary threads only if needed; here each stage's stderr is tiny, read after wait.
    results: dict[int, tuple[int, object]] = {}
    pending = {p.pid for p in procs}
    while pending:
        pid, status, usage = os.wait4(-1, 0)
        if pid in pending:
            pending.discard(pid)
            results[pid] = (status, usage)
    wall = time.perf_counter() - start
    out = PipelineResult(wall, host_cpu=host_busy_seconds() - host_before)
    for p, argv in zip(procs, stages, strict=True):
        status, usage = results[p.pid]
        p.returncode = os.waitstatus_to_exitcode(status)  # type: ignore[arg-type]
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        if p.stderr:
            p.stderr.close()
        out.stages.append(
            StageResult(list(argv), p.returncode, usage.ru_utime, usage.ru_stime, usage.ru_maxrss, err.strip())  # type: ignore[attr-defined]
        )
    out.daemon_cpu = proc_cpu_seconds(dpid) - daemon_before
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def snapferry_argv() -> list[str]:
    """This interpreter's snapferry script, as pip installs it on Debian; not a wrapper first on PATH (pyenv's
    shim adds 0.05 s of bash to every start, which no user outside pyenv pays)."""
    script = Path(sys.executable).parent / "snapferry"
    return [str(script)] if script.exists() else [sys.executable, "-m", "snapferry"]


SYNCOID_SSH_OPTIONS = ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "BatchMode=yes", "LogLevel=ERROR")
SYNCOID_FALLBACK_BUG = "return getsnapsfallback($type,$rhost,$fs,$isroot,%snaps);"


def patched_syncoid(directory: Path) -> str:
    """A copy of the installed syncoid in directory, able to list a remote's snapshots on zfs-fuse.

    zfs-fuse's `zfs get` has no `-t`, so syncoid falls back to listing without it, and syncoid 2.1.0
    (Debian's sanoid) then puts the ssh command in front twice (`bash: root@HOST: command not found`,
    sanoid issue #749): every sync to a remote that already has the dataset fails. The copy passes the
    fallback the host as given, as later syncoids do; nothing else changes."""
    installed = shutil.which("syncoid")
    if installed is None:
        raise RuntimeError("syncoid is not installed (apt-get install sanoid)")
    text = Path(installed).read_text()
    copy = directory / "syncoid"
    copy.write_text(text.replace(SYNCOID_FALLBACK_BUG, SYNCOID_FALLBACK_BUG.replace("$rhost", "$_[1]")))
    copy.chmod(0o755)
    if SYNCOID_FALLBACK_BUG not in text:
        log("syncoid: the snapshot-listing fallback looks fixed already; running it unchanged")
    return str(copy)


def syncoid_argv(syncoid: str, server: SshServer, port: int, source: str, target: str, compress: str, *options: str) -> list[str]:
    """`syncoid` (Debian's sanoid) from source to target (`root@127.0.0.1:DST`) over the test sshd at port.

    --no-sync-snap: it sends the snapshots that exist, as snapferry does; compress is `none` or one of
    syncoid's names (`lzo` is its default). options (e.g. `-r`, or `--sshoption=...`) come first."""
    argv = [syncoid, *options, "--no-sync-snap", f"--compress={compress}", "--quiet", f"--sshport={port}"]
    argv += [f"--sshkey={server.client_key}", *(f"--sshoption={o}" for o in SYNCOID_SSH_OPTIONS)]
    return [*argv, source, target]


def syncoid_sockets() -> set[Path]:
    """The ssh ControlMaster sockets syncoid has in /tmp (it names them /tmp/syncoid-HOST-TIME)."""
    return set(Path("/tmp").glob("syncoid-*"))


def close_syncoid_masters(before: set[Path]) -> None:
    """Close the ssh masters of sockets syncoid left since `before` (a killed run leaves its master).

    A master that is gone leaves its socket file; it is removed, so that no later ssh trips on it."""
    for socket in syncoid_sockets() - before:
        run("ssh", "-S", str(socket), "-O", "exit", "placeholder", check=False)
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()


def install_sigterm_cleanup() -> None:
    """Turn SIGTERM into KeyboardInterrupt so the finally blocks destroy the pools."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
