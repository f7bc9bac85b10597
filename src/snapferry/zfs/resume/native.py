"""Native mode: OpenZFS's own resumable receive (`receive -s`, `send -t`, `receive -A`) behind snapferry's verbs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from snapferry.core.events import EventSink, ignore_events
from snapferry.core.process import ReceiveProcess, SendProcess
from snapferry.core.splice import SpliceRing
from snapferry.core.streamio import Readable, Sink
from snapferry.errors import PartialReceiveInTheWay, ReceiverGone, Refused, SnapferryError, StaleToken, TransferInterrupted
from snapferry.zfs.codec.openzfs_token import OpenZfsToken
from snapferry.zfs.codec.records import Begin
from snapferry.zfs.codec.stream import read_header
from snapferry.zfs.engine.command import ZFS_TOOL, Snapshot, Zfs
from snapferry.zfs.resume.checkpoints import Transfer, read_transfers
from snapferry.zfs.resume.receiver import resume_hint

Mode = Literal["native", "pieces"]
MODES: tuple[Mode, ...] = ("native", "pieces")
CHUNK = 1 << 20

# `zfs send` flags a resumed stream must share with the interrupted one, and the token's name for each.
_TOKEN_FLAGS = {"-w": "rawok", "-c": "compressok", "-e": "embedok", "-L": "largeblockok"}


def has_piece_transfer(zfs: Zfs, dataset: str) -> bool:
    _, transfers = read_transfers(zfs, dataset)
    return any(not t.complete for t in transfers)


def kernel_token(zfs: Zfs, dataset: str, transfers: list[Transfer]) -> str | None:
    """OpenZFS's token for dataset, unless a piece transfer is under way there (that one comes first)."""
    if any(not t.complete for t in transfers):
        return None
    return zfs.resume_token(dataset)


def choose_mode(zfs: Zfs, dataset: str, requested: Mode | None, *, sender_can_resume: bool = True) -> Mode:
    """pieces where either end's kernel cannot resume, or where a piece transfer is already under way."""
    if requested == "pieces" or (requested is None and not sender_can_resume):
        return "pieces"
    native = zfs.native_resume(dataset)
    if requested == "native":
        if not native:
            pool = dataset.split("/", 1)[0]
            raise Refused(
                f"native resume is not available on pool {pool}: it needs OpenZFS 0.7 or later with the "
                "extensible_dataset feature; use --mode pieces"
            )
        return "native"
    return "native" if native and not has_piece_transfer(zfs, dataset) else "pieces"


def receive_native(
    zfs: Zfs,
    dataset: str,
    source: Readable,
    *,
    resumable: bool,
    force: bool,
    events: EventSink = ignore_events,
) -> list[str]:
    """Pass the stream to `zfs receive [-s]`: the kernel checks every record and keeps what arrived."""
    header = read_header(source)
    begin = Begin.decode(header, supported_only=False)
    events("stream", dataset=dataset, toname=begin.toname, offset=0, mode="native")
    proc = ReceiveProcess(zfs.receive_argv(dataset, force=force, resumable=resumable), f"cannot receive into {dataset}", ZFS_TOOL)
    total = len(header)
    # The stream is read into the ring and handed to zfs receive from there by reference: no second copy.
    ring = SpliceRing()
    try:
        proc.write([header])
        while True:
            start = ring.region(CHUNK)
            assert start is not None  # a chunk is smaller than half the ring
            if not (n := source.readinto(ring.view(start, CHUNK))):
                break
            proc.splice(ring, start, n)
            total += n
            events("progress", bytes=total)
        proc.finish()
    except PartialReceiveInTheWay:
        raise Refused(
            f"{dataset} holds an interrupted receive (see: snapferry token {dataset}); this stream cannot start "
            f"another: {resume_hint(dataset)}, or discard it with: snapferry receive -A {dataset}"
        ) from None
    except (TransferInterrupted, KeyboardInterrupt) as exc:
        proc.abort()
        note = resume_hint(dataset) if resumable else "receive with -s to make it resumable; send the stream again"
        raise TransferInterrupted(f"{exc or 'interrupted'} after {total} bytes; {note}") from None
    except SnapferryError:
        proc.abort()
        raise
    received = f"{dataset}@{begin.snapshot_name}" if begin.snapshot_name else dataset
    events("done", dataset=dataset, snapshot=begin.snapshot_name, bytes=total)
    return [received]


