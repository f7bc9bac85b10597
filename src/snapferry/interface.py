"""The seam where a filesystem plugs in: the operations every verb needs, and the sync steps a backend plans."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from snapferry.core.events import EventSink
from snapferry.core.streamio import Readable, Sink

# sync's user holds on what it sends: this prefix and the destination they are kept for.
HOLD_PREFIX = "snapferry:"


def hold_tag(destination: str) -> str:
    return f"{HOLD_PREFIX}{destination}"


def everything(name: str) -> bool:
    return True


@dataclass(frozen=True)
class SendRequest:
    """What `snapferry send` was asked for. Each backend takes its own fields and refuses the others' with a UsageError."""

    snapshot: str | None = None  # POOL/FS@SNAP (ZFS) or the path of a read-only snapshot (btrfs)
    token: str | None = None  # send -t: continue the interrupted transfer this token describes
    base: str | None = None  # ZFS -i/-I
    intermediates: bool = False  # ZFS -I
    replicate: bool = False  # ZFS -R: the file system, its descendants and their snapshots, as one stream
    flags: tuple[str, ...] = ()  # ZFS -L -e -c -w
    parent: str | None = None  # btrfs -p
    clones: tuple[str, ...] = ()  # btrfs -c CLONE_SRC
    proto: int | None = None  # btrfs --proto
    compressed_data: bool = False  # btrfs --compressed-data
    estimate: bool = True  # work out the stream's size for an ETA (not with -q: nobody sees it)
    # For a restricted ssh key (serve --allow): which datasets a token's snapshot may be looked up in.
    visible: Callable[[str], bool] = everything


@dataclass(frozen=True)
class ReceiveRequest:
    """What `snapferry receive` was asked for."""

    target: str  # POOL/FS, or the btrfs directory to receive into
    resumable: bool = True  # -s
    checkpoint: int | None = None  # bytes between checkpoints; None: the backend's default
    force: bool = False  # ZFS -F
    mode: str | None = None  # ZFS --mode native|pieces
    # -o PROP=VALUE (ZFS): set on the dataset once the transfer is complete.
    properties: tuple[tuple[str, str], ...] = ()
    # ZFS, for -R streams: -d or -e (how the stream's names map below the target), -x PROP, -u.
    prefix: str | None = None
    exclude_properties: tuple[str, ...] = ()
    mount: bool = True


@dataclass(frozen=True)
class Action:
    """A sync step on one end alone: `snapferry ARGS` (a rollback for --force, a clean-up, sync --snapshot's snapshot)."""

    description: str
    args: tuple[str, ...]
    on_source: bool = False  # else on the destination

    def describe(self) -> str:
        return self.description


@dataclass(frozen=True)
class Transfer:
    """A sync step: `snapferry send SEND_ARGS | snapferry receive RECEIVE_ARGS` (the wire's options are sync's)."""

    description: str
    send_args: tuple[str, ...]
    receive_args: tuple[str, ...]
    # (what the receiving side says, what sync should say instead): its advice names receive's flags, not sync's.
    advice: tuple[tuple[str, str], ...] = ()
    resumes: bool = False  # it continues an interrupted transfer (send -t)
    # Run before the pipe (holds on what it sends) and after it succeeded (their release); a failure of
    # one is a warning, not the step's: they protect the transfer, they are not it.
    before: tuple[Action, ...] = ()
    after: tuple[Action, ...] = ()
    # For a resume: what gives its unfinished transfer up on the destination (sync --on-stale restart).
    abort: Action | None = None

    def describe(self) -> str:
        return self.description


SyncStep = Transfer | Action


