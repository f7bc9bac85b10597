"""Planning a ZFS sync from both ends' status: the next transfer or rollback (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from snapferry.errors import Refused, StreamFormatError, UsageError
from snapferry.interface import Action, Moment, Summary, SyncPolicy, SyncStep, Transfer, Unfinished
from snapferry.zfs.codec.openzfs_token import OpenZfsToken
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.engine.command import Snapshot
from snapferry.zfs.resume.checkpoints import is_piece


@dataclass(frozen=True)
class Step:
    """One `snapferry send ... | snapferry receive -s ...`: a resume, a full or an incremental send."""

    snapshot: str = ""
    base: str | None = None
    intermediates: bool = False
    token: ResumeToken | OpenZfsToken | None = None

    def describe(self) -> str:
        if self.token is not None:
            if isinstance(self.token, OpenZfsToken):
                return f"resume the interrupted receive of {self.token.toname} after {self.token.bytes} bytes (native)"
            return f"resume the interrupted transfer at byte {self.token.offset}"
        if self.base is None:
            return f"full send of {self.snapshot}"
        return f"incremental {self.base} -> {self.snapshot}" + (" with every snapshot between" if self.intermediates else "")


@dataclass(frozen=True)
class Rollback:
    """With --force: roll the destination back to the last common snapshot."""

    snapshot: str

    def describe(self) -> str:
        return f"roll the destination back to {self.snapshot} (--force)"


def next_step(
    source: list[Snapshot],
    target: list[Snapshot] | None,
    token: ResumeToken | OpenZfsToken | None,
    *,
    no_stream: bool,
    force: bool,
) -> Step | Rollback | None:
    """The next thing to do, or None when the target is up to date. `target` is None when it does not exist."""
    if token is not None:
        return Step(token=token)
    source = [s for s in source if not is_piece(s)]
    if not source:
        raise Refused("the source has no snapshot to send (take one, or use --snapshot)")
    newest = source[-1]
    target_snaps = [s for s in target or [] if not is_piece(s)]
    if target is None or (target and not target_snaps):
        # Only pieces and no token: a first piece committed but never named a checkpoint (the
        # daemon or host died in between). It holds no position; the receiver discards it.
        return Step(snapshot=(newest if no_stream else source[0]).name)
    if not target_snaps:
        raise Refused("the destination exists but holds no snapshot: it has diverged (destroy it to start over)")
    source_by_guid = {s.guid: s for s in source}
    common = next((s for s in reversed(target_snaps) if s.guid in source_by_guid), None)
    if common is None:
        raise Refused("the destination has diverged: it shares no snapshot with the source; nothing was changed")
    newer = [s.short_name for s in target_snaps if s.createtxg > common.createtxg]
    if newer:
        if not force:
            raise Refused(
                f"the destination has diverged: it has snapshots after {common.short_name} that the source lacks "
                f"({', '.join(newer)}); nothing was changed (--force rolls them back)"
            )
        return Rollback(common.name)
    base = source_by_guid[common.guid]
    if base.guid == newest.guid:
        return None
    return Step(snapshot=newest.name, base=base.name, intermediates=not no_stream)


def plan_all(
    source: list[Snapshot],
    target: list[Snapshot] | None,
    token: ResumeToken | OpenZfsToken | None,
    *,
    no_stream: bool,
    force: bool,
) -> list[Step | Rollback]:
    """Every step a sync would take, by applying each planned step to a model of the target (--dry-run)."""
    steps: list[Step | Rollback] = []
    by_guid = {s.guid: s for s in source}
    txg = max((s.createtxg for s in (target or []) + source), default=0)

    def arrive(snaps: list[Snapshot]) -> list[Snapshot]:
        nonlocal txg
        arrived = []
        for snap in snaps:
            txg += 1
            arrived.append(Snapshot(snap.name, snap.guid, txg))
        return arrived

    while (step := next_step(source, target, token, no_stream=no_stream, force=force)) is not None:
        steps.append(step)
        if isinstance(step, Rollback):
            cut = next(s.createtxg for s in target or [] if s.name == step.snapshot)
            target = [s for s in target or [] if s.createtxg <= cut]
        elif step.token is not None:
            target = (target or []) + arrive([by_guid[step.token.toguid]] if step.token.toguid in by_guid else [])
            token = None
        else:
            names = [s.name for s in source]
            last = names.index(step.snapshot)
            first = last if step.base is None or not step.intermediates else names.index(step.base) + 1
            target = (target or []) + arrive(source[first : last + 1])
        if len(steps) > len(source) + 2:
            break
    return steps


def snapshots_of(status: dict[str, Any]) -> list[Snapshot]:
    return [
        Snapshot(str(s["name"]), int(s["guid"]), int(s["createtxg"]), int(s.get("creation", 0)), int(s.get("userrefs", 0)))
        for s in status["snapshots"]
    ]


def summarize(target: dict[str, Any], source: dict[str, Any] | None = None) -> Summary:
    """A dataset's status as a person reads it; with its source's, the newest snapshot both have (by guid)."""
    every = snapshots_of(target)
    snapshots = [s for s in every if not is_piece(s)]
    sent_from = [s for s in snapshots_of(source) if not is_piece(s)] if source is not None else []
    by_guid = {s.guid: s for s in sent_from}
    unfinished = []
    for item in target.get("unfinished", []):
        sent = by_guid.get(int(item["toguid"]))
        name = item.get("toname") or (sent.name if sent is not None else f"the snapshot with guid {int(item['toguid']):#x}")
        unfinished.append(
            Unfinished(name, str(item["kind"]), item.get("bytes"), item.get("checkpoints"), int(item.get("last_progress") or 0))
        )
    common = next((by_guid[s.guid] for s in reversed(snapshots) if s.guid in by_guid), None)
    return Summary(
        target=str(target["target"]),
        exists=bool(target["exists"]),
        newest=Moment(snapshots[-1].name, snapshots[-1].creation) if snapshots else None,
        unfinished=tuple(unfinished),
        held=sum(1 for s in every if s.userrefs),
        source_newest=Moment(sent_from[-1].name, sent_from[-1].creation) if sent_from else None,
        common=Moment(common.name, common.creation) if common is not None else None,
    )


def token_of(status: dict[str, Any]) -> ResumeToken | OpenZfsToken | None:
    text = status.get("token")
    if not text:
        return None
    return OpenZfsToken.decode(text) if text.startswith("1-") else ResumeToken.decode(text)


def choose_sync_mode(policy: SyncPolicy, source: dict[str, Any], target: dict[str, Any]) -> str:
    """Native only when the target's pool keeps receive state, the source's zfs can send -t and no piece transfer is under way."""
    if policy.mode == "pieces" or (policy.mode is None and not source["can_send_resume"]):
        return "pieces"
    if policy.mode == "native":
        if not target["native_resume"]:
            pool = target["target"].split("/", 1)[0]
            raise Refused(
                f"native resume is not available on pool {pool}: it needs OpenZFS 0.7 or later with the "
                "extensible_dataset feature; use --mode pieces"
            )
        return "native"
    return "native" if target["native_resume"] and not target["unfinished_pieces"] else "pieces"


# Not copied by --props: set only at creation (or by the stream itself), or, like mountpoint, not a backup
# target's business (the replica mounts below its destination's parent unless -o mountpoint=... says otherwise;
# it keeps atime=off, so that reading it never counts as a change).
NOT_COPIED = frozenset(
    {
        "mountpoint", "encryption", "keyformat", "keylocation", "pbkdf2iters", "casesensitivity", "normalization",
        "utf8only", "volsize", "volblocksize", "version", "zoned", "sharenfs", "sharesmb", "atime",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ZfsSyncPlanner:
    """A SyncPlanner for one dataset: `next_step` and `plan_all` above, as snapferry commands."""

    policy: SyncPolicy
    source: str
    target: str

    def _inputs(self, source: dict[str, Any], target: dict[str, Any]) -> tuple[list[Snapshot], list[Snapshot] | None, Any]:
        if source.get("backend") != "zfs" or target.get("backend") != "zfs":
            raise StreamFormatError("sync's two ends are not both ZFS datasets")
        if not source["exists"]:
            raise Refused(f"{self.source} does not exist")
        return snapshots_of(source), (snapshots_of(target) if target["exists"] else None), token_of(target)

    def _as_command(self, step: Step | Rollback, source: dict[str, Any], target: dict[str, Any]) -> SyncStep:
        if isinstance(step, Rollback):
            return Action(step.describe(), ("rollback", "-r", step.snapshot))
        if step.token is not None:
            send: tuple[str, ...] = ("-t", step.token.encode())
        elif step.base is None:
            send = (*self._send_flags(source, target), step.snapshot)
        else:
            send = (*self._send_flags(source, target), "-I" if step.intermediates else "-i", step.base, step.snapshot)
        rollback = self.policy.force or self.policy.discard_changes
        receive = ["--mode", choose_sync_mode(self.policy, source, target), *(["-F"] if rollback else [])]
        properties = self._properties(source)
        if step.base is None and (step.token is None or not step.token.fromguid) and source.get("type") != "volume":
            # A replica this sync creates: with atime off, looking at it cannot count as a change
            # that would make the next incremental need --force.
            properties.setdefault("atime", "off")
        for name, value in properties.items():
            receive += ["-o", f"{name}={value}"]
        held = self._sent_snapshots(step, source)
        tag = self.policy.hold_tag
        before: tuple[Action, ...] = ()
        after: tuple[Action, ...] = ()
        if tag is not None and held:
            before = (Action(f"hold {', '.join(held)} ({tag})", ("hold", tag, *held), on_source=True),)
            after = (Action(f"release {', '.join(held)} ({tag})", ("release", tag, *held), on_source=True),)
        # receive's advice names its own flag; sync's is --force.
        return Transfer(
            step.describe(),
            send,
            (*receive, self.target),
            advice=(("use -F to roll it back", "sync --force rolls it back"),),
            resumes=step.token is not None,
            before=before,
            after=after,
            abort=Action(f"abort the unfinished transfer into {self.target}", ("receive", "-q", "-A", self.target)) if step.token else None,
        )

    def _properties(self, source: dict[str, Any]) -> dict[str, str]:
        """--props: the source's own properties for the replica, as `zfs receive -o` would set them; never the ones
        that only exist at creation or would mount it over the backup host's directories, unless -o says so."""
        chosen: dict[str, str] = {}
        if self.policy.props:
            skipped = set(self.policy.exclude_props) | NOT_COPIED
            chosen = {k: v for k, v in source.get("properties", {}).items() if k not in skipped}
        chosen.update(self.policy.set_props)
        return chosen

    def _send_flags(self, source: dict[str, Any], target: dict[str, Any]) -> tuple[str, ...]:
        """--send-flags, and -w for an encrypted dataset: its blocks travel as they are and the key never needs
        to be loaded on the destination (a new replica, or one received raw before; a replica received
        decrypted by an older snapferry stays so). Only OpenZFS has these flags."""
        flags = list(self.policy.send_flags)
        raw_replica = not target.get("exists") or target.get("encrypted")
        if source.get("encrypted") and raw_replica and "-w" not in flags:
            flags.append("-w")
        if flags and not source.get("can_send_resume"):
            raise UsageError(
                f"--send-flags {' '.join(flags)}: the zfs of {self.source} (zfs-fuse, or another pool-v28-era ZFS) has no "
                "-L, -e, -c or -w, and no encryption: sync it without --send-flags"
            )
        return tuple(flags)

    @staticmethod
    def _sent_snapshots(step: Step, source: dict[str, Any]) -> tuple[str, ...]:
        """What the step reads on the source: the snapshot(s) it sends and the incremental's base. A pruner that
        destroyed one meanwhile would make the transfer's token stale, so sync holds them until the step is done."""
        snapshots = [s for s in snapshots_of(source) if not is_piece(s)]
        names = [s.name for s in snapshots]
        if step.token is not None:
            wanted = {step.token.toguid, step.token.fromguid}
            return tuple(s.name for s in snapshots if s.guid in wanted)
        if step.snapshot not in names:
            return ()  # the one sync --snapshot is about to take (--dry-run)
        last = names.index(step.snapshot)
        if step.base is None or step.base not in names:
            return (step.snapshot,)
        first = names.index(step.base)
        return tuple(names[first : last + 1]) if step.intermediates else (step.base, step.snapshot)

    def next_step(self, source: dict[str, Any], target: dict[str, Any]) -> SyncStep | None:
        step = next_step(*self._inputs(source, target), no_stream=self.policy.no_stream, force=self.policy.force)
        return None if step is None else self._as_command(step, source, target)

    def plan_all(self, source: dict[str, Any], target: dict[str, Any], new_snapshot: str | None = None) -> list[SyncStep]:
        sent_from, arrived, token = self._inputs(source, target)
        first: list[SyncStep] = []
        if new_snapshot is not None:
            first.append(self.snapshot_step(new_snapshot))
            sent_from.append(Snapshot(f"{self.source}@{new_snapshot}", 0, max((s.createtxg for s in sent_from), default=0) + 1))
        steps = plan_all(sent_from, arrived, token, no_stream=self.policy.no_stream, force=self.policy.force)
        return first + [self._as_command(step, source, target) for step in steps]

    def snapshot_step(self, name: str, recursive: bool = False) -> Action:
        snapshot = f"{self.source}@{name}"
        if recursive:
            return Action(f"take snapshot {snapshot} of the whole tree", ("snapshot", "-r", snapshot), on_source=True)
        return Action(f"take snapshot {snapshot}", ("snapshot", snapshot), on_source=True)

    def tidy(self, source: dict[str, Any], target: dict[str, Any]) -> list[Action]:
        """The checkpoints of completed transfers that a busy dataset kept from being destroyed, and sync's holds
        on source snapshots that an interrupted, then aborted or superseded, transfer left behind."""
        actions = []
        if target.get("finished_pieces"):
            actions.append(Action("remove the checkpoints of completed transfers", ("receive", "-q", "-A", self.target)))
        held = [s.name for s in snapshots_of(source) if s.userrefs]
        if self.policy.hold_tag is not None and held:
            actions.append(Action(f"release {self.policy.hold_tag} from held snapshots", ("release", self.policy.hold_tag, *held), True))
        common = summarize(target, source).common
        for keep, dataset, on_source in ((self.policy.keep_source, self.source, True), (self.policy.keep_target, self.target, False)):
            if keep is not None and common is not None:
                # Never the newest snapshot both ends have: the next incremental starts there.
                protect = f"{dataset}@{common.name.partition('@')[2]}"
                args = ("prune", "--prefix", self.policy.prefix, "--keep", str(keep), "--protect", protect, dataset)
                actions.append(Action(f"keep the newest {keep} {self.policy.prefix}... snapshots of {dataset}", args, on_source))
        return actions
