"""snapferry resume tokens: what a checkpoint is, in a form that survives copy and paste (pure)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from snapferry.core.seal import UNSEAL_ERRORS, seal, unseal
from snapferry.errors import MalformedToken

TOKEN_PREFIX = "sf1-"
# A token's JSON is a few hundred bytes; the bound keeps a forged one from inflating without limit.
MAX_BODY = 1 << 16
# Record types are small numbers (BEGIN 0 .. REDACT 10); a position names one after BEGIN.
MAX_RECORD_TYPE = 64


# ZFS's own rule for dataset names: components of letters, digits and "_.: -", at most 255 bytes.
_DATASET = re.compile(r"[A-Za-z0-9_.: -]+(?:/[A-Za-z0-9_.: -]+)*")
MAX_DATASET_NAME = 255


def is_dataset_name(name: object) -> bool:
    return isinstance(name, str) and bool(_DATASET.fullmatch(name)) and len(name) <= MAX_DATASET_NAME


@dataclass(frozen=True)
class ResumeToken:
    """Where an interrupted transfer stands on its destination.

    `offset` is the byte of the original stream where the next piece starts; the prefix from
    `fingerprint_from` up to it has fletcher-4 fingerprint `fingerprint`.
    """

    dataset: str
    toguid: int
    fromguid: int
    checkpoint_guid: int
    seq: int
    offset: int
    fingerprint_from: int
    fingerprint: str
    # Letters of the `zfs send` flags (-L -e -c -w) the interrupted stream was made with.
    send_flags: str = ""
    # The record the next piece starts with (its type, object and offset), when the receiver recorded
    # it: an OpenZFS source then resumes there with `zfs send -t` instead of re-reading up to `offset`.
    next_kind: int | None = None
    next_object: int | None = None
    next_offset: int | None = None

    @property
    def has_position(self) -> bool:
        return self.next_kind is not None

    def fields(self) -> dict[str, object]:
        """The token's JSON body. The position is absent, not null, when unknown: a token without one stays what
        older snapferry made and reads."""
        return {k: v for k, v in asdict(self).items() if v is not None or not k.startswith("next_")}

    def encode(self) -> str:
        return seal(TOKEN_PREFIX, self.fields())

    @classmethod
    def decode(cls, text: str) -> ResumeToken:
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise MalformedToken(f"malformed token: it starts with neither {TOKEN_PREFIX!r} (snapferry's) nor '1-' (OpenZFS's)")
        try:
            token = cls(**unseal(TOKEN_PREFIX, text, MAX_BODY))
        except UNSEAL_ERRORS as exc:
            raise MalformedToken(f"malformed token: {exc}; copy it again from `snapferry token DATASET`") from None
        token._check()
        return token

    def _check(self) -> None:
        ints = (self.toguid, self.fromguid, self.checkpoint_guid, self.seq, self.offset, self.fingerprint_from)
        if not all(type(v) is int and 0 <= v < 1 << 64 for v in ints) or not isinstance(self.dataset, str):
            raise MalformedToken("malformed token: a field is out of range")
        if not (0 < self.fingerprint_from <= self.offset):
            raise MalformedToken("malformed token: its offsets are inconsistent")
        if not isinstance(self.fingerprint, str) or len(self.fingerprint) != 16:
            raise MalformedToken("malformed token: bad fingerprint")
        if not is_dataset_name(self.dataset):
            raise MalformedToken("malformed token: its destination is not a ZFS dataset name")
        if not isinstance(self.send_flags, str) or not set(self.send_flags) <= set("Lecw"):
            raise MalformedToken("malformed token: bad send flags")
        position = (self.next_kind, self.next_object, self.next_offset)
        # All three or none; a record type after BEGIN.
        in_range = all(type(v) is int and 0 <= v < 1 << 64 for v in position) and 0 < (self.next_kind or 0) < MAX_RECORD_TYPE
        if position != (None, None, None) and not in_range:
            raise MalformedToken("malformed token: its next record's position is out of range")

    def describe(self) -> dict[str, object]:
        """Fields for `token --decode`; guids as decimal strings, as `zfs get guid` prints them."""
        fields: dict[str, object] = {k: v for k, v in asdict(self).items() if v is not None or not k.startswith("next_")}
        for key in ("toguid", "fromguid", "checkpoint_guid"):
            fields[key] = str(fields[key])
        return fields
