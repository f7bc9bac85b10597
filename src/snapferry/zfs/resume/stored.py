"""Continuing an interrupted receive from a stored copy of its stream (an offsite backup), reading only what is missing."""

from __future__ import annotations

from collections.abc import Callable

from snapferry.core.events import EventSink
from snapferry.core.streamio import Readable, Sink
from snapferry.errors import Refused, StaleToken, StreamFormatError
from snapferry.zfs.codec.records import HEADER_SIZE, RecordType, chained_begin_payload
from snapferry.zfs.codec.stream import StampedWriter, StreamReader
from snapferry.zfs.codec.token import ResumeToken


def send_stored_continuation(
    token: ResumeToken, head: Readable, rest_from: Callable[[int], Readable], sink: Sink, events: EventSink, where: str
) -> int:
    """The continuation `snapferry receive -s` takes for `token`, made from a stored `snapferry send` stream.

    Only the stream's BEGIN (from `head`) and its bytes from the token's offset on (from `rest_from`) are read.
    The prefix's fingerprint cannot be checked without reading it; what is checked instead: the stream is the
    token's (its snapshot and base guids), the token's offset is a record boundary of it, and every record
    from there to END carries the running checksum its predecessors give (the first one's taken as the start).
    """
    found = StreamReader(head).read_begin()
    if found is None:
        raise StreamFormatError(f"{where} holds no ZFS stream")
    begin, begin_bytes = found
    if (begin.toguid, begin.fromguid) != (token.toguid, token.fromguid):
        raise StaleToken(
            f"the interrupted receive into {token.dataset} is of another snapshot (guid {token.toguid}) than {where} "
            f"(guid {begin.toguid}); discard it with: snapferry receive -A {token.dataset}"
        )
    if begin.is_raw:
        # A raw continuation must begin with the OBJECT_RANGE in effect, which only the prefix says.
        raise Refused(
            f"a raw (-w) stream cannot be continued from the middle of a stored copy: discard the partial receive with "
            f"snapferry receive -A {token.dataset} and restore again"
        )
    events("stream", toname=begin.toname, offset=token.offset)
    writer = StampedWriter(sink)
    writer.begin(
        begin.derive(toguid=begin.toguid, fromguid=token.checkpoint_guid, toname=f"{token.dataset}@{begin.snapshot_name}"),
        chained_begin_payload(begin, begin_bytes[HEADER_SIZE:]),
    )
    reader = StreamReader(rest_from(token.offset))
    for record in reader.records(begin_bytes, token.offset, token.offset, mid_stream=True):
        if record.kind == RecordType.END:
            writer.end(begin.toguid)
            break
        writer.record(record)
        events("progress", bytes=writer.bytes_written, offset=record.end_offset)
    events("done", bytes=writer.bytes_written)
    return writer.bytes_written
