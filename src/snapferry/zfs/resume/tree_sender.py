"""The sending side of a tree (`zfs send -R`): its compound header, then one stamped substream per snapshot, resumable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from snapferry.core.events import EventSink, ignore_events
from snapferry.core.process import SendProcess
from snapferry.core.streamio import Sink
from snapferry.errors import Refused, SnapferryError, StaleToken
from snapferry.zfs.codec.replication import FINAL_END, read_compound_header
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.codec.tree_token import NativePartial, Partial, TreeToken
from snapferry.zfs.engine.command import ZFS_TOOL, Snapshot, Zfs
from snapferry.zfs.resume.checkpoints import is_piece
from snapferry.zfs.resume.native import check_native_token, send_native_continuation
from snapferry.zfs.resume.sender import send_continuation, send_one


@dataclass(frozen=True)
class Substream:
    """One snapshot of the tree as a -R stream carries it: the snapshot, and the base its incremental starts from."""

    snapshot: Snapshot
    base: Snapshot | None


def compound_header_of(zfs: Zfs, snapshot: str, base: str | None, intermediates: bool) -> bytes:
    """The compound BEGIN, its nvlist and its END, exactly as `zfs send -R` writes them; the send is stopped there,
    so the tree's data is not read."""
    incremental = [("-I" if intermediates else "-i"), base] if base else []
    proc = SendProcess(zfs.argv("send", "-R", *incremental, snapshot), f"cannot send {snapshot}", ZFS_TOOL)
    try:
        return read_compound_header(proc.stdout)[0]
    except SnapferryError as exc:
        # A header cut short is most often zfs send failing: its own words say more.
        failure = proc.failure()
        raise (failure or exc) from None
    finally:
        proc.stop()


@dataclass
class TreePlan:
    """The substreams of a tree, and what of the source tree they leave out: file systems without the tree's
    snapshot, and snapshots newer than it (both made since a transfer began, most often)."""

    substreams: list[Substream] = field(default_factory=list)
    without_tosnap: list[str] = field(default_factory=list)
    newer: int = 0


def plan_tree(zfs: Zfs, root: str, tosnap: str, fromsnap: str | None, intermediates: bool) -> TreePlan:
    """The substreams of `zfs send -R [-i|-I @fromsnap] root@tosnap`, parents first, each file system's oldest first.

    A file system without @tosnap is not part of the tree; one without @fromsnap (new since) goes in whole.
    """
    filesystems = [name for name in zfs.get_properties(root, "type", recursive_depth=1 << 16) if "@" not in name]
    plan = TreePlan()
    for dataset in filesystems:
        snapshots = [s for s in zfs.snapshots(dataset) if not is_piece(s)]
        names = [s.name.partition("@")[2] for s in snapshots]
        if tosnap not in names:
            plan.without_tosnap.append(dataset)
            continue
        last = names.index(tosnap)
        plan.newer += len(names) - last - 1
        if fromsnap is not None and fromsnap in names[:last]:
            first = names.index(fromsnap)
            chain = snapshots[first : last + 1] if intermediates else [snapshots[first], snapshots[last]]
            plan.substreams += [Substream(snap, base) for base, snap in zip(chain, chain[1:], strict=False)]
        else:
            chain = snapshots[: last + 1]
            plan.substreams += [Substream(snap, base) for base, snap in zip([None, *chain], chain, strict=False)]
    return plan


def _check_names(plan: TreePlan, token: TreeToken) -> None:
    """Each file system's snapshots that the destination has must be where the source has them now: a file system
    renamed on the source since the transfer began would land in a second place on the destination."""
    partial = token.partial
    for sub in plan.substreams:
        dataset = sub.snapshot.dataset
        here = dataset[len(token.root) :]
        there = token.where.get(sub.base.guid if sub.base else 0)
        if partial is not None and sub.snapshot.guid == partial.toguid and partial.dataset.startswith(token.target):
            there = partial.dataset[len(token.target) :]
        if there is not None and there != here:
            raise StaleToken(
                f"stale token: {dataset} was renamed on the source since the transfer began (the destination holds its "
                f"snapshots in {token.target}{there}); rename it back, or discard the partial transfer with: "
                f"snapferry receive -A {token.target}"
            )


def _note_left_out(plan: TreePlan, root: str, tosnap: str, events: EventSink) -> None:
    if plan.without_tosnap:
        names = ", ".join(plan.without_tosnap[:5]) + (" ..." if len(plan.without_tosnap) > 5 else "")
        events("warning", message=f"{len(plan.without_tosnap)} file system(s) below {root} have no @{tosnap} (made since the "
               f"transfer began?): they are left for the next incremental ({names})")  # fmt: skip
    if plan.newer:
        events("warning", message=f"{plan.newer} snapshot(s) newer than @{tosnap} are left for the next incremental")


