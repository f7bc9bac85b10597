"""Host side of the real-OpenZFS test bed: builds the cached VM image, the wheelhouse and the payload, boots qemu."""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "openzfs-vm"
VERSIONS = ("2.3", "2.1")

# The VM is Debian bookworm: CPython 3.11 on x86_64, glibc 2.36.
VM_PYTHON = "3.11"
VM_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# Linters are for the host; inside the VM they would only cost download and install time.
HOST_ONLY_DEPS = frozenset({"ruff", "mypy"})

OUTPUT_DISK_BYTES = 512 * 1024 * 1024
SERIAL_TAIL_LINES = 60


class VmError(RuntimeError):
    """The VM could not be built, booted, or did not hand back its results: a test bed failure, never a skip."""


@dataclass(frozen=True)
class VmResult:
    rc: int
    log: str
    results: Path
    serial_log: Path


def cache_dir() -> Path:
    return Path(os.environ.get("SNAPFERRY_VM_CACHE", "/var/cache/snapferry-vm"))


def ensure_image(version: str) -> Path:
    """Build the image for `version` unless it is cached; return its directory."""
    if version not in VERSIONS:
        raise ValueError(f"unknown OpenZFS VM version {version!r}; known: {', '.join(VERSIONS)}")
    proc = subprocess.run(["bash", str(SCRIPTS / "build-image.sh"), version], capture_output=True, text=True, check=False)
    if proc.stdout:
        print(proc.stdout, end="")
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        why = lines[-1] if lines else f"build-image.sh exited {proc.returncode} without a message"
        raise VmError(f"THE OPENZFS {version} VM IMAGE COULD NOT BE BUILT: {why}\n" + "\n".join(lines[-40:-1]))
    image = cache_dir() / f"zfs-{version}"
    if not (image / ".complete").exists():
        raise VmError(f"THE OPENZFS {version} VM IMAGE COULD NOT BE BUILT: build-image.sh left no {image}/.complete")
    return image


def vm_requirements() -> list[str]:
    """snapferry's runtime and test requirements as pyproject.toml states them, minus the host-only linters."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("test", [])]
    return [r for r in reqs if _req_name(r) not in HOST_ONLY_DEPS]


def _req_name(req: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", req)
    return match.group(0).lower().replace("_", "-") if match else req


def _pip(*args: str) -> None:
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmError(f"openzfs-vm: `{' '.join(argv)}` failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def _dependency_wheels() -> Path:
    """Wheels of snapferry's dependencies for the VM's Python, downloaded once per requirement set."""
    reqs = vm_requirements()
    key = hashlib.sha256("\n".join([VM_PYTHON, *VM_PLATFORMS, *reqs]).encode()).hexdigest()[:12]
    deps = cache_dir() / "wheels" / f"deps-{key}"
    if (deps / ".complete").exists():
        return deps
    deps.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{deps.name}.", dir=deps.parent))
    try:
        platforms = [arg for p in VM_PLATFORMS for arg in ("--platform", p)]
        _pip(
            "download", "--quiet", "--dest", str(tmp), "--only-binary=:all:", *platforms,
            "--python-version", VM_PYTHON, "--implementation", "cp", "--abi", f"cp{VM_PYTHON.replace('.', '')}",
            *reqs,
        )  # fmt: skip
        (tmp / ".complete").write_text("\n".join(reqs) + "\n")
        try:
            tmp.rename(deps)
        except OSError:
            # A concurrent run finished the same set first; either copy is as good.
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return deps


def _build_snapferry_wheel(dest: Path) -> None:
    # A copy keeps setuptools' build/ and egg-info out of the shared work tree.
    with tempfile.TemporaryDirectory(prefix="snapferry-src-") as tmp:
        src = Path(tmp) / "snapferry"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (REPO / name).exists():
                shutil.copy2(REPO / name, src / name)
        shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(src))


@functools.cache
def wheelhouse() -> Path:
    """A directory with a fresh snapferry wheel (built once per process) and its cached dependencies' wheels."""
    house = Path(tempfile.mkdtemp(prefix="snapferry-vm-wheels-"))
    atexit.register(shutil.rmtree, house, True)
    _build_snapferry_wheel(house)
    for wheel in _dependency_wheels().glob("*.whl"):
        target = house / wheel.name
        try:
            os.link(wheel, target)
        except OSError:
            shutil.copy2(wheel, target)
    return house


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(info.name).parts
    if any(p in ("__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache") for p in parts):
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _write_payload(path: Path, script: str, files: dict[str, Path]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(SCRIPTS / "init.sh", arcname="init.sh", filter=_tar_filter)
        _add_text(tar, "run.sh", script)
        _add_text(tar, "requirements.txt", "\n".join(vm_requirements()) + "\n")
        tar.add(wheelhouse(), arcname="wheels", filter=_tar_filter)
        tar.add(REPO / "tests", arcname="work/tests", filter=_tar_filter)
        # pytest inside the VM reads the same configuration (markers, timeout) as on the host.
        tar.add(REPO / "pyproject.toml", arcname="work/pyproject.toml", filter=_tar_filter)
        for name, source in files.items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"payload file name must stay inside work/: {name!r}")
            tar.add(source, arcname=f"work/{name}", filter=_tar_filter)
    # A raw disk is read in 512-byte sectors: a partial last sector would be cut off.
    size = path.stat().st_size
    if size % 512:
        with path.open("ab") as f:
            f.write(b"\0" * (512 - size % 512))


