"""One receive per destination at a time, and one mount change per host: advisory lock files, freed when their holder dies."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from snapferry.errors import Locked

LOCK_DIR_ENV = "SNAPFERRY_LOCK_DIR"
DEFAULT_LOCK_DIR = "/run/lock/snapferry"


def lock_path(dataset: str) -> Path:
    directory = Path(os.environ.get(LOCK_DIR_ENV, DEFAULT_LOCK_DIR))
    directory.mkdir(parents=True, exist_ok=True)
    return directory / (dataset.replace("/", "%") + ".lock")


@contextmanager
def dataset_lock(dataset: str, purpose: str) -> Iterator[None]:
    path = lock_path(dataset)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise Locked(f"{Locked.PREFIX} {dataset} ({holder}); wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {purpose}".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextmanager
def host_lock(name: str) -> Iterator[None]:
    """Wait for, then hold, the host-wide lock `name` (in the same directory as the dataset locks)."""
    fd = os.open(lock_path(name), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
