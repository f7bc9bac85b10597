"""Fixtures: a running zfs-fuse daemon and a fresh pair of file-backed pools per test module, and a real S3 store (Swift)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapferry_testkit import swift_server
from snapferry_testkit import zfs_testbed as tb
from snapferry_testkit.swift_server import SwiftError, SwiftServer

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


@pytest.fixture(scope="session")
def swift(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwiftServer]:
    """One S3 endpoint (Swift with s3api) for the session; a test that stops its proxy starts it again."""
    if not swift_server.installed():
        pytest.skip("the Debian swift packages are not installed (scripts/test.sh installs them)")
    try:
        server = swift_server.start_swift(tmp_path_factory.mktemp("swift"))
    except SwiftError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def swift_bucket(swift: SwiftServer) -> str:
    """A new empty bucket of `swift`'s test:tester, its name unique in the session."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    swift.client().create_bucket(Bucket=name)
    return name