def _add_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o755
    info.mtime = int(time.time())
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        tar.addfile(info, f)


def _tail(path: Path, lines: int = SERIAL_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no serial log)"
    return "\n".join(text.splitlines()[-lines:])


def qemu_argv(image: Path, payload: Path, output: Path) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        # numpy's wheels need more than the default qemu64 CPU's instruction set.
        "-cpu", "max",
        "-smp", "2",
        "-m", "2048",
        "-nographic",
        "-nic", "none",
        "-no-reboot",
        "-kernel", str(image / "vmlinuz"),
        "-initrd", str(image / "initrd.img"),
        # panic=-1 turns a dying init into a reboot, which -no-reboot turns into qemu exiting.
        "-append", "root=/dev/vda rw console=ttyS0 init=/sbin/snapferry-init panic=-1",
        "-drive", f"file={image / 'rootfs.img'},format=raw,if=virtio,snapshot=on",
        "-drive", f"file={payload},format=raw,if=virtio,readonly=on",
        "-drive", f"file={output},format=raw,if=virtio",
    ]  # fmt: skip


def run_in_vm(version: str, script: str, files: dict[str, Path] | None = None, timeout: float = 900) -> VmResult:
    """Boot the OpenZFS `version` VM and run `script` (bash) in work/ with snapferry installed.

    work/ holds the repo's tests/ (as work/tests), pyproject.toml and `files` (name in work/ -> host path).
    Files the script writes to $RESULTS come back in VmResult.results. Raises VmError when the VM cannot be
    built, times out, or does not hand back its results; the script's own failure is VmResult.rc.
    """
    image = ensure_image(version)
    run_dir = Path(tempfile.mkdtemp(prefix=f"snapferry-vm-{version}-"))
    payload = run_dir / "payload.tar"
    output = run_dir / "output.img"
    serial = run_dir / "serial.log"
    _write_payload(payload, script, files or {})
    with output.open("wb") as f:
        f.truncate(OUTPUT_DISK_BYTES)

    started = time.monotonic()
    with serial.open("wb") as log:
        proc = subprocess.Popen(qemu_argv(image, payload, output), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VmError(
                f"openzfs-vm: the zfs-{version} VM did not finish within {timeout:.0f}s and was killed; "
                f"serial log {serial}, its tail:\n{_tail(serial)}"
            ) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            payload.unlink()
    elapsed = time.monotonic() - started

    result = _read_output(version, output, run_dir, serial, proc.returncode)
    output.unlink()
    print(f"openzfs-vm: zfs-{version} VM ran in {elapsed:.1f}s (rc {result.rc}); serial log {serial}")
    return result


def _read_output(version: str, output: Path, run_dir: Path, serial: Path, qemu_rc: int) -> VmResult:
    out = run_dir / "out"
    try:
        with tarfile.open(output) as tar:
            tar.extractall(out, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise VmError(
            f"openzfs-vm: the zfs-{version} VM left no results on its output disk ({e}; qemu exited {qemu_rc}); "
            f"serial log {serial}, its tail:\n{_tail(serial)}"
        ) from None
    log = (out / "log").read_text(errors="replace") if (out / "log").exists() else ""
    if (out / "setup_error").exists():
        why = (out / "setup_error").read_text().strip()
        raise VmError(f"openzfs-vm: the zfs-{version} VM could not set up the test run: {why}\n{log[-6000:]}")
    try:
        rc = int((out / "rc").read_text())
    except (OSError, ValueError):
        raise VmError(f"openzfs-vm: the zfs-{version} VM wrote no exit status; serial log {serial}") from None
    return VmResult(rc=rc, log=log, results=out / "results", serial_log=serial)