def send_tree(
    zfs: Zfs,
    snapshot: str,
    sink: Sink,
    *,
    base: str | None = None,
    intermediates: bool = False,
    events: EventSink = ignore_events,
) -> int:
    """`zfs send -R`, each substream re-stamped with its running checksums as `snapferry send` does for one dataset."""
    root, _, tosnap = snapshot.partition("@")
    fromsnap = base.rpartition("@")[2] if base else None
    if base and not zfs.exists(f"{root}@{fromsnap}"):
        raise Refused(f"no snapshot {root}@{fromsnap}")
    header = compound_header_of(zfs, snapshot, f"{root}@{fromsnap}" if fromsnap else None, intermediates)
    return _emit(zfs, header, plan_tree(zfs, root, tosnap, fromsnap, intermediates).substreams, sink, None, _within(root), events)


def send_tree_rest(
    zfs: Zfs, token: TreeToken, sink: Sink, *, events: EventSink = ignore_events, visible: Callable[[str], bool] = lambda _: True
) -> int:
    """The rest of an interrupted -R transfer: the same header, then, parents first, only the substreams the destination
    does not have, the partial one as a continuation from its checkpoint. Snapshots the destination has are not read."""
    snapshot = f"{token.root}@{token.tosnap}"
    if not (visible(token.root) and zfs.exists(snapshot)):
        raise StaleToken(
            f"stale token: {snapshot} no longer exists here (the tree's root or its snapshot was destroyed or renamed); "
            f"discard the partial transfer with: snapferry receive -A {token.target}"
        )
    base = f"{token.root}@{token.fromsnap}" if token.fromsnap else None
    if base and not zfs.exists(base):
        raise StaleToken(f"stale token: the tree's base snapshot {base} no longer exists; discard the partial transfer with: "
                         f"snapferry receive -A {token.target}")  # fmt: skip
    partial = token.partial
    if isinstance(partial, NativePartial):
        # The kernel's own checks first, each with its reason: snapshot gone, replaced, base gone.
        check_native_token(zfs, partial.token, (), _within(token.root), discard=f"snapferry receive -A {token.target}")
    plan = plan_tree(zfs, token.root, token.tosnap, token.fromsnap, token.intermediates)
    _check_names(plan, token)
    rest = [sub for sub in plan.substreams if sub.snapshot.guid not in token.have]
    if partial is not None and not any(s.snapshot.guid == partial.toguid and _guid(s.base) == partial.fromguid for s in rest):
        raise StaleToken(
            f"stale token: the snapshot its partial dataset was receiving (guid {partial.toguid}) is no longer part of "
            f"{snapshot}'s tree; discard the partial transfer with: snapferry receive -A {token.target}"
        )
    header = compound_header_of(zfs, snapshot, base, token.intermediates)
    _note_left_out(plan, token.root, token.tosnap, events)
    events("stream", toname=snapshot, offset=0, substreams=len(rest), of=len(plan.substreams))
    return _emit(zfs, header, rest, sink, partial, _within(token.root), events)


def _within(root: str) -> Callable[[str], bool]:
    """The source tree's own datasets: a copy of its snapshots elsewhere on this host has the same guids."""
    return lambda dataset: dataset == root or dataset.startswith(root + "/")


def _guid(snapshot: Snapshot | None) -> int:
    return snapshot.guid if snapshot else 0


def _emit(
    zfs: Zfs,
    header: bytes,
    substreams: list[Substream],
    sink: Sink,
    partial: Partial | None,
    within: Callable[[str], bool],
    events: EventSink,
) -> int:
    sink([header])
    written = len(header)
    for sub in substreams:
        if isinstance(partial, NativePartial) and sub.snapshot.guid == partial.toguid:
            # The kernel's continuation names the source snapshot, as the receiver's layout wants.
            written += send_native_continuation(zfs, partial.text, sink, events=events, visible=within)
            continue
        if isinstance(partial, ResumeToken) and sub.snapshot.guid == partial.toguid:
            written += send_continuation(zfs, partial, sink, events=events, visible=within, named_as_source=True)
            continue
        base = sub.base.name if sub.base else None
        written += send_one(zfs, sub.snapshot.name, base, (), sink, written, events, None)
    sink([FINAL_END])
    written += len(FINAL_END)
    events("done", bytes=written)
    return written
