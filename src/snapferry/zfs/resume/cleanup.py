"""Removing what snapferry created on a destination, and refusing to touch anything else."""

from __future__ import annotations

from snapferry.errors import Refused
from snapferry.zfs.engine.command import Snapshot, Zfs
from snapferry.zfs.resume.checkpoints import Transfer, is_piece


def remove_finished_pieces(zfs: Zfs, transfer: Transfer) -> None:
    """After the final snapshot exists, the pieces are only intermediate copies: drop them."""
    for snap in transfer.pieces():
        zfs.destroy(snap.name)


def discard_transfer(zfs: Zfs, transfer: Transfer, snapshots: list[Snapshot]) -> str:
    """Undo an unfinished transfer: back to the base snapshot, or no dataset for a full stream.

    Refuses when the dataset holds snapshots after the base (or, for a full stream, at all) that
    snapferry did not create, or child datasets.
    """
    if transfer.fromguid == 0:
        foreign = [s.name for s in snapshots if not is_piece(s)]
        if foreign:
            raise Refused(f"{transfer.dataset} holds snapshots snapferry did not create ({', '.join(foreign)}); not destroying it")
        children = [
            name for name in zfs.get_properties(transfer.dataset, "type", recursive_depth=1) if name != transfer.dataset and "@" not in name
        ]
        if children:
            raise Refused(f"{transfer.dataset} has child datasets ({', '.join(children)}); not destroying it")
        zfs.destroy(transfer.dataset, recursive=True)
        return f"destroyed the partially received dataset {transfer.dataset}"
    base = next((s for s in snapshots if s.guid == transfer.fromguid), None)
    if base is None:
        raise Refused(f"the base snapshot of the interrupted transfer (guid {transfer.fromguid}) is gone from {transfer.dataset}")
    later = [s for s in snapshots if s.createtxg > base.createtxg]
    foreign = [s.name for s in later if not is_piece(s)]
    if foreign:
        raise Refused(f"{transfer.dataset} has snapshots after {base.name} that snapferry did not create ({', '.join(foreign)})")
    zfs.rollback(base.name)
    return f"rolled {transfer.dataset} back to {base.name}, removing {len(later)} checkpoint snapshot(s)"
