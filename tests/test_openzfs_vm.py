"""Smoke test of the real-OpenZFS VM test bed: each OpenZFS version boots, loads zfs and runs snapferry."""

from __future__ import annotations

import pytest

from tests.openzfs_vm import VERSIONS, run_in_vm

pytestmark = [pytest.mark.openzfs_vm, pytest.mark.timeout(3600)]

SMOKE = r"""
set -euxo pipefail
zfs version
truncate -s 256M /tmp/p.img
zpool create tank /tmp/p.img
zfs create tank/a
echo hello > /tank/a/hello.txt
zfs snapshot tank/a@s
zfs send tank/a@s | zfs receive -s tank/b
test "$(cat /tank/b/hello.txt)" = hello
zpool get -H -o value feature@extensible_dataset tank | grep -E '^(active|enabled)$'
python3 -c 'import snapferry, numpy, zstandard, rich'
snapferry --help
zfs version > "$RESULTS/zfs-version.txt"
"""


@pytest.mark.parametrize("version", VERSIONS)
def test_smoke(version: str) -> None:
    result = run_in_vm(version, SMOKE, timeout=900)
    assert result.rc == 0, result.log
    assert f"zfs-{version}." in result.log, result.log
    assert (result.results / "zfs-version.txt").read_text().startswith(f"zfs-{version}.")
