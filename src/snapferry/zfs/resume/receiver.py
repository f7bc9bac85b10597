"""The piece-chain receiver: cuts a ZFS stream into checkpointed pieces applied by real `zfs receive`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from snapferry.core import hints
from snapferry.core.events import PROGRESS_STEP, EventSink, ignore_events
from snapferry.core.process import ReceiveProcess
from snapferry.core.splice import SpliceRing
from snapferry.core.streamio import Readable
from snapferry.errors import Refused, SnapferryError, StreamFormatError, StreamIntegrityError, TransferInterrupted, ZfsCommandError
from snapferry.zfs.codec.records import HEADER_SIZE, Begin, RecordType, chained_begin_payload, record_position
from snapferry.zfs.codec.stream import Record, StampedWriter, StreamReader, fingerprint_digest
from snapferry.zfs.engine.command import ZFS_TOOL, Snapshot, Zfs
from snapferry.zfs.resume.checkpoints import (
    MAX_CHECKPOINT_NAME,
    NEXT_PROPERTY,
    Transfer,
    checkpoint_name,
    next_record_value,
    open_name,
    read_next_record,
    read_transfers,
)
from snapferry.zfs.resume.cleanup import discard_transfer, remove_finished_pieces
from snapferry.zfs.resume.mounts import mount_replica

MAX_DATASET_NAME = 255
NOTHING_KEPT = "no checkpoint was committed, so nothing is kept; send the stream again"

# The records that make a piece's stream (given its BEGIN) a one-file-system package, before and after it: zfs
# receive then sets the source's properties as received (replication.property_package).
Package = Callable[[Begin], tuple[bytes, bytes]]


def resume_hint(dataset: str) -> str:
    return hints.resume_hint(dataset, dataset)


@dataclass
class _Position:
    """Where the chain stands: the next piece's number, base guid and start in the original stream."""

    # The transfer's own base (0 for a full stream); a continuation's BEGIN names a checkpoint instead.
    transfer_fromguid: int
    seq: int
    base_guid: int
    first_offset: int
    fingerprint_from: int
    force: bool
    unmounted: bool = False
    # A continuation's first record (at fingerprint_from) as the last checkpoint recorded it: (type, object, offset).
    expect_first: tuple[int, int, int] | None = None


class _Piece:
    """One piece in flight: a `zfs receive` fed with a BEGIN of our own and the stream's records."""

    def __init__(
        self,
        zfs: Zfs,
        dataset: str,
        begin: Begin,
        begin_payload: bytes,
        force: bool,
        unmounted: bool,
        package: Package | None = None,
        ring: SpliceRing | None = None,
    ) -> None:
        """`ring`: the reader's, whose records are then handed to zfs receive by reference."""
        self.begin = begin
        self._zfs = zfs
        self._dataset = dataset
        self.size = 0
        self.start: int | None = None
        argv = zfs.receive_argv(dataset, force=force, unmounted=unmounted)
        self._proc = ReceiveProcess(argv, f"cannot receive into {dataset}", ZFS_TOOL)
        self._package_end = b""
        if package is not None:
            before, self._package_end = package(begin)
            self._proc.write([before])
        proc = self._proc
        self._writer = StampedWriter(proc.write, None if ring is None else lambda start, size: proc.splice(ring, start, size))
        self._writer.begin(begin, begin_payload)

    def write(self, record: Record) -> None:
        if self.start is None:
            self.start = record.offset
        # The context manager's checks inline: a generator per record is a good part of the loop's Python.
        try:
            self._writer.record(record)
        except ZfsCommandError as exc:
            raise self._corruption_or(exc) from None
        self.size += record.size

    def commit(self) -> str:
        """Returns what zfs receive printed although it succeeded (its warnings)."""
        with self._corruption_found_by_zfs():
            self._writer.end(self.begin.toguid)
            if self._package_end:
                self._proc.write([self._package_end])
            try:
                self._proc.finish()
            except ZfsCommandError as exc:
                if not self._committed_anyway(str(exc)):
                    raise
                return str(exc)
        return self._proc.said

    def _committed_anyway(self, message: str) -> bool:
        """Whether zfs receive failed only after it had committed the piece's snapshot:
        - it says "cannot mount" only after it has received; a full parent or quota can keep it from making the
          mountpoint (found by the chaos runner);
        - zfs-fuse can answer "I/O error" after committing, when taking the mounted file system down and up around
          the commit fails (docs/RELIABILITY.md).
        Either way the snapshot exists with the piece's guid, and what is left to do is the receiver's own."""
        said = message.partition(": ")[2]
        if said.startswith("cannot mount '") and "cannot receive" not in said:
            return self._zfs.exists(f"{self._dataset}@{self.begin.snapshot_name}")
        if said.endswith(": I/O error"):
            return any(s.guid == self.begin.toguid for s in self._zfs.snapshots(self._dataset))
        return False

    @contextmanager
    def _corruption_found_by_zfs(self) -> Iterator[None]:
        """OpenZFS checks each record's stamp: a mismatch there means the bytes of this piece were
        damaged on the way (everything before the piece was committed, so checked, already)."""
        try:
            yield
        except ZfsCommandError as exc:
            raise self._corruption_or(exc) from None

    def _corruption_or(self, exc: ZfsCommandError) -> SnapferryError:
        """`exc` as the corruption it reports, or itself."""
        if "checksum mismatch" not in str(exc):
            return exc
        start = self.start or 0
        return StreamIntegrityError(f"{exc} (the stream was corrupted in transit after stream byte {start})", start)

    def abort(self) -> None:
        self._proc.abort()


