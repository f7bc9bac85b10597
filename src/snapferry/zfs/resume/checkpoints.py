"""Checkpoint snapshots on a destination: their names, and the transfers they add up to."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from snapferry.errors import SnapferryError
from snapferry.zfs.codec.token import MAX_RECORD_TYPE, ResumeToken
from snapferry.zfs.engine.command import Snapshot, Zfs

PREFIX = "snapferry"

# A piece is received under an "open" name (its end is not known when its BEGIN is written)
# and renamed to a checkpoint name, which records where the next piece starts, once committed.
_OPEN = re.compile(rf"^{PREFIX}-(?P<toguid>[0-9a-f]{{16}})-(?P<fromguid>[0-9a-f]{{16}})-(?P<seq>\d+)-open$")
_CHECKPOINT = re.compile(
    rf"^{PREFIX}-(?P<toguid>[0-9a-f]{{16}})-(?P<fromguid>[0-9a-f]{{16}})-(?P<seq>\d+)"
    r"-(?P<end>[0-9a-f]+)-(?P<fpfrom>[0-9a-f]+)-(?P<fp>[0-9a-f]{16})(?:-(?P<flags>[Lecw]+))?$"
)
# The user property on a checkpoint that names the record the next piece starts with (see docs/design.md,
# "Jumping"): `<type>:<object hex>:<offset hex>`. Set right after the rename; without it there is no jump.
NEXT_PROPERTY = "snapferry:next"
_NEXT = re.compile(r"^(?P<kind>\d{1,2}):(?P<object>[0-9a-f]{1,16}):(?P<offset>[0-9a-f]{1,16})$")

# The longest checkpoint name: prefix, two guids, generous widths for seq and offsets, send flags.
MAX_CHECKPOINT_NAME = len(PREFIX) + 1 + 17 + 17 + 9 + 17 + 17 + 16 + 5


def open_name(toguid: int, fromguid: int, seq: int) -> str:
    return f"{PREFIX}-{toguid:016x}-{fromguid:016x}-{seq}-open"


def checkpoint_name(toguid: int, fromguid: int, seq: int, end: int, fingerprint_from: int, fingerprint: str, send_flags: str = "") -> str:
    """`send_flags` (letters of -L -e -c -w) let the sender regenerate the same stream for a resume."""
    name = f"{PREFIX}-{toguid:016x}-{fromguid:016x}-{seq}-{end:x}-{fingerprint_from:x}-{fingerprint}"
    return f"{name}-{send_flags}" if send_flags else name


@dataclass(frozen=True)
class Checkpoint:
    snapshot: Snapshot
    seq: int
    end: int
    fingerprint_from: int
    fingerprint: str
    send_flags: str = ""


@dataclass
class Transfer:
    """The pieces on one dataset that belong to the transfer of one source snapshot."""

    dataset: str
    toguid: int
    fromguid: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    open_pieces: list[Snapshot] = field(default_factory=list)
    final: Snapshot | None = None

    @property
    def complete(self) -> bool:
        return self.final is not None

    @property
    def last(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def pieces(self) -> list[Snapshot]:
        return [c.snapshot for c in self.checkpoints] + self.open_pieces

    def token(self, next_record: tuple[int, int, int] | None = None) -> ResumeToken | None:
        """`next_record`: the last checkpoint's (type, object, offset) of the record after it, if recorded."""
        last = self.last
        if last is None:
            return None
        kind, obj, offset = next_record or (None, None, None)
        return ResumeToken(
            dataset=self.dataset,
            toguid=self.toguid,
            fromguid=self.fromguid,
            checkpoint_guid=last.snapshot.guid,
            seq=last.seq,
            offset=last.end,
            fingerprint_from=last.fingerprint_from,
            fingerprint=last.fingerprint,
            send_flags=last.send_flags,
            next_kind=kind,
            next_object=obj,
            next_offset=offset,
        )


def find_transfers(snapshots: list[Snapshot], dataset: str) -> list[Transfer]:
    """Group a dataset's snapshots (oldest first) into snapferry transfers, oldest first."""
    transfers: dict[int, Transfer] = {}
    for snap in snapshots:
        short = snap.short_name
        match = _CHECKPOINT.match(short) or _OPEN.match(short)
        if not match:
            continue
        toguid = int(match["toguid"], 16)
        transfer = transfers.setdefault(toguid, Transfer(dataset, toguid, int(match["fromguid"], 16)))
        if match.re is _OPEN:
            transfer.open_pieces.append(snap)
        else:
            transfer.checkpoints.append(
                Checkpoint(snap, int(match["seq"]), int(match["end"], 16), int(match["fpfrom"], 16), match["fp"], match["flags"] or "")
            )
    by_guid = {s.guid: s for s in snapshots}
    for transfer in transfers.values():
        transfer.checkpoints.sort(key=lambda c: c.seq)
        transfer.final = by_guid.get(transfer.toguid)
    return list(transfers.values())


def positioned_token(zfs: Zfs, transfers: list[Transfer]) -> ResumeToken | None:
    """The token of the newest unfinished transfer that has a checkpoint, if any, with the position of the next
    record when its checkpoint has one recorded (a source on OpenZFS can then jump there)."""
    unfinished = [t for t in transfers if not t.complete and t.last is not None]
    if not unfinished:
        return None
    transfer = unfinished[-1]
    assert transfer.last is not None
    return transfer.token(read_next_record(zfs, transfer.last.snapshot.name))


def next_record_value(kind: int, obj: int, offset: int) -> str:
    return f"{kind}:{obj:x}:{offset:x}"


def read_next_record(zfs: Zfs, checkpoint: str) -> tuple[int, int, int] | None:
    """The (type, object, offset) recorded on a checkpoint; None if it has none (or it cannot be read: then no jump)."""
    try:
        table = zfs.get_properties(checkpoint, NEXT_PROPERTY)
    except SnapferryError:
        return None
    match = _NEXT.match(table.get(checkpoint, {}).get(NEXT_PROPERTY, ""))
    if match is None or not 0 < int(match["kind"]) < MAX_RECORD_TYPE:
        return None
    return int(match["kind"]), int(match["object"], 16), int(match["offset"], 16)


def read_transfers(zfs: Zfs, dataset: str) -> tuple[list[Snapshot], list[Transfer]]:
    _, snapshots = zfs.type_and_snapshots(dataset)
    return snapshots, find_transfers(snapshots, dataset)


def is_piece(snapshot: Snapshot) -> bool:
    return bool(_CHECKPOINT.match(snapshot.short_name) or _OPEN.match(snapshot.short_name))