@dataclass(frozen=True)
class SyncPolicy:
    """The choices of `snapferry sync` that shape its plan."""

    no_stream: bool = False
    force: bool = False
    mode: str | None = None
    take_snapshot: bool = False  # --snapshot
    # The user hold sync puts on what it sends, until the destination has it (None: --no-hold).
    hold_tag: str | None = None
    # Discard changes to the destination's live file system since its last snapshot (receive -F), but
    # never its snapshots: a parent in a tree changes whenever a child's mountpoint is made in it.
    discard_changes: bool = False
    # zfs send flags for every new stream (-L -e -c -w); a resume takes its flags from its token.
    send_flags: tuple[str, ...] = ()
    # --props: the source's locally set properties go with each transfer (receive -o), less `exclude_props`,
    # with `set_props` on top.
    props: bool = False
    exclude_props: tuple[str, ...] = ()
    set_props: tuple[tuple[str, str], ...] = ()
    # Retention of sync's own snapshots (names starting with `prefix`): how many of the newest each end keeps.
    prefix: str = "snapferry_"
    keep_source: int | None = None
    keep_target: int | None = None


class SyncPlanner(Protocol):
    """Plans a sync from both ends' `status` (pure: the same statuses give the same plan)."""

    def next_step(self, source: dict[str, Any], target: dict[str, Any]) -> SyncStep | None:
        """The next step, or None when the target is up to date; Refused when it cannot be brought up to date."""
        ...

    def plan_all(self, source: dict[str, Any], target: dict[str, Any], new_snapshot: str | None = None) -> list[SyncStep]:
        """Every step a run would take from here (--dry-run), after taking `new_snapshot` on the source if given."""
        ...

    def snapshot_step(self, name: str, recursive: bool = False) -> Action:
        """sync --snapshot: the step that takes a snapshot called `name` of the source (-r: of its tree, atomically)."""
        ...

    def tidy(self, source: dict[str, Any], target: dict[str, Any]) -> list[Action]:
        """Clean-up once the target is up to date: leftovers on the destination, holds on the source no longer needed."""
        ...


@dataclass(frozen=True)
class Moment:
    """A snapshot (or checkpoint) and when it was taken (unix seconds; 0 where the filesystem cannot say)."""

    name: str
    created: int


@dataclass(frozen=True)
class Unfinished:
    """An interrupted transfer on a destination, as `status` and `check` show it."""

    snapshot: str  # what it receives
    token_kind: str  # "sf1" (pieces), "1" (OpenZFS native), "sf1b" (btrfs); "" before the first checkpoint
    bytes_done: int | None  # of the stream, committed
    checkpoints: int | None
    last_progress: int  # when the last checkpoint was committed (unix seconds; 0: unknown)


