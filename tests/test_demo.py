"""The README's main job: `snapferry demo` must work end to end on a machine with no pools of its own."""

from __future__ import annotations

from snapferry_testkit import zfs_testbed as tb


def test_demo_transfers_cuts_resumes_and_verifies(zfs_daemon: None) -> None:
    result = tb.snapferry("demo")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr + out
    assert "files identical: True" in out and "snapshot guid identical: True" in out
    assert out.count("exit 3:") == 2, "the demo cuts the transfer twice"
    assert "sfdemo" not in tb.sh("zpool", "list", "-H", "-o", "name", check=False).stdout.decode(), "demo pools are cleaned up"


def test_btrfs_demo_transfers_cuts_resumes_and_verifies() -> None:
    result = tb.snapferry("demo", "--btrfs")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr + out
    assert "files identical: True" in out and "read-only: True" in out
    assert out.count("exit 3:") == 2, "the demo cuts the transfer twice"
    assert "snapferry-demo-" not in tb.sh("findmnt", "-rn", "-o", "TARGET", check=False).stdout.decode(), "demo mounts are cleaned up"
