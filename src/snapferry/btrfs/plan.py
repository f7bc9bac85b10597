"""Planning a btrfs sync: the read-only snapshots of a source directory into a target directory, resuming first (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from uuid import UUID

from snapferry.btrfs.engine.command import Subvolume
from snapferry.errors import Refused, UsageError
from snapferry.interface import Action, Moment, Summary, SyncPolicy, SyncStep, Transfer, Unfinished


@dataclass(frozen=True)
class BtrfsStep:
    """One `snapferry send ... | snapferry receive -s DIR`: a resume, a full or an incremental send of one snapshot."""

    snapshot: str
    parent: str | None = None
    token: str | None = None

    def describe(self) -> str:
        if self.token is not None:
            return f"resume the interrupted transfer of {self.snapshot}"
        if self.parent is None:
            return f"full send of {self.snapshot}"
        return f"incremental {self.parent} -> {self.snapshot}"


@dataclass(frozen=True)
class Listing:
    """A directory's subvolumes (oldest first) and its unfinished receives (name -> token, None before a checkpoint)."""

    subvolumes: list[Subvolume]
    unfinished: dict[str, str | None]


def next_btrfs_step(source: list[Subvolume], target: Listing, *, no_stream: bool) -> BtrfsStep | None:
    """The next transfer, or None when the target is up to date (pure: unit-tested).

    Snapshots of different subvolumes can share a directory (home.1, root.1, home.2 ...): each
    subvolume's snapshots (same parent UUID) form their own chain, incremental from the newest one the
    target already has.
    """
    resumable = sorted((name, token) for name, token in target.unfinished.items() if token is not None)
    if resumable:
        name, token = resumable[0]
        return BtrfsStep(name, token=token)
    snapshots = [s for s in source if s.readonly]
    if not snapshots:
        raise Refused("the source directory has no read-only snapshot to send (btrfs subvolume snapshot -r)")
    received = {t.received_uuid for t in target.subvolumes if t.readonly}
    chains: dict[UUID, list[Subvolume]] = {}
    for snapshot in snapshots:  # oldest first
        chains.setdefault(snapshot.parent_uuid, []).append(snapshot)
    for chain in chains.values():
        have = [s for s in chain if s.uuid in received]
        newer = [s for s in chain if s.uuid not in received and (not have or s.otransid > have[-1].otransid)]
        if newer:
            pick = newer[-1] if no_stream else newer[0]
            return BtrfsStep(pick.name, parent=have[-1].name if have else None)
    return None


def listing_of(status: dict[str, Any]) -> Listing:
    """A `status` answer as the planner's Listing; Refused when it is not one (another snapferry version?)."""
    try:
        if status.get("backend") != "btrfs":
            raise ValueError("backend")
        directory = Path(status["target"])
        subvolumes = [Subvolume.from_json(directory, item) for item in status["subvolumes"]]
        unfinished = {str(k): (str(v) if v is not None else None) for k, v in status["unfinished"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise Refused(f"cannot list {status.get('target')}: its snapferry answered something else (another version?)") from None
    return Listing(subvolumes, unfinished)


def summarize(target: dict[str, Any], source: dict[str, Any] | None = None) -> Summary:
    """A receive directory's status as a person reads it; with its source's, the newest snapshot it has received."""
    listing = listing_of(target)
    snapshots = [s for s in listing.subvolumes if s.readonly]
    sent_from = [s for s in listing_of(source).subvolumes if s.readonly] if source is not None else []
    received = {s.received_uuid for s in snapshots}
    common = next((s for s in reversed(sent_from) if s.uuid in received), None)
    progress = target.get("progress", {})
    unfinished = tuple(
        Unfinished(
            name,
            "sf1b" if token else "",
            progress.get(name, {}).get("offset"),
            progress.get(name, {}).get("checkpoints"),
            int(progress.get(name, {}).get("last_progress") or 0),
        )
        for name, token in listing.unfinished.items()
    )
    return Summary(
        target=str(target["target"]),
        exists=True,
        newest=Moment(snapshots[-1].name, snapshots[-1].otime) if snapshots else None,
        unfinished=unfinished,
        held=0,
        source_newest=Moment(sent_from[-1].name, sent_from[-1].otime) if sent_from else None,
        common=Moment(common.name, common.otime) if common is not None else None,
    )


@dataclass(frozen=True)
class BtrfsSyncPlanner:
    """A SyncPlanner for the snapshots of one directory into another: next_btrfs_step as snapferry commands."""

    policy: SyncPolicy
    source: str
    target: str

    def _as_command(self, step: BtrfsStep) -> Transfer:
        directory = PurePosixPath(self.source)
        send: tuple[str, ...] = ()
        if step.token is not None:
            send = ("-t", step.token)
        elif step.parent is not None:
            send = ("-p", str(directory / step.parent))
        partial = str(PurePosixPath(self.target) / step.snapshot)
        abort = Action(f"abort the unfinished transfer of {partial}", ("receive", "-q", "-A", partial)) if step.token else None
        return Transfer(
            step.describe(), (*send, str(directory / step.snapshot)), (self.target,), resumes=step.token is not None, abort=abort
        )

    def next_step(self, source: dict[str, Any], target: dict[str, Any]) -> SyncStep | None:
        step = next_btrfs_step(listing_of(source).subvolumes, listing_of(target), no_stream=self.policy.no_stream)
        return None if step is None else self._as_command(step)

    def plan_all(self, source: dict[str, Any], target: dict[str, Any], new_snapshot: str | None = None) -> list[SyncStep]:
        """Steps applied to a model of the target (--dry-run)."""
        if new_snapshot is not None:
            self.snapshot_step(new_snapshot)
        sent_from = listing_of(source).subvolumes
        model = listing_of(target)
        steps: list[SyncStep] = []
        while (step := next_btrfs_step(sent_from, model, no_stream=self.policy.no_stream)) is not None and len(steps) <= len(sent_from):
            steps.append(self._as_command(step))
            sent = next(s for s in sent_from if s.name == step.snapshot)
            arrived = Subvolume(Path(step.snapshot), sent.uuid, sent.uuid, sent.uuid, 0, 0, True)
            unfinished = {k: v for k, v in model.unfinished.items() if k != step.snapshot}
            model = Listing([*model.subvolumes, arrived], unfinished)
        return steps

    def snapshot_step(self, name: str, recursive: bool = False) -> Action:
        raise UsageError("sync --snapshot is for ZFS; take btrfs snapshots with btrfs subvolume snapshot -r")

    def tidy(self, source: dict[str, Any], target: dict[str, Any]) -> list[Action]:
        return []
