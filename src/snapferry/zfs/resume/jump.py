"""Jumping to a checkpoint: an OpenZFS source resumes at the record after it with `zfs send -t`, the prefix unread."""

from __future__ import annotations

from snapferry.core.events import PROGRESS_STEP, EventSink
from snapferry.core.process import SendProcess
from snapferry.core.streamio import Sink
from snapferry.errors import SnapferryError
from snapferry.zfs.codec.openzfs_token import OpenZfsToken
from snapferry.zfs.codec.records import HEADER_SIZE, RecordType, chained_begin_payload, record_position, unresumed_begin
from snapferry.zfs.codec.stream import Record, StampedWriter, StreamReader
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.engine.command import ZFS_TOOL, Snapshot, Zfs

# The records a kernel resume can start at: it resumes at a block of an object that exists.
JUMPABLE = frozenset({RecordType.OBJECT, RecordType.WRITE, RecordType.WRITE_EMBEDDED})
# The fingerprint is of no use on this side: starting it past any offset spares its sums.
_NO_FINGERPRINT = 1 << 63


def why_no_jump(zfs: Zfs, token: ResumeToken, source: Snapshot) -> str | None:
    """Why this resume has to re-read the stream up to the checkpoint; None when it can jump there."""
    if not token.has_position:
        return "the token names no record to resume at (made by an older snapferry, or its checkpoint has no snapferry:next)"
    if "w" in token.send_flags:
        # The receiver wants the OBJECT_RANGE in effect at the checkpoint first; only the whole stream has it.
        return "a raw (-w) stream's continuation starts with the OBJECT_RANGE before the checkpoint"
    if token.next_kind not in JUMPABLE:
        return f"the checkpoint is followed by a {_kind_name(token.next_kind)} record, where zfs send -t cannot start"
    if not zfs.is_modern(source.dataset):
        return "the zfs here has no zfs send -t"
    return None


def _kind_name(kind: int | None) -> str:
    try:
        return RecordType(kind or 0).name
    except ValueError:
        return f"type {kind}"


def kernel_token(token: ResumeToken, source: Snapshot) -> str:
    """The OpenZFS token that makes `zfs send -t` start at the token's next record (its block, for a WRITE).

    `bytes` only feeds the kernel's size estimate; the checkpoint's `end` is what the destination holds.
    """
    assert token.next_object is not None and token.next_offset is not None
    flags = set(token.send_flags)
    return OpenZfsToken(
        object=token.next_object,
        offset=0 if token.next_kind == RecordType.OBJECT else token.next_offset,
        bytes=token.offset,
        toguid=token.toguid,
        toname=source.name,
        fromguid=token.fromguid or None,
        largeblockok="L" in flags,
        embedok="e" in flags,
        compressok="c" in flags,
    ).encode()


def _resent(record: Record, token: ResumeToken) -> bool:
    """Whether the kernel sends this record again ahead of the resume point: the resumed object's OBJECT and the FREE
    of its tail (the dnode is visited again), and, when a large block was split (no -L), the parts before the offset.
    The piece chain committed all of them already."""
    if token.next_kind == RecordType.OBJECT:
        return False
    obj, offset = record_position(record.kind, record.header)
    if obj != token.next_object:
        return False
    if record.kind in (RecordType.OBJECT, RecordType.FREE):
        return True
    return record.kind in (RecordType.WRITE, RecordType.WRITE_EMBEDDED) and offset < (token.next_offset or 0)


def send_jump(zfs: Zfs, token: ResumeToken, source: Snapshot, toname: str, sink: Sink, events: EventSink) -> int | None:
    """The continuation made from the kernel's `zfs send -t` at the token's next record; None, with nothing written,
    when the kernel's stream does not start where the token says (the caller then re-reads the whole stream)."""
    proc = SendProcess(zfs.send_token_argv(kernel_token(token, source)), f"cannot resume the send of {source.name}", ZFS_TOOL)
    reader = StreamReader(proc.stdout)
    skipped = 0
    try:
        first = reader.read_begin()
        if first is None:
            failure = proc.failure()
            raise failure if isinstance(failure, SnapferryError) else SnapferryError("zfs send -t produced no stream")
        kernel_begin, kernel_bytes = first
        begin, payload = unresumed_begin(kernel_begin, kernel_bytes[HEADER_SIZE:])
        if (begin.toguid, begin.fromguid, begin.send_flags) != (token.toguid, token.fromguid, token.send_flags):
            raise SnapferryError(
                f"zfs send -t made a stream of other snapshots or flags ({begin.send_flags or 'none'}, token: {token.send_flags or 'none'})"
            )
        records = reader.records(kernel_bytes, len(kernel_bytes), _NO_FINGERPRINT)
        record = next(records)
        while record.kind != RecordType.END and _resent(record, token):
            skipped += record.size
            record = next(records)
        kind = record.kind
        obj, offset = record_position(kind, record.header)
        if (kind, obj, offset) != (token.next_kind, token.next_object, token.next_offset):
            raise SnapferryError(
                f"zfs send -t started at a {kind.name} record of object {obj} offset {offset:#x}, the checkpoint is followed by "
                f"a {_kind_name(token.next_kind)} record of object {token.next_object} offset {token.next_offset or 0:#x}"
            )
    except SnapferryError as exc:
        proc.stop()
        events("jump", taken=False, reason=str(exc))
        events("warning", message=f"no jump to the checkpoint ({exc}); re-reading the stream up to byte {token.offset} instead")
        return None
    events("jump", taken=True, object=obj, offset=offset, kind=kind.name, resent=skipped, at=token.offset)
    events("stream", toname=toname, offset=token.offset)
    writer = StampedWriter(sink)
    with proc.reading(lambda: reader.bytes_read):
        continuation = begin.derive(toguid=begin.toguid, fromguid=token.checkpoint_guid, toname=toname)
        writer.begin(continuation, chained_begin_payload(begin, payload))
        # The kernel's records from here are those of the whole stream from the checkpoint on (docs/design.md, "Jumping").
        shift = token.offset - record.offset
        next_progress = 0
        while record.kind != RecordType.END:
            writer.record(record)
            if writer.bytes_written >= next_progress:
                events("progress", bytes=writer.bytes_written, offset=record.end_offset + shift)
                next_progress = writer.bytes_written + PROGRESS_STEP
            record = next(records)
        writer.end(begin.toguid)
    events("done", bytes=writer.bytes_written, source_bytes=reader.bytes_read)
    return writer.bytes_written
