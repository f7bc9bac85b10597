"""Fixtures for the tests that run inside the OpenZFS VM: real kernel-module pools on file vdevs."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapferry_testkit.zfs_testbed import manifest, mountpoint, sh, snapshot, write_tree

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


def encrypted_source(pool: str, key: Path, seed: int) -> tuple[str, int, dict[str, str]]:
    """An encrypted dataset with data in @s1: its name, the snapshot's guid and manifest."""
    key.write_text("correct horse battery staple\n")
    fs = f"{pool}/secret"
    sh("zfs", "create", "-o", "encryption=on", "-o", "keyformat=passphrase", "-o", f"keylocation=file://{key}", fs)
    write_tree(mountpoint(fs), seed=seed, megabytes=4, small_files=40)
    snap_guid, files = snapshot(f"{fs}@s1")
    return fs, snap_guid, files


def unlocked_manifest(dataset: str, key: Path) -> dict[str, str]:
    """A raw-received copy is locked and unmounted: load its key, mount it, and list it."""
    sh("zfs", "load-key", "-L", f"file://{key}", dataset)
    sh("zfs", "mount", dataset)
    return manifest(mountpoint(dataset))
