"""The sending side: `zfs send` re-stamped with per-record checksums, and continuations from a token."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from snapferry.core.events import PROGRESS_STEP, EventSink, ignore_events
from snapferry.core.process import SendProcess
from snapferry.core.splice import SpliceRing, splice_output
from snapferry.core.streamio import Sink
from snapferry.errors import Refused, StaleToken, StreamFormatError
from snapferry.zfs.codec.records import HEADER_SIZE, Begin, RecordType, chained_begin_payload
from snapferry.zfs.codec.stream import NO_FINGERPRINT, Record, StampedWriter, StreamReader, fingerprint_digest
from snapferry.zfs.codec.token import ResumeToken
from snapferry.zfs.engine.command import ZFS_TOOL, Snapshot, Zfs
from snapferry.zfs.resume.checkpoints import is_piece
from snapferry.zfs.resume.jump import send_jump, why_no_jump


@contextmanager
def zfs_send(
    zfs: Zfs, snapshot: str, base: str | None, flags: Sequence[str] = (), ring: SpliceRing | None = None
) -> Iterator[tuple[StreamReader, Begin, bytes]]:
    """Run `zfs send` and read its BEGIN; the caller reads the records up to END (into `ring`, if given)."""
    proc = SendProcess(zfs.send_argv(snapshot, incremental_from=base, flags=flags), f"cannot send {snapshot}", ZFS_TOOL)
    reader = StreamReader(proc.stdout, ring)
    with proc.reading(lambda: reader.bytes_read):
        first = reader.read_begin()
        if first is None:
            proc.check()
            raise StreamFormatError(f"zfs send produced no stream for {snapshot}")
        yield reader, first[0], first[1]


def _intermediates(zfs: Zfs, base: str, snapshot: str) -> list[str]:
    """base, every snapshot between, and snapshot, oldest first (what zfs send -I covers)."""
    dataset = snapshot.partition("@")[0]
    names = [s.name for s in zfs.snapshots(dataset) if not is_piece(s)]
    for name in (base, snapshot):
        if name not in names:
            raise Refused(f"no snapshot {name} in {dataset}")
    first, last = names.index(base), names.index(snapshot)
    if first >= last:
        raise Refused(f"{base} is not an earlier snapshot of {dataset} than {snapshot}")
    return names[first : last + 1]


def send_snapshot(
    zfs: Zfs,
    snapshot: str,
    sink: Sink,
    *,
    base: str | None = None,
    intermediates: bool = False,
    events: EventSink = ignore_events,
    estimate: int | None = None,
    flags: Sequence[str] = (),
) -> int:
    """Send a snapshot (or incrementals) with every record's running checksum filled in.

    `-I` is sent as one plain incremental per snapshot pair, concatenated: some zfs versions
    wrap -I in a compound stream, which needs no such wrapping to be received in order.
    """
    if base and intermediates:
        chain = _intermediates(zfs, base, snapshot)
        pairs: list[tuple[str | None, str]] = list(zip(chain, chain[1:], strict=False))
    else:
        pairs = [(base, snapshot)]
    written = 0
    for pair_base, pair_snapshot in pairs:
        written += send_one(zfs, pair_snapshot, pair_base, flags, sink, written, events, estimate if not written else None)
    events("done", bytes=written)
    return written


def send_one(
    zfs: Zfs, snapshot: str, base: str | None, flags: Sequence[str], sink: Sink, before: int, events: EventSink, estimate: int | None
) -> int:
    ring, splice = splice_output(sink)
    with zfs_send(zfs, snapshot, base, flags, ring) as (reader, begin, begin_bytes):
        events("stream", toname=begin.toname, offset=0, estimate=estimate)
        writer = StampedWriter(sink, splice)
        writer.begin(begin, begin_bytes[HEADER_SIZE:])
        next_progress = 0
        for record in reader.records(begin_bytes, len(begin_bytes), NO_FINGERPRINT):
            if record.kind == RecordType.END:
                writer.end(begin.toguid)
                break
            writer.record(record)
            if writer.bytes_written >= next_progress:
                events("progress", bytes=before + writer.bytes_written)
                next_progress = writer.bytes_written + PROGRESS_STEP
    return writer.bytes_written


def _find_by_guid(snapshots: list[Snapshot], guid: int) -> Snapshot | None:
    return next((s for s in snapshots if s.guid == guid), None)


def send_continuation(
    zfs: Zfs,
    token: ResumeToken,
    sink: Sink,
    *,
    events: EventSink = ignore_events,
    visible: Callable[[str], bool] = lambda dataset: True,
    named_as_source: bool = False,
) -> int:
    """Send the rest: from the checkpoint's next record with `zfs send -t` where the source can (jump.py), else by
    regenerating the source stream and checking its prefix against the token.

    The output is an incremental stream from the token's checkpoint snapshot to the source
    snapshot, so `snapferry receive -s` continues the chain and plain `zfs receive` accepts it.
    `named_as_source`: its BEGIN names the source snapshot (inside a -R stream, whose receiver maps
    source names to its own) instead of the destination's.
    """
    # `visible` narrows the search for a restricted ssh key (snapferry serve --allow).
    snapshots = [s for s in zfs.all_snapshots() if visible(s.dataset)]
    source = _find_by_guid(snapshots, token.toguid)
    if source is None:
        raise StaleToken(
            f"stale token: the source snapshot (guid {token.toguid}) no longer exists here (destroyed, or replaced "
            f"by one of the same name); discard the partial transfer with: snapferry receive -A {token.dataset}"
        )
    base: Snapshot | None = None
    if token.fromguid:
        base = _find_by_guid([s for s in snapshots if s.dataset == source.dataset], token.fromguid)
        if base is None:
            raise StaleToken(
                f"stale token: the base snapshot of this incremental (guid {token.fromguid}) no longer exists "
                f"in {source.dataset}; discard the partial transfer with: snapferry receive -A {token.dataset}"
            )
    fs = source.dataset if named_as_source else token.dataset
    reason = why_no_jump(zfs, token, source)
    if reason is None:
        jumped = send_jump(zfs, token, source, f"{fs}@{source.short_name}", sink, events)
        if jumped is not None:
            return jumped
    else:
        events("jump", taken=False, reason=reason)
    flags = [f"-{letter}" for letter in token.send_flags]
    ring, splice = splice_output(sink)
    with zfs_send(zfs, source.name, base.name if base else None, flags, ring) as (reader, begin, begin_bytes):
        if begin.toguid != token.toguid or begin.fromguid != token.fromguid:
            raise StaleToken(f"stale token: zfs send {source.name} produced a stream of other snapshots")
        events("stream", toname=begin.toname, offset=token.offset)
        records = reader.records(begin_bytes, len(begin_bytes), token.fingerprint_from)
        writer: StampedWriter | None = None
        next_skip = next_progress = 0
        object_range: Record | None = None
        for record in records:
            if writer is None:
                if record.offset < token.offset and record.kind != RecordType.END:
                    if record.kind == RecordType.OBJECT_RANGE:
                        object_range = record
                    if record.end_offset >= next_skip or record.end_offset == token.offset:
                        events("skip", bytes=record.end_offset, total=token.offset)
                        next_skip = record.end_offset + PROGRESS_STEP
                    continue
                if record.offset != token.offset:
                    raise StaleToken(
                        f"stale token: its checkpoint (stream byte {token.offset}) is not a record boundary of the "
                        f"stream {source.name} produces now, so the source stream changed; discard the partial "
                        f"transfer with: snapferry receive -A {token.dataset}"
                    )
                if fingerprint_digest(record.fingerprint) != token.fingerprint:
                    raise StaleToken(
                        f"stale token: the stream {source.name} produces now differs from the one received up to "
                        f"byte {token.offset} (fingerprint {fingerprint_digest(record.fingerprint)}, token says "
                        f"{token.fingerprint}); discard the partial transfer with: snapferry receive -A {token.dataset}"
                    )
                writer = StampedWriter(sink, splice)
                writer.begin(
                    begin.derive(toguid=begin.toguid, fromguid=token.checkpoint_guid, toname=f"{fs}@{begin.snapshot_name}"),
                    chained_begin_payload(begin, begin_bytes[HEADER_SIZE:]),
                )
                if begin.is_raw:
                    # The receiver expects the OBJECT_RANGE in effect at the checkpoint first (see receiver).
                    if object_range is None:
                        raise StaleToken(f"stale token: the raw stream {source.name} has no OBJECT_RANGE before the checkpoint")
                    writer.record(object_range)
            if record.kind == RecordType.END:
                writer.end(begin.toguid)
                break
            writer.record(record)
            if writer.bytes_written >= next_progress:
                events("progress", bytes=writer.bytes_written, offset=record.end_offset)
                next_progress = writer.bytes_written + PROGRESS_STEP
        source_bytes = reader.bytes_read
    assert writer is not None
    events("done", bytes=writer.bytes_written, source_bytes=source_bytes)
    return writer.bytes_written
