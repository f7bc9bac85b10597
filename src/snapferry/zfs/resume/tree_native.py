"""Native mode for trees: each substream of a `zfs send -R` stream into its own `zfs receive -s`, with its properties as received."""

from __future__ import annotations

from dataclasses import dataclass, replace

from snapferry.core.events import PROGRESS_STEP
from snapferry.core.process import ReceiveProcess
from snapferry.errors import PartialReceiveInTheWay, Refused, SnapferryError, StreamFormatError, StreamIntegrityError, TransferInterrupted
from snapferry.zfs.codec.nvlist import NvList, NvPair, NvType
from snapferry.zfs.codec.records import Begin
from snapferry.zfs.codec.replication import FileSystem, ReplicationHeader, property_package
from snapferry.zfs.codec.stream import StreamReader
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.codec.tree_token import NativePartial, TreeToken
from snapferry.zfs.engine.command import ZFS_TOOL, Zfs
from snapferry.zfs.resume.mounts import mount_replica
from snapferry.zfs.resume.native import Mode
from snapferry.zfs.resume.tree_receiver import TREE_PROPERTY, TreeLayout, TreeReceiverBase


def choose_tree_mode(zfs: Zfs, target: str, requested: Mode | None, *, sender_can_resume: bool, tree: TreeToken | None) -> Mode:
    """The rule of `choose_mode` for a whole tree: native where the destination pool resumes in the kernel and the
    stream's sender can `zfs send -t`; an interrupted transfer of the tree keeps the mode it was begun in."""
    under_way = tree.partial if tree is not None else None
    abort = f"snapferry receive -A {tree.target}" if tree is not None else ""
    if isinstance(under_way, NativePartial):
        if requested == "pieces":
            raise Refused(
                f"the tree's interrupted receive into {under_way.dataset} is the kernel's (native mode), which pieces mode "
                f"cannot continue: drop --mode pieces, or discard it with: {abort}"
            )
        return "native"
    if isinstance(under_way, ResumeToken):
        if requested == "native":
            raise Refused(
                f"the tree's interrupted transfer into {under_way.dataset} is a piece chain, which native mode cannot "
                f"continue: drop --mode native, or discard it with: {abort}"
            )
        return "pieces"
    if requested == "pieces":
        return "pieces"
    native = zfs.native_resume(target)
    if requested == "native":
        if not native:
            raise Refused(
                f"native resume is not available on pool {target.split('/', 1)[0]}: it needs OpenZFS 0.7 or later with the "
                "extensible_dataset feature; use --mode pieces"
            )
        if not sender_can_resume:
            raise Refused("this -R stream comes from a zfs that cannot resume a send (no zfs send -t, e.g. zfs-fuse): use --mode pieces")
        return "native"
    return "native" if native and sender_can_resume else "pieces"


def _with_tree_state(filesystem: FileSystem, state: str | None) -> FileSystem:
    """The file system's header entry with the tree's state among its properties (or, with None, without any)."""
    props_pair = filesystem.nvlist.get("props")
    old = props_pair.value if props_pair is not None and isinstance(props_pair.value, NvList) else NvList()
    pairs = tuple(p for p in old if p.name != TREE_PROPERTY)
    if state is not None:
        pairs += (NvPair(TREE_PROPERTY, NvType.STRING, state),)
    props = NvPair("props", NvType.NVLIST, NvList(pairs, old.nvflag))
    others = tuple(p for p in filesystem.nvlist if p.name != "props")
    return replace(filesystem, nvlist=NvList((*others, props), filesystem.nvlist.nvflag))


