"""btrfs behind the Backend interface: `btrfs send` checked on the way, snapferry's checkpointing receiver, and the
facts sync plans from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapferry.btrfs.engine.command import subvolumes_in
from snapferry.btrfs.engine.naming import claims_btrfs
from snapferry.btrfs.plan import BtrfsSyncPlanner, summarize
from snapferry.btrfs.resume.checkpoints import STATE_DIR, BtrfsToken, abort, btrfs_token, read_state, subvol_info_at
from snapferry.btrfs.resume.receiver import DEFAULT_CHECKPOINT_SIZE, BtrfsCheckpointReceiver
from snapferry.btrfs.resume.sender import BtrfsSendOptions, estimate_stream_size, send_btrfs, send_btrfs_continuation
from snapferry.btrfs.resume.stored import send_stored_btrfs_continuation
from snapferry.core.events import EventSink
from snapferry.core.streamio import Readable, Sink
from snapferry.errors import DatasetMissing, NothingToDo, Refused, UsageError
from snapferry.interface import ReceiveRequest, SendRequest, SnapshotInfo, Summary, SyncPolicy

_UNLIMITED = 1 << 62


def _path(text: str) -> Path:
    """Absolute, so that every message names it in a form that means btrfs when pasted back."""
    return Path(text).absolute()


def transfer_at(path: Path) -> tuple[Path, str]:
    """The receive root and subvolume name `path` means: ROOT/NAME, or a ROOT with exactly one unfinished transfer."""
    try:
        unfinished = sorted(p.name for p in (path / STATE_DIR).iterdir() if p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        unfinished = []
    if len(unfinished) == 1:
        return path, unfinished[0]
    if len(unfinished) > 1:
        raise UsageError(f"{path} has unfinished transfers of {', '.join(unfinished)}: name one, as {path / unfinished[0]}")
    if path.name in ("", ".", ".."):
        raise UsageError(f"{path} names no subvolume: give RECEIVE_DIR/SUBVOLUME")
    return path.parent, path.name


class BtrfsBackend:
    """btrfs: arguments are paths; streams are received by snapferry's own receiver, which checkpoints as it goes."""

    name = "btrfs"
    target_field = "path"

    @staticmethod
    def claims(argument: str) -> bool:
        """A path (btrfs) rather than a pool/fs dataset (ZFS), or a btrfs token."""
        return claims_btrfs(argument)

    # --- sending ------------------------------------------------------------------------------

    @staticmethod
    def _options(request: SendRequest) -> BtrfsSendOptions:
        if request.base or request.intermediates or request.replicate or set(request.flags) - {"-c"}:
            raise UsageError("-i/-I/-R/-L/-e/-w are zfs send's: for btrfs, give the parent with -p PARENT")
        if "-c" in request.flags:
            raise UsageError("btrfs send -c needs a clone source: -c PATH")
        return BtrfsSendOptions(
            _path(request.parent) if request.parent else None,
            tuple(_path(c) for c in request.clones),
            request.proto,
            request.compressed_data,
            request.estimate,
        )

    def send(self, request: SendRequest, sink: Sink, events: EventSink) -> int:
        options = self._options(request)
        if not request.snapshot:
            raise UsageError("send -t with a btrfs token needs the snapshot's path: snapferry send -t TOKEN /path/to/snapshot")
        path = _path(request.snapshot)
        if request.token:
            return send_btrfs_continuation(BtrfsToken.decode(request.token), path, sink, options, events=events)
        return send_btrfs(path, sink, options, events=events)

    def estimate_size(self, request: SendRequest) -> int | None:
        return estimate_stream_size(_path(request.snapshot), self._options(request)) if request.snapshot else None

    # --- receiving ----------------------------------------------------------------------------

    def receive(self, request: ReceiveRequest, source: Readable, events: EventSink) -> list[str]:
        if request.force or request.mode or request.properties or request.prefix or request.exclude_properties or not request.mount:
            raise UsageError("-F, -d, -e, -o, -x, -u and --mode are for ZFS datasets, not btrfs paths")
        size = (request.checkpoint or DEFAULT_CHECKPOINT_SIZE) if request.resumable else _UNLIMITED
        receiver = BtrfsCheckpointReceiver(_path(request.target), checkpoint_size=size, events=events)
        return [str(path) for path in receiver.receive(source)]

    # --- the destination's state --------------------------------------------------------------

    def token(self, target: str, mode: str | None = None) -> str:
        root, name = transfer_at(_path(target))
        state = read_state(root, name)
        if state is None or state.last is None:
            reason = (
                "its interrupted transfer committed no checkpoint; send it again" if state else "it has no unfinished snapferry transfer"
            )
            raise NothingToDo(f"no resume token for {root / name}: {reason}")
        return btrfs_token(root, name)

    def describe_token(self, token: str, as_json: bool) -> str:
        return json.dumps(BtrfsToken.decode(token).__dict__, indent=2) + "\n"

    def abort(self, target: str) -> list[str]:
        root, name = transfer_at(_path(target))
        abort(root, name)
        return [f"aborted the unfinished transfer of {name} under {root}"]

    def snapshots(self, target: str) -> list[SnapshotInfo]:
        return [SnapshotInfo(s.name, str(s.uuid), s.otransid) for s in subvolumes_in(Path(target))]

    def status(self, target: str, *, properties: bool = True) -> dict[str, Any]:
        """The directory's subvolumes (oldest first) and its unfinished transfers (name -> token, None before a checkpoint)."""
        directory = Path(target)
        unfinished: dict[str, str | None] = {}
        progress: dict[str, dict[str, int]] = {}
        for entry in sorted((directory / STATE_DIR).glob("*")):
            state = read_state(directory, entry.name)
            if state is not None and state.identity is not None:
                last = state.last
                unfinished[entry.name] = btrfs_token(directory, entry.name) if last is not None else None
                progress[entry.name] = {
                    "offset": last.offset if last is not None else 0,
                    "checkpoints": last.seq if last is not None else 0,
                    "last_progress": subvol_info_at(state.directory / last.name).otime if last is not None else 0,
                }
        return {
            "backend": self.name,
            "target": target,
            "subvolumes": [s.as_json() for s in subvolumes_in(directory)],
            "unfinished": unfinished,
            "progress": progress,
            "native_resume": False,
            "modified": None,
        }

    def summarize(self, target: dict[str, Any], source: dict[str, Any] | None = None) -> Summary:
        return summarize(target, source)

    # --- sync's other actions -----------------------------------------------------------------

    def rollback_casualties(self, snapshot: str) -> list[str]:
        raise UsageError("rollback is for ZFS datasets; btrfs sync never rolls back")

    def rollback(self, snapshot: str, destroy_later: bool) -> str:
        raise UsageError("rollback is for ZFS datasets; btrfs sync never rolls back")

    def hold(self, tag: str, snapshots: list[str]) -> None:
        raise UsageError("btrfs has no snapshot holds (user holds are ZFS's)")

    def release(self, tag: str, snapshots: list[str]) -> list[str]:
        raise UsageError("btrfs has no snapshot holds (user holds are ZFS's)")

    def holds(self, target: str) -> list[tuple[str, str | None]]:
        return []

    def prune(self, target: str, prefix: str, keep: int, protect: list[str]) -> list[str]:
        raise UsageError("--keep-source/--keep-dest prune sync's own ZFS snapshots; prune btrfs snapshots with btrbk or by hand")

    def descendants(self, target: str) -> list[str]:
        raise UsageError("-r is for ZFS dataset trees; a btrfs sync already sends every read-only snapshot in the directory")

    def take_snapshot(self, snapshot: str, recursive: bool = False) -> None:
        raise UsageError("take btrfs snapshots with: btrfs subvolume snapshot -r SUBVOLUME SNAPSHOT")

    def check_sync_endpoint(self, name: str, remote: bool) -> None:
        if remote and not name.startswith("/"):
            raise UsageError(f"a remote btrfs directory must be an absolute path: {name}")

    def planner(self, policy: SyncPolicy, source: str, target: str) -> BtrfsSyncPlanner:
        if policy.force or policy.mode or policy.take_snapshot:
            raise UsageError("--force, --snapshot and --mode are for ZFS; take btrfs snapshots with btrfs subvolume snapshot -r")
        return BtrfsSyncPlanner(policy, source, target)

    # --- an offsite copy ----------------------------------------------------------------------

    def source_snapshots(self, source: str) -> list[SnapshotInfo]:
        return [SnapshotInfo(s.name, str(s.uuid), s.otransid, s.otime) for s in subvolumes_in(Path(source)) if s.readonly]

    def send_request(self, source: str, snapshot: str, base: str | None) -> SendRequest:
        return SendRequest(snapshot=str(Path(source) / snapshot), parent=str(Path(source) / base) if base else None)

    def restored_identities(self, target: str) -> set[str]:
        try:
            return {str(s.received_uuid) for s in subvolumes_in(Path(target)) if s.readonly}
        except DatasetMissing:
            return set()

    def stored_properties(self, source: str) -> dict[str, str]:
        return {}

    def restore_request(self, target: str, force: bool, properties: dict[str, str]) -> ReceiveRequest:
        if force:
            raise UsageError("-F is for ZFS datasets; a btrfs restore never overwrites")
        return ReceiveRequest(target)

    def resume_token(self, target: str, snapshot: str) -> str | None:
        try:
            return self.token(str(Path(target) / snapshot))
        except (NothingToDo, Refused):
            return None

    def stored_continuation(
        self, token: str, head: Readable, rest_from: Callable[[int], Readable], sink: Sink, events: EventSink, where: str
    ) -> int:
        return send_stored_btrfs_continuation(BtrfsToken.decode(token), head, rest_from, sink, events, where)
