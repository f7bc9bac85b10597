"""The btrfs sending side: `btrfs send` checked command by command, and continuations from a btrfs token."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from snapferry.btrfs.codec.commands import Cmd
from snapferry.btrfs.codec.stream import BtrfsStreamReader, Continuation, StreamCommand, skip_applied, stream_header
from snapferry.btrfs.engine.command import BTRFS_TOOL, Subvolume, send_argv, subvolume_at, subvolumes_in
from snapferry.btrfs.resume.checkpoints import NIL, BtrfsToken
from snapferry.core.events import EventSink, ignore_events
from snapferry.core.process import SendProcess
from snapferry.core.streamio import Sink, pass_on
from snapferry.errors import DatasetMissing, PrefixMismatch, Refused, SnapferryError, StaleToken, StreamFormatError

_COPY_CHUNK = 1 << 20
# btrfs send cuts file data into WRITE commands of at most BTRFS_SEND_READ_SIZE bytes; each costs a
# header, a path, an offset and a data attribute besides the data.
_SEND_READ_SIZE = 48 << 10
_WRITE_OVERHEAD = 10 + 4 + 12 + 4


@dataclass(frozen=True)
class BtrfsSendOptions:
    """What `btrfs send` is asked for besides the snapshot: all of it shapes the stream, so a resume must repeat it."""

    parent: Path | None = None
    clones: tuple[Path, ...] = ()
    proto: int | None = None
    compressed: bool = False
    estimate: bool = False  # estimate the stream's size on the side (a --no-data send) for the progress bar's ETA


@dataclass
class _Sending:
    """A running `btrfs send` whose first command has been read and checked."""

    reader: BtrfsStreamReader
    first: StreamCommand
    commands: Iterator[StreamCommand]
    output: io.BufferedReader

    def copy_rest(self, sink: Sink, events: EventSink) -> int:
        """Pass the rest of the output on as it is, in big pieces; the bytes passed.

        Nothing can damage the bytes between btrfs send and us, and the receiver checks every command's
        crc32c itself; a btrfs send that stops short exits with an error, which `reading` reports.
        """
        offset = self.reader.bytes_read
        return pass_on(self.output, sink, _COPY_CHUNK, lambda sent: events("progress", bytes=sent, offset=offset + sent))


@contextmanager
def _btrfs_send(path: Path, options: BtrfsSendOptions) -> Iterator[_Sending]:
    """Run `btrfs send` and read its first command; the caller reads the rest up to END."""
    argv = send_argv(path, options.parent, options.clones, options.proto, options.compressed)
    proc = SendProcess(argv, f"cannot send {path}", BTRFS_TOOL)
    reader = BtrfsStreamReader(proc.stdout)
    with proc.reading(lambda: reader.bytes_read):
        commands = iter(reader)
        first = next(commands, None)
        if first is None or first.command.kind not in (Cmd.SUBVOL, Cmd.SNAPSHOT):
            proc.check()
            raise StreamFormatError(f"btrfs send {path} did not start with a subvolume")
        yield _Sending(reader, first, commands, proc.stdout)


def _no_data_send(path: Path, options: BtrfsSendOptions) -> SendProcess:
    argv = send_argv(path, options.parent, options.clones, options.proto, options.compressed, no_data=True)
    return SendProcess(argv, f"cannot estimate the size of {path}", BTRFS_TOOL)


def _sum_no_data(proc: SendProcess, already_sent: int) -> int | None:
    """Sum a --no-data stream: its own bytes, and for each extent it leaves out, the WRITE commands that carry it."""
    reader = BtrfsStreamReader(proc.stdout)
    total = 0
    # Stopped by its owner, or failed: the transfer goes on without an ETA either way.
    with contextlib.suppress(SnapferryError, OSError, ValueError):
        for item in reader:
            command = item.command
            if command.kind == Cmd.UPDATE_EXTENT:
                writes = -(-command.size // _SEND_READ_SIZE)
                total += command.size + writes * (_WRITE_OVERHEAD + len(command.path))
        if proc.failure(timeout=None) is None:
            return max(reader.bytes_read + total - already_sent, 0)
    return None


def estimate_stream_size(path: Path, options: BtrfsSendOptions = BtrfsSendOptions(), already_sent: int = 0) -> int | None:
    """What `btrfs send` of `path` (less `already_sent` bytes) will write, from a --no-data send; None if that fails.

    btrfs has nothing like `zfs send -nP`. The --no-data stream walks the same metadata without
    reading file data; only the split of the data into WRITE commands is reckoned.
    """
    proc = _no_data_send(path, options)
    try:
        return _sum_no_data(proc, already_sent)
    finally:
        proc.stop()


@contextmanager
def _estimating(path: Path, options: BtrfsSendOptions, events: EventSink, already_sent: int = 0) -> Iterator[None]:
    """While the stream is sent, estimate its size on a thread: an "estimate" event gives the bar its total (and ETA).

    A transfer that ends first stops the estimate.
    """
    if not options.estimate:
        yield
        return
    proc = _no_data_send(path, options)

    def estimate() -> None:
        if (total := _sum_no_data(proc, already_sent)) is not None:
            events("estimate", total=total)

    thread = threading.Thread(target=estimate, daemon=True)
    thread.start()
    try:
        yield
    finally:
        proc.stop()
        thread.join()


def send_btrfs(path: Path, sink: Sink, options: BtrfsSendOptions = BtrfsSendOptions(), *, events: EventSink = ignore_events) -> int:
    """Send the read-only snapshot at `path` as `btrfs send` does, every command's crc checked on the way."""
    for snapshot in (path, *([options.parent] if options.parent else []), *options.clones):
        if not subvolume_at(snapshot).readonly:
            raise Refused(f"{snapshot} is not read-only: send snapshots (btrfs subvolume snapshot -r SUBVOL SNAPSHOT)")
    with _btrfs_send(path, options) as sending:
        events("stream", toname=str(path), offset=0)
        with _estimating(path, options, events):
            sink([stream_header(sending.reader.version), sending.first.header, sending.first.body])
            total = sending.first.end_offset + sending.copy_rest(sink, events)
    events("done", bytes=total)
    return total


