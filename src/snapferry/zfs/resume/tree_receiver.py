"""The receiving side of a tree (`zfs send -R`): each substream into its dataset through the piece chain, and the tree's token."""

from __future__ import annotations

import json
from dataclasses import KW_ONLY, dataclass, field

from snapferry.core import hints
from snapferry.core.events import EventSink, ignore_events
from snapferry.core.splice import SpliceRing
from snapferry.core.streamio import Readable
from snapferry.errors import Refused, StreamFormatError, TransferInterrupted
from snapferry.zfs.codec.records import Begin
from snapferry.zfs.codec.replication import FileSystem, ReplicationHeader, property_package, read_compound_header
from snapferry.zfs.codec.stream import StreamReader
from snapferry.zfs.codec.tree_token import NativePartial, Partial, TreeToken
from snapferry.zfs.engine.command import Zfs
from snapferry.zfs.resume.checkpoints import find_transfers, is_piece, positioned_token
from snapferry.zfs.resume.receiver import NOTHING_KEPT, Package, PieceReceiver, resume_hint

# Set on the dataset that receives the source root while a tree transfer is unfinished: the tree's
# identity, which its token needs and the stream no longer says once it is cut. A user property is
# ZFS's own, on every pool version, and survives a reboot with the data it describes.
TREE_PROPERTY = "snapferry:rtree"


def tree_resume_hint(target: str, prefix: str | None) -> str:
    """How to resume a tree: its token is the target's, and its rest is received as the tree was."""
    flags = f"-{prefix} " if prefix else ""
    return hints.resume_hint(target, f"{flags}{target}")


@dataclass
class TreeLayout:
    """Where each of the stream's file systems lands: `zfs receive`'s rules without and with -d or -e."""

    target: str
    root: str  # the stream's top file system (its BEGIN's toname)
    prefix: str | None = None  # "d" or "e"

    def target_of(self, dataset: str) -> str:
        if dataset != self.root and not dataset.startswith(self.root + "/"):
            raise StreamFormatError(f"the -R stream carries {dataset}, outside its own top file system {self.root}: corrupt stream")
        below = dataset[len(self.root) :]
        if self.prefix == "d":
            tail = self.root.partition("/")[2]
            return self.target + (f"/{tail}" if tail else "") + below
        if self.prefix == "e":
            return f"{self.target}/{self.root.rpartition('/')[2]}{below}"
        return self.target + below


