"""Fixtures for the tests that run inside the OpenZFS VM: real kernel-module pools on file vdevs."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.zfs_testbed import sh

_counter = itertools.count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # These need the OpenZFS kernel module: tests/test_openzfs_vm.py runs them inside the VM.
    if shutil.which("zfs") and Path("/dev/zfs").exists():
        return
    skip = pytest.mark.skip(reason="needs real OpenZFS (/dev/zfs): run through tests/test_openzfs_vm.py")
    for item in items:
        if "tests/openzfs/" in str(item.fspath):
            item.add_marker(skip)


def make_pool(tmp_path: Path, *options: str) -> Iterator[str]:
    name = f"oz{next(_counter)}"
    image = tmp_path / f"{name}.img"
    sh("truncate", "-s", "512M", str(image))
    sh("zpool", "create", "-f", *options, "-O", f"mountpoint=/{name}", name, str(image))
    try:
        yield name
    finally:
        sh("zpool", "destroy", "-f", name, check=False)
        image.unlink(missing_ok=True)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[str]:
    """A pool with every feature (native resume available)."""
    yield from make_pool(tmp_path, "-O", "compression=lz4")


@pytest.fixture
def legacy_pool(tmp_path: Path) -> Iterator[str]:
    """A pool with no features enabled, as an old pool upgraded in place would be: no native resume."""
    yield from make_pool(tmp_path, "-d")
