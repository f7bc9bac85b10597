"""ZFS behind the Backend interface: the piece chain and native mode picked per transfer, and the facts sync plans from."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypedDict

from snapferry.core.events import EventSink
from snapferry.core.lock import dataset_lock
from snapferry.core.streamio import Prefixed, Readable, Sink, read_exact
from snapferry.errors import DatasetMissing, NothingToDo, Refused, SnapferryError, UsageError
from snapferry.interface import HOLD_PREFIX, ReceiveRequest, SendRequest, SnapshotInfo, Summary, SyncPolicy
from snapferry.zfs.codec.openzfs_token import OpenZfsToken
from snapferry.zfs.codec.records import COMPOUNDSTREAM, HEADER_SIZE, Begin
from snapferry.zfs.codec.replication import read_compound_header
from snapferry.zfs.codec.stream import read_header
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.codec.tree_token import TreeToken, is_tree_token
from snapferry.zfs.engine.command import Zfs
from snapferry.zfs.plan import NOT_COPIED, ZfsSyncPlanner, summarize
from snapferry.zfs.resume.checkpoints import Transfer, find_transfers, is_piece, positioned_token, read_transfers
from snapferry.zfs.resume.cleanup import discard_transfer, remove_finished_pieces
from snapferry.zfs.resume.mounts import mount_replica
from snapferry.zfs.resume.native import MODES, Mode, abort_native, choose_mode, kernel_token, receive_native, send_native_continuation
from snapferry.zfs.resume.receiver import PieceReceiver
from snapferry.zfs.resume.sender import send_continuation, send_snapshot
from snapferry.zfs.resume.stored import send_stored_continuation
from snapferry.zfs.resume.tree_native import NativeTreeReceiver, choose_tree_mode
from snapferry.zfs.resume.tree_receiver import TreeReceiver, TreeReceiverBase, forget_tree, tree_token
from snapferry.zfs.resume.tree_sender import send_tree, send_tree_rest

# Chosen with bench/receive_bench.py (docs/BENCHMARKS.md): each checkpoint stalls the pipe for
# 40-110 ms on zfs-fuse, about 5 % of a raw transfer at 1 GiB per piece, and an interruption
# re-sends at most 1 GiB.
DEFAULT_CHECKPOINT = 1 << 30
_UNLIMITED = 1 << 62
_PROPERTY = re.compile(r"^[a-z][a-z0-9_.:]*$")


def is_openzfs_token(text: str) -> bool:
    return text.strip().startswith("1-")


def _mode(text: str | None) -> Mode | None:
    for mode in MODES:
        if text == mode:
            return mode
    if text is not None:
        raise UsageError(f"--mode {text}: choose one of {', '.join(MODES)}")
    return None


class _TreeOptions(TypedDict):
    """What a tree receiver takes from the request, in either mode."""

    prefix: str | None
    force: bool
    mount: bool
    exclude_props: tuple[str, ...]
    set_props: tuple[tuple[str, str], ...]
    events: EventSink


class ZfsBackend:
    """Every ZFS: pieces (snapferry's checkpoint snapshots) anywhere, native (`zfs receive -s`) where both ends can."""

    name = "zfs"
    target_field = "dataset"

    def __init__(self, zfs: Zfs | None = None) -> None:
        self.zfs = zfs or Zfs()

    # --- sending ------------------------------------------------------------------------------

    def send(self, request: SendRequest, sink: Sink, events: EventSink) -> int:
        if request.parent or request.clones or request.proto is not None or request.compressed_data:
            raise UsageError("-p, -c PATH, --proto and --compressed-data are btrfs send's: give a snapshot path (/...)")
        if request.token:
            return self._send_rest(request, sink, events)
        snapshot = request.snapshot
        if not snapshot or "@" not in snapshot:
            raise UsageError("send needs a snapshot: snapferry send [-R] [-i SNAP | -I SNAP] POOL/FS@SNAP")
        if request.replicate:
            if request.flags:
                raise UsageError("send -R takes no -L/-e/-c/-w yet: send the tree without them, or each dataset with sync -r")
            return send_tree(self.zfs, snapshot, sink, base=self._base(request), intermediates=request.intermediates, events=events)
        estimate = self.estimate_size(request) if request.estimate else None
        return send_snapshot(
            self.zfs,
            snapshot,
            sink,
            base=self._base(request),
            intermediates=request.intermediates,
            events=events,
            estimate=estimate,
            flags=request.flags,
        )

    def _send_rest(self, request: SendRequest, sink: Sink, events: EventSink) -> int:
        assert request.token is not None
        if request.snapshot or request.base or request.replicate:
            raise UsageError("send -t TOKEN takes no snapshot and no -i/-I/-R (a tree's token says it is one)")
        if is_tree_token(request.token):
            if request.flags:
                raise UsageError("send -t of a tree token takes no -L/-e/-c/-w")
            return send_tree_rest(self.zfs, TreeToken.decode(request.token), sink, events=events, visible=request.visible)
        if is_openzfs_token(request.token):
            return send_native_continuation(self.zfs, request.token, sink, flags=request.flags, events=events, visible=request.visible)
        if request.flags:
            raise UsageError("send -t takes -L/-e/-c/-w from the token (the interrupted stream's own flags): drop them")
        return send_continuation(self.zfs, ResumeToken.decode(request.token), sink, events=events, visible=request.visible)

    @staticmethod
    def _base(request: SendRequest) -> str | None:
        base = request.base
        if base and base.startswith("@") and request.snapshot:
            return request.snapshot.partition("@")[0] + base
        return base

    def estimate_size(self, request: SendRequest) -> int | None:
        """OpenZFS says it (`zfs send -nP`); on zfs-fuse, which cannot, a full stream carries about the
        snapshot's logical size and an incremental gets no estimate."""
        snapshot, base = request.snapshot, self._base(request)
        if not snapshot:
            return None
        incremental = [("-I" if request.intermediates else "-i"), base] if base else []
        try:
            dry_run = self.zfs.run(f"cannot estimate the size of {snapshot}", "send", "-nP", *request.flags, *incremental, snapshot)
            sizes = [line.split()[1] for line in dry_run.splitlines() if line.startswith("size")]
            return int(sizes[-1])
        except (SnapferryError, IndexError, ValueError):
            pass
        if base:
            return None
        try:
            props = self.zfs.get_properties(snapshot, "referenced", "compressratio")[snapshot]
            return int(int(props["referenced"]) * float(props["compressratio"].rstrip("x")))
        except (SnapferryError, KeyError, ValueError):
            return None

    # --- receiving ----------------------------------------------------------------------------

    def receive(self, request: ReceiveRequest, source: Readable, events: EventSink) -> list[str]:
        dataset = request.target
        for name, _ in request.properties:
            if not _PROPERTY.match(name):
                raise UsageError(f"-o {name}=...: not a ZFS property name")
        with dataset_lock(dataset, "receive"):
            header = read_header(source)
            first = Begin.decode(header, supported_only=False)
            if first.header_type == COMPOUNDSTREAM:
                return self._receive_tree(request, Prefixed(header, source), events)
            if request.prefix or request.exclude_properties or not request.mount:
                raise UsageError("-d, -e, -x and -u are for -R (compound) streams; this is one dataset's stream")
            sender_can_resume = first.sender_can_resume
            mode = choose_mode(self.zfs, dataset, _mode(request.mode), sender_can_resume=sender_can_resume)
            events("mode", mode=mode)
            stream = Prefixed(header, source)
            if mode == "native":
                done = receive_native(self.zfs, dataset, stream, resumable=request.resumable, force=request.force, events=events)
            else:
                size = (request.checkpoint or DEFAULT_CHECKPOINT) if request.resumable else _UNLIMITED
                modern = self.zfs.is_modern(dataset)
                receiver = PieceReceiver(self.zfs, dataset, checkpoint_size=size, force=request.force, events=events, modern_zfs=modern)
                done = receiver.receive(stream)
            for name, value in request.properties:
                self.zfs.set_property(dataset, name, value)
        return done

    def _receive_tree(self, request: ReceiveRequest, stream: Readable, events: EventSink) -> list[str]:
        """A -R stream: natively (one `zfs receive -s` per substream) where the pool and the sender can resume, else
        through the piece chain; an interrupted tree goes on in the mode it began in."""
        head, _, header = read_compound_header(stream)
        first = bytearray(HEADER_SIZE)
        got = read_exact(stream, memoryview(first))
        stream = Prefixed(head + bytes(first[:got]), stream)
        # An OpenZFS sender sets FREERECORDS in every substream's BEGIN (and a continuation's is RESUMING): judged
        # from the first, as for one dataset. A tree without substreams can go either way.
        sub = Begin.decode(first, supported_only=False) if got == HEADER_SIZE and first[:4] == bytes(4) else None
        tree = tree_token(self.zfs, request.target) if self.zfs.exists(request.target) else None
        can_resume = sub is None or sub.sender_can_resume
        requested = _mode(request.mode)
        mode = choose_tree_mode(self.zfs, request.target, requested, sender_can_resume=can_resume, tree=tree)
        events("mode", mode=mode)
        options = _TreeOptions(
            prefix=request.prefix,
            force=request.force,
            mount=request.mount,
            exclude_props=request.exclude_properties,
            set_props=request.properties,
            events=events,
        )
        receiver: TreeReceiverBase
        if mode == "native":
            receiver = NativeTreeReceiver(self.zfs, request.target, **options)
        else:
            size = (request.checkpoint or DEFAULT_CHECKPOINT) if request.resumable else _UNLIMITED
            modern = self.zfs.is_modern(request.target)
            receiver = TreeReceiver(self.zfs, request.target, checkpoint_size=size, modern_zfs=modern, **options)
        return receiver.receive(stream)

    # --- the destination's state --------------------------------------------------------------

    def token(self, target: str, mode: str | None = None) -> str:
        tree = tree_token(self.zfs, target) if self.zfs.exists(target) else None
        if tree is not None:
            return tree.encode()
        _, transfers = read_transfers(self.zfs, target)
        token = positioned_token(self.zfs, transfers)
        if token is not None:
            return token.encode()
        if mode != "pieces" and (native := kernel_token(self.zfs, target, transfers)):
            return native
        if any(not t.complete for t in transfers):
            reason = "its interrupted transfer committed no checkpoint; send the stream again"
        elif transfers:
            reason = "its transfer is complete; nothing to resume"
        else:
            reason = "it has no interrupted snapferry transfer"
        raise NothingToDo(f"no resume token for {target}: {reason}")

    def describe_token(self, token: str, as_json: bool) -> str:
        if is_tree_token(token):
            return json.dumps(TreeToken.decode(token).describe(), indent=2) + "\n"
        if not is_openzfs_token(token):
            return json.dumps(ResumeToken.decode(token).describe(), indent=2) + "\n"
        if as_json:
            return json.dumps(OpenZfsToken.decode(token).as_json(), indent=2) + "\n"
        return OpenZfsToken.decode(token).describe()

    def abort(self, target: str) -> list[str]:
        tree = tree_token(self.zfs, target) if self.zfs.exists(target) else None
        if tree is not None:
            # The partial dataset is aborted like any other; the datasets the tree completed stay.
            messages = self._abort_one(tree.partial.dataset) if tree.partial else []
            with dataset_lock(target, "abort"):
                return [*messages, forget_tree(self.zfs, tree)]
        return self._abort_one(target)

    def _abort_one(self, target: str) -> list[str]:
        with dataset_lock(target, "abort"):
            snapshots, transfers = read_transfers(self.zfs, target)
            native = abort_native(self.zfs, target)
            messages = [native] if native else []
            for transfer in transfers:
                if transfer.complete:
                    remove_finished_pieces(self.zfs, transfer)
                    messages.append(f"removed {len(transfer.pieces())} leftover checkpoint(s) of a completed transfer")
                    # The process that completed it may have died before it mounted the replica.
                    mount_replica(self.zfs, target, lambda event, **fields: messages.append(f"warning: {fields['message']}"))
                else:
                    messages.append(discard_transfer(self.zfs, transfer, snapshots))
                    snapshots, _ = read_transfers(self.zfs, target)
        if not messages:
            raise NothingToDo(f"{target} has no interrupted snapferry transfer to abort")
        return messages

    def snapshots(self, target: str) -> list[SnapshotInfo]:
        return [SnapshotInfo(s.name, str(s.guid), s.createtxg) for s in self.zfs.snapshots(target)]

    def status(self, target: str, *, properties: bool = True) -> dict[str, Any]:
        """Snapshots (by guid, in creation order), the unfinished transfer's token, and what the pool can do."""
        if "@" in target:
            raise UsageError(f"status takes a file system, not a snapshot: {target}")
        zfs = self.zfs
        kind, snapshots = zfs.type_and_snapshots(target)
        exists = kind is not None
        transfers = find_transfers(snapshots, target)
        token = positioned_token(zfs, transfers)
        modern = zfs.is_modern(target)
        text = token.encode() if token is not None else (kernel_token(zfs, target, transfers) if exists and modern else None)
        return {
            "backend": self.name,
            "target": target,
            "exists": exists,
            "snapshots": [
                {"name": s.name, "guid": s.guid, "createtxg": s.createtxg, "creation": s.creation, "userrefs": s.userrefs}
                for s in snapshots
            ],
            "token": text,
            "unfinished": self._unfinished(transfers, None if token is not None else text),
            "unfinished_pieces": any(not t.complete for t in transfers),
            "finished_pieces": any(t.complete and t.pieces() for t in transfers),
            "can_send_resume": modern,
            "native_resume": modern and zfs.native_resume(target),
            "modified": self._modified(target) if exists and modern else None,
            "encrypted": self._encrypted(target) if exists and modern else False,
            "properties": zfs.local_properties(target) if exists and properties else {},
            "type": kind,
        }

    @staticmethod
    def _unfinished(transfers: list[Transfer], native: str | None) -> list[dict[str, Any]]:
        """What is interrupted here: piece transfers (with their last checkpoint) and the kernel's partial receive."""
        found: list[dict[str, Any]] = []
        for transfer in transfers:
            if transfer.complete:
                continue
            last = transfer.last
            found.append(
                {
                    "toguid": transfer.toguid,
                    "toname": None,
                    "kind": "sf1" if last is not None else "",
                    "bytes": last.end if last is not None else 0,
                    "checkpoints": len(transfer.checkpoints),
                    "last_progress": last.snapshot.creation if last is not None else 0,
                }
            )
        if native:
            try:
                decoded = OpenZfsToken.decode(native)
            except SnapferryError:
                return found
            found.append(
                {
                    "toguid": decoded.toguid,
                    "toname": decoded.toname,
                    "kind": "1",
                    "bytes": decoded.bytes,
                    "checkpoints": None,
                    "last_progress": 0,
                }
            )
        return found

    def summarize(self, target: dict[str, Any], source: dict[str, Any] | None = None) -> Summary:
        return summarize(target, source)

    def _encrypted(self, dataset: str) -> bool:
        """Whether OpenZFS encrypts the dataset (zfs-fuse has no encryption)."""
        try:
            return self.zfs.get_properties(dataset, "encryption")[dataset]["encryption"] not in ("off", "-")
        except (SnapferryError, KeyError):
            return False

    def _modified(self, dataset: str) -> bool | None:
        """Whether anything was written since the last snapshot (`written`; OpenZFS only, zfs-fuse cannot tell)."""
        try:
            written = self.zfs.get_properties(dataset, "written")[dataset]["written"]
            return int(written) > 0
        except (SnapferryError, KeyError, ValueError):
            return None

    # --- sync's other actions -----------------------------------------------------------------

    def _later_snapshots(self, snapshot: str) -> list[str]:
        dataset, _, name = snapshot.partition("@")
        if not name or not dataset:
            raise UsageError(f"rollback needs a snapshot: POOL/FS@SNAP, not {snapshot}")
        snapshots = self.zfs.snapshots(dataset)
        at = next((s for s in snapshots if s.name == snapshot), None)
        if at is None:
            raise Refused(f"no snapshot {snapshot}")
        return [s.name for s in snapshots if s.createtxg > at.createtxg]

    def _clones_of(self, snapshots: list[str]) -> list[str]:
        """The file systems and volumes cloned from these snapshots (by `origin`: pool v23 has no `clones` property)."""
        if not snapshots:
            return []
        pool = snapshots[0].split("/", 1)[0].partition("@")[0]
        out = self.zfs.run(f"cannot read the clones of {snapshots[0]}", "get", "-H", "-r", "-o", "name,value", "origin", pool)
        wanted = set(snapshots)
        return [name for name, _, origin in (line.partition("\t") for line in out.splitlines()) if origin.strip() in wanted]

    def rollback_casualties(self, snapshot: str) -> list[str]:
        later = self._later_snapshots(snapshot)
        return later + self._clones_of(later)

    def rollback(self, snapshot: str, destroy_later: bool) -> str:
        later = self._later_snapshots(snapshot)
        if later and not destroy_later:
            raise Refused(f"{snapshot} is not the most recent snapshot (after it: {', '.join(later)}); -r destroys those")
        clones = self._clones_of(later)
        if clones:
            raise Refused(
                f"refused to roll back to {snapshot}: later snapshots have clones ({', '.join(clones)}), "
                "which snapferry never destroys; promote or destroy them first"
            )
        self.zfs.rollback(snapshot)
        return f"rolled {snapshot.partition('@')[0]} back to {snapshot}" + (f", destroying {', '.join(later)}" if later else "")

    @staticmethod
    def _check_tag(tag: str) -> None:
        if not tag.startswith(HOLD_PREFIX) or len(tag) > 255:
            raise UsageError(f"hold tag {tag!r}: snapferry only places and removes its own holds, tagged {HOLD_PREFIX}...")

    def hold(self, tag: str, snapshots: list[str]) -> None:
        self._check_tag(tag)
        for snapshot in snapshots:
            self.zfs.hold(tag, snapshot)

    def release(self, tag: str, snapshots: list[str]) -> list[str]:
        self._check_tag(tag)
        released = []
        for snapshot in snapshots:
            try:
                if self.zfs.release(tag, snapshot):
                    released.append(snapshot)
            except DatasetMissing:
                continue  # destroyed meanwhile: nothing held any more
        return released

    def holds(self, target: str) -> list[tuple[str, str | None]]:
        found: list[tuple[str, str | None]] = []
        for snapshot in self.zfs.snapshots(target):
            if snapshot.userrefs:
                tags = self.zfs.hold_tags(snapshot.name)
                found += [(snapshot.name, tag) for tag in tags] if tags is not None else [(snapshot.name, None)] * snapshot.userrefs
        return found

    def take_snapshot(self, snapshot: str, recursive: bool = False) -> None:
        if "@" not in snapshot:
            raise UsageError(f"not a snapshot name: {snapshot} (POOL/FS@NAME)")
        self.zfs.snapshot(snapshot, recursive=recursive)

    def prune(self, target: str, prefix: str, keep: int, protect: list[str]) -> list[str]:
        if keep < 1 or not prefix:
            raise UsageError("prune keeps at least 1 snapshot, and only prunes names with a prefix (--prefix)")
        ours = [s for s in self.zfs.snapshots(target) if s.short_name.startswith(prefix) and not is_piece(s)]
        destroyed = []
        for snapshot in ours[: max(len(ours) - keep, 0)]:
            if snapshot.name in protect or snapshot.userrefs:
                continue
            self.zfs.destroy(snapshot.name)
            destroyed.append(snapshot.name)
        return destroyed

    def descendants(self, target: str) -> list[str]:
        return self.zfs.descendants(target)

    def check_sync_endpoint(self, name: str, remote: bool) -> None:
        if "@" in name:
            raise UsageError(f"sync takes a file system, not a snapshot: {name}")

    def planner(self, policy: SyncPolicy, source: str, target: str) -> ZfsSyncPlanner:
        return ZfsSyncPlanner(policy, source, target)

    # --- an offsite copy ----------------------------------------------------------------------

    def source_snapshots(self, source: str) -> list[SnapshotInfo]:
        return [SnapshotInfo(s.short_name, str(s.guid), s.createtxg, s.creation) for s in self.zfs.snapshots(source) if not is_piece(s)]

    def send_request(self, source: str, snapshot: str, base: str | None) -> SendRequest:
        # An encrypted dataset goes raw (-w): stored as ZFS encrypted it, the key never leaves the host.
        flags = ("-w",) if self._encrypted(source) else ()
        return SendRequest(snapshot=f"{source}@{snapshot}", base=f"{source}@{base}" if base else None, flags=flags)

    def restored_identities(self, target: str) -> set[str]:
        if not self.zfs.exists(target):
            return set()
        return {str(s.guid) for s in self.zfs.snapshots(target) if not is_piece(s)}

    def stored_properties(self, source: str) -> dict[str, str]:
        return {k: v for k, v in self.zfs.local_properties(source).items() if k not in NOT_COPIED}

    def restore_request(self, target: str, force: bool, properties: dict[str, str]) -> ReceiveRequest:
        # Pieces, never native: OpenZFS's own resume needs a kernel `zfs send -t`, which a stored copy cannot give.
        return ReceiveRequest(target, mode="pieces", force=force, properties=tuple(properties.items()))

    def resume_token(self, target: str, snapshot: str) -> str | None:
        try:
            return self.token(target, mode="pieces")
        except (NothingToDo, DatasetMissing):
            return None

    def stored_continuation(
        self, token: str, head: Readable, rest_from: Callable[[int], Readable], sink: Sink, events: EventSink, where: str
    ) -> int:
        return send_stored_continuation(ResumeToken.decode(token), head, rest_from, sink, events, where)
