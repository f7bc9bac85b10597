"""Real OpenZFS: runs tests/openzfs inside the qemu VM of each version, with zfs-fuse (v23) streams made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapferry_testkit import zfs_testbed as tb
from tests.openzfs_vm import VERSIONS, run_in_vm

pytestmark = [pytest.mark.openzfs_vm, pytest.mark.timeout(3600)]

SUITE = r"""
set -uo pipefail
zfs version
SNAPFERRY_V23_STREAMS="$PWD/v23" python3 -m pytest -q -p no:cacheprovider -o addopts= --timeout 600 \
    --junitxml "$RESULTS/junit.xml" tests/openzfs
"""


@pytest.fixture(scope="module")
def v23_streams(bed: tb.Bed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """zfs-fuse's own streams (pool v23, no per-record checksums), full and incremental."""
    fs = bed.dataset("v23")
    tb.sh("zfs", "create", fs)
    root = tb.mountpoint(fs)
    tb.write_tree(root, seed=23, megabytes=4, small_files=30)
    guid1, files1 = tb.snapshot(f"{fs}@s1")
    tb.change_tree(root, seed=24)
    guid2, files2 = tb.snapshot(f"{fs}@s2")
    out = tmp_path_factory.mktemp("v23")
    (out / "full.stream").write_bytes(tb.sh("zfs", "send", f"{fs}@s1").stdout)
    (out / "incr.stream").write_bytes(tb.sh("zfs", "send", "-i", f"{fs}@s1", f"{fs}@s2").stdout)
    meta = {"guid1": guid1, "guid2": guid2, "files1": files1, "files2": files2}
    (out / "v23.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_openzfs_suite_in_vm(version: str, v23_streams: Path) -> None:
    result = run_in_vm(version, SUITE, files={"v23": v23_streams}, timeout=2400)
    assert result.rc == 0, result.log
    assert f"zfs-kmod-{version}." in result.log, result.log
    assert " passed" in result.log and " failed" not in result.log and " skipped" not in result.log, result.log