def _check_source(token: BtrfsToken, source: Subvolume) -> None:
    if source.name != token.subvolume:
        raise Refused(f"this token continues the transfer of a snapshot named {token.subvolume}, not {source.path}")
    if source.uuid.hex != token.uuid:
        raise StaleToken(
            f"stale token: {source.path} is not the snapshot this transfer receives (uuid {source.uuid}, the token's is "
            f"{UUID(token.uuid)}): it was deleted and taken again; {_abort_advice(token)}"
        )
    if not source.readonly:
        raise Refused(f"{source.path} is no longer read-only, so it may have changed since the transfer began; {_abort_advice(token)}")


def _abort_advice(token: BtrfsToken) -> str:
    return f"abort the transfer on the receiving side (snapferry receive -A DIR/{token.subvolume}) and send {token.subvolume} again"


def _parent_for(token: BtrfsToken, path: Path, given: Path | None) -> Path | None:
    """The parent snapshot the interrupted incremental was sent from: the one given, or a sibling of path with its uuid."""
    parent = UUID(token.parent)
    if parent == NIL:
        if given is not None:
            raise Refused(f"this token continues a full stream of {token.subvolume}: drop -p")
        return None
    if given is not None:
        if subvolume_at(given).uuid != parent:
            raise Refused(f"-p {given} is not the parent of the interrupted incremental (its uuid is {parent})")
        return given
    for sibling in subvolumes_in(path.parent):
        if sibling.uuid == parent:
            return sibling.path
    raise StaleToken(
        f"stale token: the parent snapshot of this incremental (uuid {parent}) is not in {path.parent}; give it with -p PARENT"
    )


def send_btrfs_continuation(
    token: BtrfsToken, path: Path, sink: Sink, options: BtrfsSendOptions = BtrfsSendOptions(), *, events: EventSink = ignore_events
) -> int:
    """Regenerate the stream of `path`, check its prefix against the token, and send the rest as a continuation.

    The continuation is what `snapferry receive -s` needs to go on from the token's checkpoint: the
    stream's first command (which names the stream) and the commands after the checkpoint.
    """
    try:
        source = subvolume_at(path)
    except DatasetMissing:
        raise StaleToken(f"stale token: {path} no longer exists; {_abort_advice(token)}") from None
    _check_source(token, source)
    parent = _parent_for(token, path, options.parent)
    options = dataclasses.replace(options, parent=parent)
    with _btrfs_send(path, options) as sending:
        first, commands = sending.first, sending.commands
        begin = first.command
        chosen_parent = begin.clone_uuid if begin.kind == Cmd.SNAPSHOT else NIL
        if begin.uuid.hex != token.uuid or begin.ctransid != token.ctransid:
            raise StaleToken(
                f"stale token: {path} has changed since the transfer began (transid {begin.ctransid}, the token's is {token.ctransid})"
            )
        if chosen_parent.hex != token.parent:
            raise StaleToken(
                f"stale token: btrfs send now makes a stream from parent {chosen_parent}, the interrupted one was from "
                f"{UUID(token.parent)}: give the same -p and -c as the first time"
            )
        events("stream", toname=str(path), offset=token.offset)
        try:
            for item in skip_applied(commands, token.offset, bytes.fromhex(token.fingerprint)):
                events("skip", bytes=item.end_offset, total=token.offset)
        except PrefixMismatch:
            raise StaleToken(
                f"stale token: the stream btrfs send makes of {path} now differs from the one received up to stream byte "
                f"{token.offset} (a defrag or balance of the source, or other -c clone sources, change an incremental's "
                f"commands); {_abort_advice(token)}"
            ) from None
        continuation = Continuation(token.offset, bytes.fromhex(token.fingerprint))
        sink([continuation.encode(), stream_header(sending.reader.version), first.header, first.body])
        with _estimating(path, options, events, already_sent=token.offset):
            sent = sending.copy_rest(sink, events)
    events("done", bytes=sent)
    return sent
