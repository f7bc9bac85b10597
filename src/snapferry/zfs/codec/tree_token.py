"""Tree resume tokens (`sf1r-`): where an interrupted `zfs send -R` transfer stands on its destination (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from snapferry.core.seal import UNSEAL_ERRORS, seal, unseal
from snapferry.errors import MalformedToken
from snapferry.zfs.codec.openzfs_token import OpenZfsToken
from snapferry.zfs.codec.token import ResumeToken, is_dataset_name

TREE_TOKEN_PREFIX = "sf1r-"
# Each snapshot the destination tree already has costs about 20 bytes of JSON: room for thousands.
MAX_TREE_BODY = 1 << 20
_SNAPSHOT_NAME_LIMIT = 255


def is_tree_token(text: str) -> bool:
    return text.strip().startswith(TREE_TOKEN_PREFIX)


@dataclass(frozen=True)
class NativePartial:
    """A substream the kernel keeps partial (`zfs receive -s`, native mode): the dataset and its OpenZFS token."""

    dataset: str
    text: str  # the kernel's token as `zfs get receive_resume_token` gives it (`zfs send -t` takes it)

    @property
    def token(self) -> OpenZfsToken:
        return OpenZfsToken.decode(self.text)

    @property
    def toguid(self) -> int:
        return self.token.toguid

    @property
    def fromguid(self) -> int:
        return self.token.fromguid or 0

    def describe(self) -> dict[str, Any]:
        return {"mode": "native", "dataset": self.dataset, "token": self.text, **self.token.as_json()}


Partial = ResumeToken | NativePartial


@dataclass(frozen=True)
class TreeToken:
    """An interrupted -R transfer: the source tree's root and snapshots (which the sender regenerates the
    plan from), every snapshot the destination tree already has (by guid: those substreams are not sent
    again), and the one substream that is partial: its own `sf1-` token (pieces) or the kernel's `1-` token and the
    dataset that holds it (native)."""

    target: str  # the destination dataset that receives the source root
    root: str  # the source tree's root file system
    tosnap: str
    fromsnap: str | None  # -R -i/-I: the base snapshot's name; None for a full -R
    intermediates: bool  # -I (every snapshot between) rather than -i
    have: frozenset[int]
    partial: Partial | None
    # Where below `target` each of `have` is ("" for the target itself, "/a/b" below it): a file system renamed
    # on the source since shows there. Empty in a token of an older snapferry, which listed the guids alone.
    where: Mapping[int, str] = field(default_factory=dict)

    def encode(self) -> str:
        have_at: dict[str, list[str]] = {}
        for guid in sorted(self.have):
            have_at.setdefault(self.where.get(guid, ""), []).append(f"{guid:x}")
        fields: dict[str, object] = {
            "target": self.target,
            "root": self.root,
            "tosnap": self.tosnap,
            "fromsnap": self.fromsnap,
            "intermediates": self.intermediates,
            "have_at": have_at,
            "partial": self._partial_text(),
        }
        if isinstance(self.partial, NativePartial):
            fields["partial_dataset"] = self.partial.dataset
        return seal(TREE_TOKEN_PREFIX, fields)

    @classmethod
    def decode(cls, text: str) -> TreeToken:
        text = text.strip()
        if not text.startswith(TREE_TOKEN_PREFIX):
            raise MalformedToken(f"malformed token: a tree token starts with {TREE_TOKEN_PREFIX!r}")
        try:
            fields: Any = unseal(TREE_TOKEN_PREFIX, text, MAX_TREE_BODY)
            have_at = fields["have_at"] if "have_at" in fields else {"": fields["have"]}
            where = {int(guid, 16): below for below, guids in have_at.items() for guid in guids}
            token = cls(
                target=fields["target"],
                root=fields["root"],
                tosnap=fields["tosnap"],
                fromsnap=fields["fromsnap"],
                intermediates=fields["intermediates"],
                have=frozenset(where),
                partial=_partial(fields["partial"], fields.get("partial_dataset")),
                where=where if "have_at" in fields else {},
            )
        except (*UNSEAL_ERRORS, KeyError, AttributeError) as exc:
            raise MalformedToken(f"malformed token: {exc}; copy it again from `snapferry token DATASET`") from None
        token._check()
        return token

    def _check(self) -> None:
        for name in (self.target, self.root):
            if not is_dataset_name(name):
                raise MalformedToken(f"malformed token: {name!r} is not a dataset name")
        for snap in (self.tosnap, self.fromsnap):
            if snap is not None and (not isinstance(snap, str) or not snap or "@" in snap or len(snap) > _SNAPSHOT_NAME_LIMIT):
                raise MalformedToken(f"malformed token: {snap!r} is not a snapshot name")
        if not isinstance(self.intermediates, bool) or any(not 0 < guid < 1 << 64 for guid in self.have):
            raise MalformedToken("malformed token: bad intermediates flag or snapshot guid")
        for below in self.where.values():
            parts = below.split("/")[1:]  # JSON object keys: always strings
            if below and (not below.startswith("/") or not is_dataset_name(f"{self.target}{below}") or {".", ".."} & set(parts)):
                raise MalformedToken(f"malformed token: {below!r} is not a file system below {self.target}")
        if isinstance(self.partial, NativePartial) and not is_dataset_name(self.partial.dataset):
            raise MalformedToken(f"malformed token: {self.partial.dataset!r} is not a dataset name")

    def _partial_text(self) -> str | None:
        if isinstance(self.partial, NativePartial):
            return self.partial.text
        return self.partial.encode() if self.partial else None

    def describe(self) -> dict[str, Any]:
        """Token --decode: the tree, what the destination has, and the partial substream's own state."""
        return {
            "kind": "snapferry tree (zfs send -R)",
            "target": self.target,
            "source": f"{self.root}@{self.tosnap}",
            "incremental_from": f"@{self.fromsnap}" if self.fromsnap else None,
            "intermediates": self.intermediates,
            "snapshots_received": len(self.have),
            "partial": self._describe_partial(),
        }

    def _describe_partial(self) -> dict[str, Any] | None:
        if isinstance(self.partial, NativePartial):
            return self.partial.describe()
        return {"mode": "pieces", **self.partial.describe()} if self.partial else None


def _partial(text: Any, dataset: Any) -> Partial | None:
    """A tree token's partial substream: an `sf1-` token, or a kernel token with the dataset that holds it."""
    if text is None:
        return None
    if isinstance(text, str) and text.startswith("1-"):
        OpenZfsToken.decode(text)  # checked now: a damaged one is refused before anything is sent
        if not isinstance(dataset, str):
            raise MalformedToken("malformed token: its native partial substream names no dataset")
        return NativePartial(dataset, text)
    return ResumeToken.decode(text)
