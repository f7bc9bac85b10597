"""Which arguments name btrfs: a path, or a snapferry btrfs token (checked without importing the btrfs stack)."""

from __future__ import annotations

BTRFS_TOKEN_PREFIX = "sf1b-"


def is_btrfs_path(text: str) -> bool:
    """A file system path (btrfs) rather than a pool/fs dataset name (ZFS): absolute, or starting with . or .."""
    return text.startswith(("/", "./", "../")) or text in (".", "..")


def claims_btrfs(argument: str) -> bool:
    """A path (btrfs) rather than a pool/fs dataset (ZFS), or a btrfs token."""
    return is_btrfs_path(argument) or argument.strip().startswith(BTRFS_TOKEN_PREFIX)