@dataclass
class TreeReceiverBase:
    """What both modes share: the options, the receive of a compound stream around its substreams, and the tree's state
    on its top dataset, which its token needs once the stream is cut and the stream no longer says."""

    zfs: Zfs
    target: str
    _: KW_ONLY
    prefix: str | None = None
    force: bool = False
    mount: bool = True
    exclude_props: tuple[str, ...] = ()
    set_props: tuple[tuple[str, str], ...] = ()
    events: EventSink = ignore_events
    received: list[str] = field(default_factory=list)
    _state: dict[str, object] = field(default_factory=dict)
    _recorded: str = ""
    _features: int = 0  # the compound BEGIN's
    # Every substream's records are read into it and handed to their zfs receive from there (PieceReceiver).
    ring: SpliceRing = field(default_factory=SpliceRing)

    def receive(self, source: Readable) -> list[str]:
        _, begin, header = read_compound_header(source)
        self._features = begin.features
        root, _, tosnap = begin.toname.partition("@")
        layout = TreeLayout(self.target, root, self.prefix)
        top = layout.target_of(root)
        self._state = {"root": root, "tosnap": tosnap, "fromsnap": header.fromsnap, "intermediates": False}
        prepare_target(self.zfs, layout, header, top, force=self.force, events=self.events)
        if self.zfs.exists(top):
            self._continue_state(top)
        try:
            self._substreams(StreamReader(source, self.ring), header, layout, top, tosnap)
        except (TransferInterrupted, KeyboardInterrupt) as exc:
            hint = self._tree_hint()
            if hint in str(exc) or not (self.zfs.exists(top) and tree_top(self.zfs, top)):
                raise
            # Cut between two substreams (inside a BEGIN, say): each one before is complete, and the tree resumes.
            raise TransferInterrupted(f"{exc or 'interrupted'}; {len(self.received)} snapshot(s) received in this run; {hint}") from None
        if self.zfs.exists(top):
            self.zfs.inherit_property(top, TREE_PROPERTY)
            self._finished(top)
        return self.received

    def _substreams(self, reader: StreamReader, header: ReplicationHeader, layout: TreeLayout, top: str, tosnap: str) -> None:
        """Each substream into the dataset the layout gives; -o's are set on the top once its first substream is in."""
        overridden = False
        while (first := reader.read_begin(compound=True)) is not None:
            sub, sub_bytes = first
            into = layout.target_of(sub.toname.partition("@")[0])
            filesystem = next((fs for fs in header.filesystems if sub.toguid in fs.snaps.values()), None)
            self._note_substream(sub, filesystem, header.fromsnap, tosnap)
            self._receive_one(reader, sub, sub_bytes, into, filesystem, top)
            if into == top and not overridden:
                overridden = True
                for name, value in self.set_props:  # -o: set on the top, and so inherited below it
                    self.zfs.set_property(top, name, value)

    def _receive_one(self, reader: StreamReader, sub: Begin, sub_bytes: bytes, into: str, filesystem: FileSystem | None, top: str) -> None:
        raise NotImplementedError

    def _finished(self, top: str) -> None:
        """What a mode does once the whole tree is in."""

    def _note_substream(self, sub: Begin, filesystem: FileSystem | None, fromsnap: str | None, tosnap: str) -> None:
        """A -I stream shows itself by a file system that goes through a snapshot between its base and the top."""
        snap = sub.toname.partition("@")[2]
        if filesystem is not None and fromsnap in filesystem.snaps and sub.is_incremental and snap != tosnap:
            self._state["intermediates"] = True

    def _continue_state(self, top: str) -> None:
        """A continuation (`send -t`) no longer shows a -I stream's snapshots between: keep what the tree's first run saw."""
        found = tree_top(self.zfs, top)
        if found is None or found[0] != top:
            return
        try:
            old = json.loads(found[1])
        except ValueError:
            return
        if isinstance(old, dict) and all(old.get(k) == self._state[k] for k in ("root", "tosnap", "fromsnap")):
            self._state["intermediates"] = bool(old.get("intermediates"))
            self._recorded = found[1]

    def _state_text(self) -> str:
        return json.dumps(self._state, sort_keys=True)

    def _record_state(self, top: str) -> None:
        """On the top dataset, once it exists, and again whenever the state changes."""
        text = self._state_text()
        if text != self._recorded and self.zfs.exists(top):
            self.zfs.set_property(top, TREE_PROPERTY, text)
            self._recorded = text

    def _tree_hint(self) -> str:
        return tree_resume_hint(self.target, self.prefix)


@dataclass
class TreeReceiver(TreeReceiverBase):
    """Receives a compound stream in pieces: each substream into the dataset the layout gives, through the piece chain."""

    checkpoint_size: int
    modern_zfs: bool = False

    def _package(self, filesystem: FileSystem | None) -> Package | None:
        """The source's properties go as `zfs receive` sends an -R stream's, as received: less -x, and less -o's (the
        top file system gets those set, and its descendants inherit them)."""
        if filesystem is None:
            return None
        leave_out = {*self.exclude_props, *(name for name, _ in self.set_props), TREE_PROPERTY}
        return lambda piece: property_package(filesystem, piece.toname, piece.toguid, leave_out=leave_out, features=self._features)

    def _receive_one(self, reader: StreamReader, sub: Begin, sub_bytes: bytes, into: str, filesystem: FileSystem | None, top: str) -> None:
        receiver = PieceReceiver(
            self.zfs,
            into,
            checkpoint_size=self.checkpoint_size,
            force=self.force,
            events=self.events,
            modern_zfs=self.modern_zfs,
            mount=self.mount,
            on_checkpoint=lambda: self._record_state(top),
            package=self._package(filesystem),
            ring=self.ring,
        )
        try:
            receiver.receive_substream(reader, sub, sub_bytes)
        except TransferInterrupted as exc:
            # Resuming the one dataset would leave the rest of the tree behind: the advice is the tree's.
            tree_hint = self._tree_hint()
            message = str(exc).replace(resume_hint(into), tree_hint)
            if NOTHING_KEPT in message and self.zfs.exists(top) and tree_top(self.zfs, top) is not None:
                # Nothing of this snapshot, but the tree's snapshots before it are kept: the tree resumes.
                kept = f"nothing of {sub.toname} was kept, the tree's snapshots before it are; {tree_hint}"
                message = message.replace(NOTHING_KEPT, kept)
            raise type(exc)(message) from None
        self._record_state(top)
        self.received += receiver.received