def _find(snapshots: list[Snapshot], guid: int) -> Snapshot | None:
    return next((s for s in snapshots if s.guid == guid), None)


def check_native_token(
    zfs: Zfs, token: OpenZfsToken, flags: Sequence[str], visible: Callable[[str], bool], *, discard: str = "snapferry receive -A DATASET"
) -> Snapshot:
    """The source snapshot the token resumes, or the precise reason it cannot be resumed here. `discard`: the command
    that gives up on the destination (a tree's names the tree)."""
    discard = f"discard the partial receive on the destination with: {discard}, then send again"
    for flag in flags:
        if not getattr(token, _TOKEN_FLAGS[flag]):
            raise Refused(
                f"send -t {flag}: the interrupted transfer was sent without {flag}, and a resumed stream must match it; "
                "resume without that flag (send -t takes its flags from the token)"
            )
    snapshots = [s for s in zfs.all_snapshots() if visible(s.dataset)]
    source = _find(snapshots, token.toguid)
    if source is None:
        same_name = next((s for s in snapshots if s.name == token.toname), None)
        if same_name is not None:
            raise StaleToken(
                f"stale token: {token.toname} is no longer the same snapshot used in the initial send (guid "
                f"{same_name.guid:#x} now, {token.toguid:#x} in the token: destroyed and taken again); {discard}"
            )
        raise StaleToken(f"stale token: {token.toname} (guid {token.toguid:#x}) used in the initial send no longer exists; {discard}")
    if token.fromguid and _find([s for s in snapshots if s.dataset == source.dataset], token.fromguid) is None:
        raise StaleToken(
            f"stale token: the incremental source of the interrupted transfer (guid {token.fromguid:#x}) no longer "
            f"exists in {source.dataset}; {discard}"
        )
    if not zfs.is_modern(source.dataset):
        raise Refused(f"the zfs here cannot resume a send (no zfs send -t): {discard} in --mode pieces")
    return source


def send_native_continuation(
    zfs: Zfs,
    text: str,
    sink: Sink,
    *,
    flags: Sequence[str] = (),
    events: EventSink = ignore_events,
    visible: Callable[[str], bool] = lambda dataset: True,
) -> int:
    """`zfs send -t TOKEN` after checking the token against this host's snapshots."""
    token = OpenZfsToken.decode(text)
    source = check_native_token(zfs, token, flags, visible)
    events("stream", toname=source.name, offset=token.bytes, mode="native")
    proc = SendProcess(zfs.send_token_argv(text.strip()), f"cannot resume the send of {source.name}", ZFS_TOOL)
    written = 0
    buffer = memoryview(bytearray(CHUNK))
    try:
        while n := proc.stdout.readinto(buffer):
            sink([buffer[:n]])
            written += n
            events("progress", bytes=written, offset=token.bytes + written)
        proc.check()
    except BrokenPipeError:
        raise ReceiverGone(f"the receiving side closed the stream after {written} bytes") from None
    finally:
        proc.stop()
    events("done", bytes=written)
    return written


def abort_native(zfs: Zfs, dataset: str) -> str | None:
    """Discard the kernel's saved state of an interrupted receive; None when there is none."""
    text = zfs.resume_token(dataset)
    if text is None:
        return None
    try:
        name = OpenZfsToken.decode(text).toname
    except SnapferryError:
        name = "a snapshot"
    try:
        zfs.abort_receive(dataset)
    except SnapferryError as exc:
        raise Refused(f"{exc}; the interrupted receive into {dataset} is still there: {_stuck_advice(zfs, dataset)}") from None
    if zfs.resume_token(dataset) is not None:
        raise Refused(f"zfs receive -A {dataset} left its resume token in place: {_stuck_advice(zfs, dataset)}")
    return f"discarded the interrupted receive of {name} into {dataset}"


def _stuck_advice(zfs: Zfs, dataset: str) -> str:
    if zfs.snapshots(dataset):
        return f"its partial data is the hidden child {dataset}/%recv: zfs destroy {dataset}/%recv removes only that"
    return f"{dataset} holds no complete snapshot, so nothing is lost by: zfs destroy -r {dataset}"