@dataclass(frozen=True)
class Summary:
    """A target as a person (and `check`) sees it; with a source, how far behind it is."""

    target: str
    exists: bool
    newest: Moment | None
    unfinished: tuple[Unfinished, ...]
    held: int  # snapshots with a user hold
    source_newest: Moment | None = None
    common: Moment | None = None  # the newest snapshot both have, by the source's name and creation time


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot as sync compares them: by identity (a ZFS guid, a btrfs UUID), oldest first by `order`."""

    name: str
    identity: str
    order: int
    created: int = 0  # unix seconds; 0 where not asked for


class Backend(Protocol):
    """One filesystem behind snapferry's verbs. A new filesystem is one package with one class like this."""

    name: str  # "zfs", "btrfs": in `status` answers and messages
    target_field: str  # what JSON events call a target: "dataset", "path"

    def send(self, request: SendRequest, sink: Sink, events: EventSink) -> int:
        """A snapshot's stream (or, with request.token, the rest of an interrupted one) into sink; the bytes written."""
        ...

    def estimate_size(self, request: SendRequest) -> int | None:
        """About how many bytes send(request) writes, for the ETA; None when it cannot tell."""
        ...

    def receive(self, request: ReceiveRequest, source: Readable, events: EventSink) -> list[str]:
        """Apply the streams on source, resumably with request.resumable; the names of what was received."""
        ...

    def token(self, target: str, mode: str | None = None) -> str:
        """The resume token of the interrupted transfer into target; NothingToDo (with the reason) when there is none."""
        ...

    def describe_token(self, token: str, as_json: bool) -> str:
        """A token's fields, for `token --decode`."""
        ...

    def abort(self, target: str) -> list[str]:
        """Remove the interrupted transfer into target (only what snapferry created); what was done, or NothingToDo."""
        ...

    def status(self, target: str, *, properties: bool = True) -> dict[str, Any]:
        """Everything sync plans from, in one JSON-able answer (`snapshots`, `token`, `native_resume`, `modified` ...);
        the target's own `properties` too, unless not `properties`."""
        ...

    def snapshots(self, target: str) -> list[SnapshotInfo]:
        """The target's snapshots, oldest first."""
        ...

    def rollback(self, snapshot: str, destroy_later: bool) -> str:
        """Roll a file system back to one of its snapshots (sync --force); what was done."""
        ...

    def rollback_casualties(self, snapshot: str) -> list[str]:
        """Every dataset or snapshot rollback(snapshot) would destroy, for serve to check against --allow."""
        ...

    def take_snapshot(self, snapshot: str, recursive: bool = False) -> None:
        """`snapferry snapshot [-r]`, for sync --snapshot: take this snapshot (of every descendant too, atomically)."""
        ...

    def prune(self, target: str, prefix: str, keep: int, protect: list[str]) -> list[str]:
        """`snapferry prune`: destroy target's snapshots named PREFIX... but the newest `keep`, a held one or one in
        `protect` (the newest both ends have); what it destroyed."""
        ...

    def descendants(self, target: str) -> list[str]:
        """sync -r, status -r: target and every file system below it, parents first; [] when it does not exist."""
        ...

    def hold(self, tag: str, snapshots: list[str]) -> None:
        """`snapferry hold`: a user hold `tag` on each snapshot (already held by it: nothing to do)."""
        ...

    def release(self, tag: str, snapshots: list[str]) -> list[str]:
        """`snapferry release`: take hold `tag` off each snapshot that has it; the snapshots it was taken off."""
        ...

    def holds(self, target: str) -> list[tuple[str, str | None]]:
        """`snapferry holds`: (snapshot, tag) of every user hold in target; tag None where the filesystem cannot name it."""
        ...

    def check_sync_endpoint(self, name: str, remote: bool) -> None:
        """UsageError when `name` cannot be one end of a sync (a snapshot, not a file system; a relative remote path)."""
        ...

    def summarize(self, target: dict[str, Any], source: dict[str, Any] | None = None) -> Summary:
        """A status answer (and, given one, its source's) as a Summary (pure)."""
        ...

    def planner(self, policy: SyncPolicy, source: str, target: str) -> SyncPlanner:
        """The sync planner from source to target (names as each end knows them)."""
        ...

    # --- an offsite copy (a stream stored in object storage, read back later) ---------------------

    def source_snapshots(self, source: str) -> list[SnapshotInfo]:
        """The snapshots of `source` a backup may store, oldest first, by their short names (no checkpoints)."""
        ...

    def send_request(self, source: str, snapshot: str, base: str | None) -> SendRequest:
        """The request that sends `snapshot` of `source` (short names, as source_snapshots gives them), incremental from `base`."""
        ...

    def stored_properties(self, source: str) -> dict[str, str]:
        """The properties of `source` a backup keeps, so that a restore sets them again (as sync --props would)."""
        ...

    def restored_identities(self, target: str) -> set[str]:
        """The identities (as SnapshotInfo gives the source's) of the snapshots `target` has received; empty when it does not exist."""
        ...

    def restore_request(self, target: str, force: bool, properties: dict[str, str]) -> ReceiveRequest:
        """How a stored stream is received into `target`, so that an interruption can go on from the stored copy."""
        ...

    def resume_token(self, target: str, snapshot: str) -> str | None:
        """The token of an interrupted receive of `snapshot` into `target` (as receive was given it), or None."""
        ...

    def stored_continuation(
        self, token: str, head: Readable, rest_from: Callable[[int], Readable], sink: Sink, events: EventSink, where: str
    ) -> int:
        """Write what `receive -s` needs to go on from `token`, made from a stored copy of the stream (`where`): `head`
        reads it from its start (only its first record is read), `rest_from(offset)` from a byte offset on."""
        ...
