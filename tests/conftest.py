"""Fixtures: a running zfs-fuse daemon and a fresh pair of file-backed pools per test module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapferry_testkit import zfs_testbed as tb

# The real sshd on 127.0.0.1 that the sync and serve tests log in to.
pytest_plugins = ["tests.sshd"]


@pytest.fixture(scope="session")
def zfs_daemon() -> None:
    if os.geteuid() != 0:
        pytest.fail("the ZFS tests need root (zfs-fuse); run them as the README says")
    tb.start_daemon()


@pytest.fixture(scope="module")
def bed(zfs_daemon: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tb.Bed]:
    base = tmp_path_factory.mktemp("pools")
    src = tb.create_pool(base, "s")
    dst = tb.create_pool(base, "d")
    try:
        yield tb.Bed(src, dst)
    finally:
        dst.destroy()
        src.destroy()


@pytest.fixture(autouse=True)
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep test locks away from a real /run/lock/snapferry."""
    monkeypatch.setenv("SNAPFERRY_LOCK_DIR", str(tmp_path / "locks"))