class _ReceiverFailed(Exception):
    """zfs receive's own failure, carried past the handlers meant for the input's."""

    def __init__(self, error: SnapferryError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class NativeTreeReceiver(TreeReceiverBase):
    """Receives a compound stream natively: each substream, wrapped as a one-file-system `zfs send -p` package, goes to
    `zfs receive -s` of the dataset the layout gives, so a cut leaves the kernel's own partial state in that dataset.

    The tree's state (TREE_PROPERTY) must be on the top dataset from the moment anything of the tree exists, even when
    the very first substream is cut by a SIGKILL: a new top gets it as a *received* property in its first package (the
    kernel sets a package's properties when the receive begins, so a cut partial dataset already carries it), and in
    every later one; an existing top gets it with `zfs set` before its receive starts (a local value wins over the
    received one). At the final END `zfs inherit` takes it away.
    """

    _top_exists: bool = False

    def _substreams(self, reader: StreamReader, header: ReplicationHeader, layout: TreeLayout, top: str, tosnap: str) -> None:
        self._top_exists = self.zfs.exists(top)
        super()._substreams(reader, header, layout, top, tosnap)

    def _finished(self, top: str) -> None:
        if self.mount:
            mount_replica(self.zfs, top, self.events)

    def _package(self, sub: Begin, into: str, filesystem: FileSystem | None, top: str) -> tuple[bytes, bytes]:
        """The records around the substream that make zfs receive set its properties as received (-x and -o names left
        out); none for a substream the header does not describe."""
        if filesystem is None:
            return b"", b""
        # Every package into the top carries the state: a completed package's received properties replace the
        # dataset's (seen in the VM), so one without it would take it away while the tree is unfinished.
        state = self._state_text() if into == top else None
        if state is not None and not self._top_exists:
            self._recorded = state
        leave_out = {*self.exclude_props, *(name for name, _ in self.set_props)} - {TREE_PROPERTY}
        return property_package(_with_tree_state(filesystem, state), sub.toname, sub.toguid, leave_out=leave_out)

    def _receive_one(self, reader: StreamReader, sub: Begin, sub_bytes: bytes, into: str, filesystem: FileSystem | None, top: str) -> None:
        if self._top_exists:
            self._record_state(top)
        before, after = self._package(sub, into, filesystem, top)
        argv = self.zfs.receive_argv(into, force=self.force, resumable=True, unmounted=True)
        self.events("stream", dataset=into, toname=sub.toname, offset=0, mode="native", resuming=sub.is_resuming)
        proc = ReceiveProcess(argv, f"cannot receive into {into}", ZFS_TOOL)

        def feed(parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
            try:
                proc.write(parts)
            except SnapferryError as exc:
                raise _ReceiverFailed(exc) from None

        next_progress = 0
        try:
            try:
                feed((before, sub_bytes))
                # The kernel checks every record's checksum itself: the stamps are trusted here, as in pieces mode.
                for record in reader.records_trusting_stamps(sub_bytes, len(sub_bytes), len(sub_bytes)):
                    feed((record.header, record.payload) if len(record.payload) else (record.header,))
                    if reader.bytes_read >= next_progress:
                        self.events("progress", bytes=reader.bytes_read)
                        next_progress = reader.bytes_read + PROGRESS_STEP
                feed((after,))
            except _ReceiverFailed as failed:
                raise failed.error from None
            except (TransferInterrupted, StreamIntegrityError, StreamFormatError, KeyboardInterrupt) as exc:
                raise self._cut(proc, exc, sub, into) from None
            proc.finish()
        except PartialReceiveInTheWay:
            raise Refused(
                f"{into} holds an interrupted receive (the kernel's); this stream cannot start another there: "
                f"{self._tree_hint()}, or discard it with: snapferry receive -A {self.target}"
            ) from None
        self.received.append(f"{into}@{sub.snapshot_name}")
        self.events("done", dataset=into, snapshot=sub.snapshot_name, bytes=reader.bytes_read)
        self._top_exists = True

    def _cut(self, proc: ReceiveProcess, exc: BaseException, sub: Begin, into: str) -> SnapferryError:
        """The input stopped (or went bad) inside a substream: zfs receive -s, its input closed, keeps what arrived."""
        try:
            proc.finish()
            kept = f"zfs receive ended without its END: {into} may hold nothing of {sub.toname}"
        except TransferInterrupted as said:
            kept = f"the kernel keeps what arrived of {sub.toname} in {into}" if "kernel kept" in str(said) else str(said)
        except SnapferryError as said:
            kept = f"nothing of {sub.toname} was kept ({said})"
        done = f"{len(self.received)} snapshot(s) received in this run"
        what = str(exc) or "interrupted"
        if isinstance(exc, StreamIntegrityError):
            return StreamIntegrityError(f"{what}; {kept}; {done}; {self._tree_hint()}", exc.verified_to)
        if isinstance(exc, StreamFormatError):
            return StreamFormatError(f"{what}; {kept}; {done}")
        return TransferInterrupted(f"{what}; {kept}; {done}; {self._tree_hint()}")
