"""Which backend an argument means: the one place that knows every filesystem snapferry drives."""

from __future__ import annotations

from collections.abc import Sequence

from snapferry.btrfs.engine.naming import claims_btrfs
from snapferry.interface import Backend


def backend_for(*arguments: str | None, zfs_command: Sequence[str] | None = None) -> Backend:
    """The backend that claims the first argument given (a path, a token, a dataset); ZFS when none does.

    A path (/..., ./...) or a btrfs token (sf1b-...) means btrfs; a pool/fs name, an sf1- or 1- token means ZFS.
    """
    # Each backend imports its whole stack (tens of ms of start-up, paid by every verb sync runs): load only the one named.
    given = [a for a in arguments if a]
    if given and claims_btrfs(given[0]):
        from snapferry.btrfs.backend import BtrfsBackend

        return BtrfsBackend()
    from snapferry.zfs.backend import ZfsBackend
    from snapferry.zfs.engine.command import Zfs

    return ZfsBackend(Zfs(zfs_command))
