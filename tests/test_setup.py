"""scripts/setup.sh decides what to install from what it finds: never zfs-fuse beside an OpenZFS.

The one place a stub of `zfs` is right: what is tested is the script's detection, not ZFS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(path: str) -> str:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PATH": path},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _tools(directory: Path, *names: str) -> Path:
    """A PATH directory with only these commands of this host in it."""
    directory.mkdir()
    for name in names:
        found = sys.executable if name == "python3" else shutil.which(name)
        if found:
            (directory / name).symlink_to(found)
    return directory


BASICS = ("bash", "dirname", "python3", "id", "head", "awk", "grep", "btrfs", "ssh", "pgrep", "cc")


def test_openzfs_is_used_as_it_is(tmp_path: Path) -> None:
    tools = _tools(tmp_path / "bin", *BASICS)
    stub = tools / "zfs"
    stub.write_text('#!/bin/sh\n[ "$1" = version ] && printf "zfs-2.2.2-1\\nzfs-kmod-2.2.2-1\\n" && exit 0\nexit 2\n')
    stub.chmod(0o755)
    (tools / "zfs-fuse").symlink_to("/bin/true")  # even with a zfs-fuse binary about, OpenZFS wins
    said = _dry_run(str(tools))
    assert "setup: found OpenZFS (zfs-2.2.2-1): using it, not installing zfs-fuse" in said
    assert "setup: system packages: nothing to install" in said
    assert "dry run: nothing changed" in said


def test_zfs_fuse_is_installed_only_where_there_is_no_zfs(tmp_path: Path) -> None:
    said = _dry_run(str(_tools(tmp_path / "bin", *BASICS)))
    assert "setup: system packages to install: zfs-fuse" in said
    fuse = _tools(tmp_path / "fuse", *BASICS)
    (fuse / "zfs-fuse").symlink_to("/bin/true")
    said = _dry_run(str(fuse))
    assert "setup: found zfs-fuse" in said and "packages to install" not in said


def test_missing_tools_are_named(tmp_path: Path) -> None:
    said = _dry_run(str(_tools(tmp_path / "bin", "bash", "dirname", "python3", "id", "head", "awk", "grep")))
    assert "setup: system packages to install: zfs-fuse btrfs-progs openssh-client procps gcc" in said