def prepare_target(zfs: Zfs, layout: TreeLayout, header: ReplicationHeader, top: str, *, force: bool, events: EventSink) -> None:
    """What zfs receive does before an -R stream's substreams: with -d or -e, the file systems above the tree's top
    are created as needed; with -F and an incremental stream, the snapshots and file systems below the top that the
    source does not have are destroyed (so each incremental's base is the latest snapshot again). Which is which
    goes by name (the layout's), and for snapshots by guid; snapferry's own checkpoints are left to their transfers."""
    parent = top.rpartition("/")[0]
    if layout.prefix and parent and not zfs.exists(parent):
        zfs.run(f"cannot create {parent}", "create", "-p", parent)
    if not force or header.fromsnap is None or not zfs.exists(top):
        return
    sent = {layout.target_of(fs.name): set(fs.snaps.values()) for fs in header.filesystems}
    for dataset in reversed(zfs.descendants(top)):  # children first
        if dataset not in sent:
            zfs.destroy(dataset, recursive=True)
            events("destroyed", name=dataset, reason="not in the -R stream's tree (receive -F)")
            continue
        for snapshot in zfs.snapshots(dataset):
            if not is_piece(snapshot) and snapshot.guid not in sent[dataset]:
                zfs.destroy(snapshot.name)
                events("destroyed", name=snapshot.name, reason="no longer on the source (receive -F)")


def tree_top(zfs: Zfs, target: str) -> tuple[str, str] | None:
    """(the dataset that receives the source root, the tree's state) of an unfinished tree transfer that `target` is
    part of or holds, or None."""
    answer = zfs.run(f"cannot read {TREE_PROPERTY} of {target}", "get", "-H", "-o", "value,source", TREE_PROPERTY, target)
    value, _, source = answer.rstrip("\n").partition("\t")
    if source in ("local", "received"):  # received: native mode's first package carries it (tree_native.py)
        return target, value
    if source.startswith("inherited from "):
        top = source.removeprefix("inherited from ")
        return top, value
    marked = zfs.locally_set(target, TREE_PROPERTY)
    if not marked:
        return None
    top = min(marked, key=len)
    return top, marked[top]


def tree_token(zfs: Zfs, target: str) -> TreeToken | None:
    """The token of the unfinished tree transfer that `target` is part of or holds, or None where there is none."""
    found = tree_top(zfs, target)
    if found is None:
        return None
    top, text = found
    try:
        state = json.loads(text)
        root, tosnap, fromsnap, intermediates = state["root"], state["tosnap"], state["fromsnap"], bool(state["intermediates"])
    except (ValueError, KeyError, TypeError):
        raise Refused(f"{top}: its {TREE_PROPERTY} property is damaged; clear it with: zfs inherit {TREE_PROPERTY} {top}") from None
    where: dict[int, str] = {}
    partial: Partial | None = None
    for dataset in [name for name in zfs.get_properties(top, "type", recursive_depth=1 << 16) if "@" not in name]:
        snapshots = zfs.snapshots(dataset)
        where |= {s.guid: dataset[len(top) :] for s in snapshots if not is_piece(s)}
        partial = partial or positioned_token(zfs, find_transfers(snapshots, dataset))
    if partial is None:
        partial = next((NativePartial(name, text) for name, text in zfs.resume_tokens(top).items()), None)
    return TreeToken(top, root, tosnap, fromsnap, intermediates, frozenset(where), partial, where)


def forget_tree(zfs: Zfs, token: TreeToken) -> str:
    """receive -A of a tree: its record goes (the partial dataset is aborted on its own); what was done stays."""
    if zfs.exists(token.target):  # else it went with its own partial transfer
        zfs.inherit_property(token.target, TREE_PROPERTY)
    return (
        f"forgot the interrupted -R transfer of {token.root}@{token.tosnap} into {token.target}; the {len(token.have)} "
        "snapshot(s) it completed stay"
    )