# OpenZFS checks each OBJECT record of a raw stream against the OBJECT_RANGE before it in the same
# `zfs receive`. So a piece that starts inside a range starts with a copy of that range's record
# (applying it twice is harmless), and a raw stream is only cut once a range has been seen, so that
# a continuation can always start with one: its sender puts the range in effect at the checkpoint
# before the checkpoint's record.


class PieceReceiver:
    """Receives streams into one dataset, committing a checkpoint snapshot every `checkpoint_size` bytes."""

    def __init__(
        self,
        zfs: Zfs,
        dataset: str,
        *,
        checkpoint_size: int,
        force: bool = False,
        events: EventSink = ignore_events,
        modern_zfs: bool = False,
        mount: bool = True,
        on_checkpoint: Callable[[], None] | None = None,
        package: Package | None = None,
        ring: SpliceRing | None = None,
    ) -> None:
        """`modern_zfs`: the destination runs OpenZFS 0.7+, which verifies every record's stamp (so
        payload checksums can come from the stream's own stamps instead of being summed here) and
        can receive without mounting (which 2.1 otherwise tries, and fails, between pieces).
        `mount`: mount the completed dataset (receive -u: leave it unmounted). `on_checkpoint` runs
        after each checkpoint is named (a tree receive records the tree's state there once it exists). `package`
        wraps the first piece of a new dataset (so its data is written with the properties, as zfs receive does) and
        the last piece of each snapshot (which also sets the snapshot's own properties). `ring`: the one the reader
        given to receive_substream() reads into, if not receive()'s own."""
        if "@" in dataset:
            raise Refused(f"receive into a file system, not a snapshot: {dataset}")
        if len(dataset) + 1 + MAX_CHECKPOINT_NAME > MAX_DATASET_NAME:
            raise Refused(f"destination name too long to hold checkpoint snapshots: {dataset}")
        self.zfs = zfs
        self.dataset = dataset
        self.checkpoint_size = checkpoint_size
        self.force = force
        self.events = events
        self.modern_zfs = modern_zfs
        self.mount = mount
        self.on_checkpoint = on_checkpoint
        self.package = package
        self.received: list[str] = []
        # What records are read into and handed to each piece's zfs receive from, without a copy.
        self.ring = ring or SpliceRing()

    def receive(self, source: Readable) -> list[str]:
        """Apply every substream in `source`; returns the names of the completed snapshots."""
        reader = StreamReader(source, self.ring)
        while (first := reader.read_begin()) is not None:
            begin, begin_bytes = first
            self.receive_substream(reader, begin, begin_bytes)
        if not self.received:
            raise StreamFormatError("no ZFS stream on input (it was empty)")
        return self.received

    def _plan(self, begin: Begin, begin_bytes: bytes) -> _Position:
        """Decide from the destination's state whether this stream starts or continues a transfer."""
        if begin.is_resuming:
            raise StreamFormatError("this is an OpenZFS resume stream (zfs send -t): receive it with --mode native")
        snapshots, transfers = read_transfers(self.zfs, self.dataset)
        for transfer in transfers:
            if transfer.complete:
                remove_finished_pieces(self.zfs, transfer)
        unfinished = [t for t in transfers if not t.complete]
        for transfer in unfinished:
            for checkpoint in transfer.checkpoints:
                if checkpoint.snapshot.guid == begin.fromguid:
                    return self._continue(transfer, checkpoint.seq, begin)
        if begin.is_incremental and all(s.guid != begin.fromguid for s in snapshots):
            raise Refused(
                f"{self.dataset} does not have this stream's base snapshot (guid {begin.fromguid}); if it continues "
                f"a transfer into {begin.toname.partition('@')[0]}, its token belongs there, not here"
            )
        for transfer in unfinished:
            if not transfer.checkpoints:
                # A piece committed but never named as a checkpoint holds no resumable position.
                self.events("discard", reason="uncommitted piece", dataset=self.dataset, target=self.dataset)
                discard_transfer(self.zfs, transfer, snapshots)
                snapshots, _ = read_transfers(self.zfs, self.dataset)
                continue
            raise self._refuse_second_transfer(transfer, begin)
        return self._start(begin, begin_bytes, snapshots)

    def _refuse_second_transfer(self, transfer: Transfer, begin: Begin) -> Refused:
        assert transfer.last is not None
        done = f"{transfer.last.end} bytes in {len(transfer.checkpoints)} checkpoints"
        if transfer.toguid == begin.toguid:
            return Refused(
                f"{self.dataset} already holds an interrupted transfer of {begin.toname} ({done}); "
                f"{resume_hint(self.dataset)}, or discard it with: snapferry receive -A {self.dataset}"
            )
        return Refused(
            f"{self.dataset} holds an interrupted transfer of another snapshot (guid {transfer.toguid}, {done}); "
            f"finish it, or discard it with: snapferry receive -A {self.dataset}"
        )

    def _continue(self, transfer: Transfer, seq: int, begin: Begin) -> _Position:
        last = transfer.last
        assert last is not None
        if begin.toguid != transfer.toguid:
            raise Refused(
                f"this stream continues checkpoint {seq} of {self.dataset} but with another snapshot "
                f"(guid {begin.toguid}, expected {transfer.toguid}): the token is stale"
            )
        if seq != last.seq:
            raise Refused(
                f"stale token: {self.dataset} has moved past this token (it has reached checkpoint {last.seq}, the token continues "
                f"checkpoint {seq}); get a fresh one with: snapferry token {self.dataset}"
            )
        if transfer.open_pieces:
            # A piece committed after the last checkpoint but never renamed: its end is unknown.
            self.zfs.rollback(last.snapshot.name)
        self.events("resume", dataset=self.dataset, offset=last.end, seq=last.seq)
        # A raw continuation starts with a copy of the OBJECT_RANGE in effect, placed just before `end`.
        first = last.end - HEADER_SIZE if begin.is_raw else last.end
        expect = read_next_record(self.zfs, last.snapshot.name)
        return _Position(transfer.fromguid, last.seq + 1, last.snapshot.guid, first, last.end, force=True, expect_first=expect)

    def _start(self, begin: Begin, begin_bytes: bytes, snapshots: list[Snapshot]) -> _Position:
        if any(s.guid == begin.toguid for s in snapshots):
            raise Refused(f"{self.dataset} already has this snapshot ({begin.snapshot_name}, guid {begin.toguid})")
        # An incremental's base was checked by the caller; a full stream needs a new dataset.
        if not begin.is_incremental and (snapshots or self.zfs.exists(self.dataset)):
            raise Refused(f"{self.dataset} exists: a full stream needs a new dataset (destroy it, or receive into another name)")
        first = len(begin_bytes)
        return _Position(begin.fromguid, 0, begin.fromguid, first, first, force=self.force)

    def _open_piece(self, begin: Begin, begin_payload: bytes, pos: _Position, final: bool) -> _Piece:
        if final:
            piece_begin = begin.derive(toguid=begin.toguid, fromguid=pos.base_guid, toname=begin.toname)
        else:
            # os.urandom, as secrets does, without the hmac/_hashlib import every verb would pay at start-up.
            guid = int.from_bytes(os.urandom(8), "little") or 1
            name = open_name(begin.toguid, pos.transfer_fromguid, pos.seq)
            # `zfs receive DST` takes only the part after '@'; DST's own name is known to fit.
            piece_begin = begin.derive(toguid=guid, fromguid=pos.base_guid, toname=f"{self.dataset}@{name}")
        if pos.base_guid != pos.transfer_fromguid:
            begin_payload = chained_begin_payload(begin, begin_payload)
        makes_dataset = pos.seq == 0 and not pos.transfer_fromguid
        package = self.package if final or makes_dataset else None
        return _Piece(self.zfs, self.dataset, piece_begin, begin_payload, pos.force, self.modern_zfs, package, self.ring)

    def _warn(self, said: str) -> None:
        for line in said.splitlines():
            if line.strip():
                self.events("warning", message=f"{self.dataset}: zfs receive: {line.strip()}")

    def _commit(self, piece: _Piece, begin: Begin, pos: _Position, boundary: Record) -> None:
        """Commit a piece and name it as a checkpoint ending right before `boundary`."""
        self._warn(piece.commit())
        name = checkpoint_name(
            begin.toguid,
            pos.transfer_fromguid,
            pos.seq,
            boundary.offset,
            pos.fingerprint_from,
            fingerprint_digest(boundary.fingerprint),
            begin.send_flags,
        )
        self.zfs.rename(f"{self.dataset}@{piece.begin.snapshot_name}", f"{self.dataset}@{name}")
        self.events("checkpoint", dataset=self.dataset, seq=pos.seq, offset=boundary.offset, piece_bytes=piece.size)
        if begin.sender_can_resume and boundary.kind != RecordType.END:
            self._record_next(f"{self.dataset}@{name}", boundary)
        if self.on_checkpoint is not None:
            self.on_checkpoint()
        if not pos.unmounted:
            # A partial dataset can name objects that have not arrived yet, and zfs-fuse hangs the reader of such a
            # directory for good: it stays unmounted until the transfer completes.
            self._unmount()
            pos.unmounted = True
        pos.seq += 1
        pos.base_guid = piece.begin.toguid
        pos.force = True

    def _check_first(self, record: Record, expected: tuple[int, int, int]) -> None:
        """A continuation made by a jump (jump.py) is only as right as its token's position: it must start with the
        record this checkpoint was cut before, or it would skip or repeat part of the stream."""
        found = (record.kind, *record_position(record.kind, record.header))
        if found != expected:
            kind = RecordType(expected[0]).name if expected[0] in RecordType._value2member_map_ else str(expected[0])
            raise Refused(
                f"this continuation starts with a {record.kind.name} record of object {found[1]} offset {found[2]:#x}, but the "
                f"checkpoint is followed by a {kind} record of object {expected[1]} offset {expected[2]:#x}: its token was altered; "
                f"get a fresh one with: snapferry token {self.dataset}"
            )

    def _record_next(self, checkpoint: str, boundary: Record) -> None:
        """Name on the checkpoint the record the next piece starts with, so that an OpenZFS source can resume
        there with `zfs send -t` (docs/design.md, "Jumping"). Without it a resume re-reads the prefix: no harm."""
        value = next_record_value(boundary.kind, *record_position(boundary.kind, boundary.header))
        try:
            self.zfs.set_property(checkpoint, NEXT_PROPERTY, value)
        except SnapferryError as exc:
            self.events("warning", message=f"{exc}; a resume from this checkpoint re-reads the stream up to it")

    def receive_substream(self, reader: StreamReader, begin: Begin, begin_bytes: bytes) -> None:
        """One substream (its BEGIN already read) into the dataset, checkpointing as it goes."""
        pos = self._plan(begin, begin_bytes)
        start_seq = pos.seq
        payload = begin_bytes[HEADER_SIZE:]
        self.events("stream", dataset=self.dataset, toname=begin.toname, offset=pos.first_offset)
        piece: _Piece | None = None
        object_range: Record | None = None
        next_progress = 0
        try:
            read = reader.records_trusting_stamps if self.modern_zfs else reader.records
            for record in read(begin_bytes, pos.first_offset, pos.fingerprint_from):
                if record.kind == RecordType.END:
                    if piece is not None:
                        self._commit(piece, begin, pos, record)
                        piece = None
                    break
                if begin.is_raw and record.offset < pos.fingerprint_from and record.kind != RecordType.OBJECT_RANGE:
                    raise StreamFormatError("this continuation of a raw stream does not start with its OBJECT_RANGE record")
                if pos.expect_first is not None and record.offset == pos.fingerprint_from:
                    self._check_first(record, pos.expect_first)
                    pos.expect_first = None
                can_cut = not begin.is_raw or object_range is not None
                if piece is not None and piece.size and piece.size + record.size > self.checkpoint_size and can_cut:
                    self._commit(piece, begin, pos, record)
                    piece = None
                if piece is None:
                    piece = self._open_piece(begin, payload, pos, final=False)
                    if object_range is not None and record.kind != RecordType.OBJECT_RANGE:
                        piece.write(object_range)
                piece.write(record)
                if record.kind == RecordType.OBJECT_RANGE:
                    object_range = record.kept()
                if reader.bytes_read >= next_progress:
                    self.events("progress", bytes=reader.bytes_read)
                    next_progress = reader.bytes_read + PROGRESS_STEP
            self._warn(self._open_piece(begin, payload, pos, final=True).commit())
        except StreamIntegrityError as exc:
            if piece is not None:
                piece.abort()
            raise self._after_corruption(exc, begin, start_seq, pos.seq) from None
        except (SnapferryError, KeyboardInterrupt) as exc:
            if piece is not None:
                piece.abort()
            if isinstance(exc, KeyboardInterrupt):
                raise TransferInterrupted(f"interrupted; {self._progress_note(pos, start_seq)}") from None
            if isinstance(exc, TransferInterrupted):
                raise type(exc)(f"{exc}; {self._progress_note(pos, start_seq)}") from None
            raise
        try:
            _, transfers = read_transfers(self.zfs, self.dataset)
            for transfer in transfers:
                if transfer.toguid == begin.toguid:
                    remove_finished_pieces(self.zfs, transfer)
        except SnapferryError as exc:
            # The snapshot is complete; leftover checkpoints are only clutter, removed next time.
            self.events("warning", message=f"{exc}; remove the leftover checkpoints with: snapferry receive -A {self.dataset}")
        if self.mount:
            mount_replica(self.zfs, self.dataset, self.events)
        elif self.package is not None and not self.modern_zfs:
            self._unmount()  # zfs-fuse's zfs receive has no -u, and mounts what a package brings
        self.received.append(f"{self.dataset}@{begin.snapshot_name}")
        self.events("done", dataset=self.dataset, snapshot=begin.snapshot_name, bytes=reader.bytes_read)

    def _unmount(self) -> None:
        try:
            if self.zfs.is_mounted(self.dataset):
                self.zfs.unmount(self.dataset)
        except SnapferryError as exc:
            self.events("warning", message=f"{exc}; {self.dataset} stays mounted")

    def _progress_note(self, pos: _Position, start_seq: int) -> str:
        committed = pos.seq - start_seq
        if pos.seq == 0:
            return NOTHING_KEPT
        return f"{committed} checkpoint(s) committed in this run, {pos.seq} in all; {resume_hint(self.dataset)}"

    def _after_corruption(self, exc: StreamIntegrityError, begin: Begin, start_seq: int, seq: int) -> StreamIntegrityError:
        """Keep the checkpoints whose bytes were all verified; drop the rest (a stream without
        per-record checksums is only verified at its END)."""
        if seq == start_seq:
            return StreamIntegrityError(f"{exc}; nothing from this stream was committed", exc.verified_to)
        snapshots, transfers = read_transfers(self.zfs, self.dataset)
        transfer = next(t for t in transfers if t.toguid == begin.toguid)
        keep = [c for c in transfer.checkpoints if c.seq < start_seq or c.end <= exc.verified_to]
        dropped = len(transfer.checkpoints) - len(keep)
        if not dropped:
            kept = f"the {len(keep)} checkpoint(s) before it are intact; {resume_hint(self.dataset)}"
        elif keep:
            self.zfs.rollback(keep[-1].snapshot.name)
            kept = f"{dropped} unverified checkpoint(s) rolled back to checkpoint {keep[-1].seq}; {resume_hint(self.dataset)}"
        else:
            discard_transfer(self.zfs, transfer, snapshots)
            kept = f"its {dropped} unverified checkpoint(s) were discarded with the partial transfer; send it again"
        return StreamIntegrityError(f"{exc}; {kept}", exc.verified_to)
