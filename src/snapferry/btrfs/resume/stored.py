"""Continuing an interrupted btrfs receive from a stored copy of its stream (an offsite backup), reading only what is missing."""

from __future__ import annotations

from collections.abc import Callable
from uuid import UUID

from snapferry.btrfs.codec.commands import Cmd
from snapferry.btrfs.codec.stream import BtrfsStreamReader, Continuation, stream_header
from snapferry.btrfs.resume.checkpoints import NIL, BtrfsToken
from snapferry.core.events import EventSink
from snapferry.core.streamio import Readable, Sink
from snapferry.errors import StaleToken, StreamFormatError

_COPY_CHUNK = 1 << 20


def send_stored_btrfs_continuation(
    token: BtrfsToken, head: Readable, rest_from: Callable[[int], Readable], sink: Sink, events: EventSink, where: str
) -> int:
    """The continuation `snapferry receive -s` takes for `token`, made from a stored btrfs stream.

    Only the stream's first command (from `head`) and its bytes from the token's offset on are read. The
    receiver checks every command's crc32c; checked here: the stream is of the token's subvolume, at its
    transid, from its parent.
    """
    reader = BtrfsStreamReader(head)
    first = next(iter(reader), None)
    if first is None or first.command.kind not in (Cmd.SUBVOL, Cmd.SNAPSHOT):
        raise StreamFormatError(f"{where} holds no btrfs stream that starts with a subvolume")
    begin = first.command
    parent = begin.clone_uuid if begin.kind == Cmd.SNAPSHOT else NIL
    if (begin.uuid.hex, begin.ctransid, parent.hex) != (token.uuid, token.ctransid, token.parent):
        raise StaleToken(
            f"the interrupted receive of {token.subvolume} is of another snapshot (uuid {UUID(token.uuid)}) than {where} "
            f"(uuid {begin.uuid}); discard it (snapferry receive -A RECEIVE_DIR/{token.subvolume}) and restore again"
        )
    events("stream", toname=token.subvolume, offset=token.offset)
    sink([Continuation(token.offset, bytes.fromhex(token.fingerprint)).encode(), stream_header(reader.version), first.header, first.body])
    rest = rest_from(token.offset)
    buffer = bytearray(_COPY_CHUNK)
    sent = 0
    while n := rest.readinto(memoryview(buffer)):
        sink([bytes(buffer[:n])])
        sent += n
        events("progress", bytes=sent, offset=token.offset + sent)
    events("done", bytes=sent)
    return sent
