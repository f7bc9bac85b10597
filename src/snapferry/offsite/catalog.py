"""What a bucket holds under a prefix: every stored snapshot, complete or partial, found by walking the key layout."""

from __future__ import annotations

from dataclasses import dataclass

from snapferry.errors import DatasetMissing, Refused
from snapferry.interface import Moment, SnapshotInfo, Summary, Unfinished
from snapferry.offsite.bucket import Bucket
from snapferry.offsite.layout import MANIFEST_OBJECT, UPLOAD_OBJECT, StoredSnapshot, parse_chunk_key, snapshot_prefix
from snapferry.offsite.upload import read_record


@dataclass(frozen=True)
class Entry:
    """One stored snapshot: its record (the manifest when complete) and, for a partial one, how many chunks are stored."""

    dataset_key: str
    record: StoredSnapshot
    chunks_stored: int

    @property
    def prefix(self) -> str:
        return snapshot_prefix(self.dataset_key, self.record.snapshot)


def _entry(bucket: Bucket, dataset_key: str, snapshot_dir: str) -> Entry | None:
    try:
        record = read_record(bucket, snapshot_dir + MANIFEST_OBJECT)
        return Entry(dataset_key, record, len(record.chunks))
    except DatasetMissing:
        pass
    try:
        record = read_record(bucket, snapshot_dir + UPLOAD_OBJECT)
    except DatasetMissing:
        return None  # a snapshot whose upload record was never written, or is being removed
    stored = sum(1 for key in bucket.keys(snapshot_dir) if parse_chunk_key(key[len(snapshot_dir) :]))
    return Entry(dataset_key, record, stored)


def dataset_entries(bucket: Bucket, dataset_key: str) -> list[Entry]:
    """The snapshots stored for one dataset, oldest first; Refused when its prefix holds objects that are not a backup's."""
    objects, prefixes = bucket.children(dataset_key + "/")
    if objects:
        raise Refused(
            f"s3://{bucket.name}/{dataset_key} holds objects that are not a snapferry backup (such as {objects[0]}): give another prefix"
        )
    entries = []
    for sub in prefixes:
        if sub[len(dataset_key) + 1 :].startswith("@"):
            entry = _entry(bucket, dataset_key, sub)
            if entry is not None:
                entries.append(entry)
    return sorted(entries, key=lambda e: (e.record.order, e.record.started))


def walk(bucket: Bucket, path: str) -> list[Entry]:
    """Every stored snapshot at and below `path`, dataset by dataset (parents first), oldest first in each."""
    found: list[Entry] = []
    pending = [path]
    while pending:
        dataset_key = pending.pop(0)
        _, prefixes = bucket.children(dataset_key + "/" if dataset_key else "")
        if any(p[len(dataset_key) :].lstrip("/").startswith("@") for p in prefixes):
            found += dataset_entries(bucket, dataset_key)
        pending += sorted(p.rstrip("/") for p in prefixes if not p[len(dataset_key) :].lstrip("/").startswith("@"))
    return found


def chain_to(entries: list[Entry], snapshot: str) -> list[Entry]:
    """The complete stored snapshots a restore of `snapshot` applies, oldest (the full stream) first; Refused when a link is missing."""
    by_name = {e.record.snapshot: e for e in entries}
    entry = by_name.get(snapshot)
    if entry is None or not entry.record.complete:
        state = "only partly stored (its upload was interrupted)" if entry else "not stored"
        raise DatasetMissing(f"{snapshot} is {state} there; `snapferry ls` shows what is")
    # Bases are found by identity: a snapshot renamed on the source since is still the same snapshot.
    by_identity = {e.record.identity: e for e in entries if e.record.complete}
    chain = [entry]
    while (base := chain[-1].record.base) is not None:
        link = by_identity.get(chain[-1].record.base_identity or "")
        if link is None or link in chain:  # in chain: damaged manifests that make a loop
            raise Refused(
                f"the chain to {snapshot} is broken: {chain[-1].record.snapshot} is an incremental from {base}, which is not stored whole"
            )
        chain.append(link)
    return chain[::-1]


def needed_by(entries: list[Entry], kept: list[Entry]) -> set[str]:
    """The snapshots `kept` need to be restored: themselves and every base down to their full streams."""
    by_identity = {e.record.identity: e for e in entries}
    needed: set[str] = set()
    for entry in kept:
        current: Entry | None = entry
        while current is not None and current.record.snapshot not in needed:
            needed.add(current.record.snapshot)
            base = current.record.base_identity
            current = by_identity.get(base) if base else None
    return needed


def forget(bucket: Bucket, entry: Entry) -> None:
    """Delete a stored snapshot: its manifest first, so that a half-deleted one is never taken as complete."""
    keys = list(bucket.keys(entry.prefix))
    first = [k for k in keys if k.endswith("/" + MANIFEST_OBJECT)]
    bucket.delete(first)
    bucket.delete([k for k in keys if k not in first and not k.endswith("/" + UPLOAD_OBJECT)])
    bucket.delete([k for k in keys if k.endswith("/" + UPLOAD_OBJECT)])


def summarize(target: str, entries: list[Entry], source: list[SnapshotInfo]) -> Summary:
    """A bucket's copy of one dataset as `check` judges it: its newest stored snapshot, and the newest the source also has."""
    whole = [e.record for e in entries if e.record.complete]
    newest = Moment(whole[-1].snapshot, whole[-1].created) if whole else None
    stored = {r.identity for r in whole}
    common = next((Moment(s.name, s.created) for s in reversed(source) if s.identity in stored), None)
    unfinished = tuple(
        Unfinished(e.record.snapshot, "s3", e.chunks_stored * e.record.chunk_size, e.chunks_stored, 0)
        for e in entries
        if not e.record.complete
    )
    source_newest = Moment(source[-1].name, source[-1].created) if source else None
    return Summary(target, bool(entries), newest, unfinished, 0, source_newest, common)
