"""`sync SRC s3://...`: bring a bucket's copy of a dataset up to date, one stored snapshot at a time, resuming from the bucket."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from snapferry.core.events import EventSink
from snapferry.errors import SnapferryError, StaleToken, UsageError
from snapferry.interface import Backend, SnapshotInfo
from snapferry.offsite.bucket import BACKOFF, Bucket
from snapferry.offsite.catalog import Entry, dataset_entries, forget, needed_by
from snapferry.offsite.chunkseal import ChunkSeal
from snapferry.offsite.layout import BucketUrl, StoredSnapshot
from snapferry.offsite.upload import RateLimit, upload_snapshot


@dataclass(frozen=True)
class BackupOptions:
    chunk_size: int
    jobs: int = 4
    rate: float | None = None
    no_stream: bool = False
    keep: int | None = None
    full_every: int | None = None  # start a new chain (a full stream) after this many incrementals
    restart_on_stale: bool = False
    retries: int = 5
    deadline: float | None = None
    send_flags: tuple[str, ...] = ()
    # The user hold (ZFS) that keeps a pruner from destroying what is being stored; None: --no-hold.
    hold_tag: str | None = None


@dataclass
class BackupStats:
    stored: list[str] = field(default_factory=list)
    bytes: int = 0
    resumes: int = 0
    retries: int = 0
    pruned: list[str] = field(default_factory=list)
    newest: SnapshotInfo | None = None


class Backup:
    """One dataset into one bucket prefix: what is missing there, stored in order, then old chains pruned."""

    def __init__(
        self, backend: Backend, source: str, url: BucketUrl, bucket: Bucket, seal: ChunkSeal, options: BackupOptions, events: EventSink
    ) -> None:
        self.backend, self.source, self.url, self.bucket, self.seal = backend, source, url, bucket, seal
        self.options, self.events = options, events
        self.dataset_key = url.below(source)
        self.stats = BackupStats()
        self._rate = RateLimit(options.rate)
        self._stored_properties: tuple[tuple[str, str], ...] | None = None

    def plan(self) -> list[str]:
        """--dry-run: what a run would store (and resume), without changing anything."""
        snapshots = self.backend.source_snapshots(self.source)
        entries = dataset_entries(self.bucket, self.dataset_key)
        lines = [f"resume the upload of {e.record.snapshot} ({e.chunks_stored} chunks stored)" for e in entries if not e.record.complete]
        for base, snapshot in self._todo(snapshots, entries):
            lines.append(f"store {snapshot.name}" + (f" (incremental from {base.name})" if base else " (full)"))
        return lines or ["up to date"]

    def run(self) -> str:
        snapshots = self.backend.source_snapshots(self.source)
        if not snapshots:
            raise UsageError(f"{self.source} has no snapshots to store: take one first (or give --snapshot)")
        by_identity = {s.identity: s for s in snapshots}
        entries = dataset_entries(self.bucket, self.dataset_key)
        partial = [e for e in entries if not e.record.complete]
        for entry in partial:
            self._resume_partial(entry, by_identity)
        if partial:
            entries = dataset_entries(self.bucket, self.dataset_key)
        for base, snapshot in self._todo(snapshots, entries):
            self._store(snapshot, base)
        self.stats.newest = snapshots[-1]
        if self.options.keep:
            self._prune(self.options.keep)
        return "up to date" if not self.stats.stored else f"stored {', '.join(self.stats.stored)}"

    def _todo(self, snapshots: list[SnapshotInfo], entries: list[Entry]) -> list[tuple[SnapshotInfo | None, SnapshotInfo]]:
        """(base, snapshot) pairs to store: from the newest snapshot the bucket has whole, every later one (or, with
        --no-stream, the newest); with none in common, the newest as a full stream."""
        whole = {e.record.identity for e in entries if e.record.complete}
        in_progress = {e.record.identity for e in entries if not e.record.complete}
        common = [i for i, s in enumerate(snapshots) if s.identity in whole]
        if not common:
            return [] if snapshots[-1].identity in in_progress else [(None, snapshots[-1])]
        later = snapshots[common[-1] + 1 :]
        if self.options.no_stream:
            later = later[-1:]
        by_identity = {e.record.identity: e for e in entries if e.record.complete}
        base: SnapshotInfo | None = snapshots[common[-1]]
        length = self._incrementals_before(by_identity, snapshots[common[-1]].identity)
        pairs: list[tuple[SnapshotInfo | None, SnapshotInfo]] = []
        for snapshot in later:
            if self.options.full_every is not None and length >= self.options.full_every:
                base, length = None, -1
            pairs.append((base, snapshot))
            base, length = snapshot, length + 1
        return pairs

    @staticmethod
    def _incrementals_before(by_identity: dict[str, Entry], identity: str) -> int:
        """How many incrementals the stored chain to the snapshot `identity` has since its full stream."""
        count = 0
        entry = by_identity.get(identity)
        while entry is not None and entry.record.base_identity is not None and count <= len(by_identity):
            count += 1
            entry = by_identity.get(entry.record.base_identity)
        return count

    def _resume_partial(self, entry: Entry, by_identity: dict[str, SnapshotInfo]) -> None:
        record = entry.record
        snapshot = by_identity.get(record.identity)
        base = by_identity.get(record.base_identity) if record.base_identity else None
        if snapshot is None or (record.base_identity and base is None):
            gone = record.snapshot if snapshot is None else f"{record.base} (the base of its incremental)"
            address = f"s3://{self.bucket.name}/{self.dataset_key}@{record.snapshot}"
            if not self.options.restart_on_stale:
                raise StaleToken(
                    f"{address} is a partial upload the source can no longer continue: {self.source} no longer has {gone}; "
                    f"remove it with: snapferry forget {address} (or sync --on-stale restart)"
                )
            self.events("discard", reason="partial upload", target=address)
            forget(self.bucket, entry)
            return
        self.stats.resumes += 1
        self._store(snapshot, base)

    def _store(self, snapshot: SnapshotInfo, base: SnapshotInfo | None) -> None:
        request = self.backend.send_request(self.source, snapshot.name, base.name if base else None)
        request = replace(request, flags=tuple(dict.fromkeys(request.flags + self.options.send_flags)))
        record = StoredSnapshot(
            backend=self.backend.name,
            dataset=self.source,
            snapshot=snapshot.name,
            identity=snapshot.identity,
            order=snapshot.order,
            created=snapshot.created,
            base=base.name if base else None,
            base_identity=base.identity if base else None,
            chunk_size=self.options.chunk_size,
            encryption=self.seal.encryption,
            started=int(time.time()),
            send_flags=request.flags,
            properties=self._properties(),
        )
        held = self._hold([name for name in (request.snapshot, request.base) if name])
        started = time.monotonic()
        for attempt in range(self.options.retries + 1):
            try:
                manifest = upload_snapshot(
                    self.bucket,
                    self.seal,
                    self.dataset_key,
                    record,
                    lambda sink: self.backend.send(request, sink, self.events),
                    self.events,
                    jobs=self.options.jobs,
                    rate=self._rate,
                )
                break
            except SnapferryError as exc:
                late = self.options.deadline is not None and time.monotonic() - started > self.options.deadline
                if not exc.retryable or attempt == self.options.retries or late:
                    raise
                wait = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                self.stats.retries += 1
                self.events("retry", attempt=attempt + 1, wait=wait, message=str(exc))
                time.sleep(wait)
        self.stats.stored.append(snapshot.name)
        self.stats.bytes += manifest.size or 0
        if held:
            try:
                self.backend.release(held, [name for name in (request.snapshot, request.base) if name])
            except SnapferryError as exc:
                self.events("warning", message=f"cannot release the hold {held}: {exc}")

    def _properties(self) -> tuple[tuple[str, str], ...]:
        """The source's own properties, read once per run (one `zfs get` however many snapshots it stores)."""
        if self._stored_properties is None:
            self._stored_properties = tuple(sorted(self.backend.stored_properties(self.source).items()))
        return self._stored_properties

    def _hold(self, snapshots: list[str]) -> str | None:
        """Hold what is being stored until its manifest is written (kept on failure: the resume needs it); the tag."""
        tag = self.options.hold_tag
        if tag is None:
            return None
        try:
            self.backend.hold(tag, snapshots)
        except UsageError:
            return None  # btrfs has no holds
        return tag

    def _prune(self, keep: int) -> None:
        """--keep N: forget stored snapshots but the newest N whole ones and every base they need."""
        entries = dataset_entries(self.bucket, self.dataset_key)
        whole = [e for e in entries if e.record.complete]
        needed = needed_by(whole, whole[-keep:])
        for entry in whole:
            if entry.record.snapshot not in needed:
                forget(self.bucket, entry)
                self.stats.pruned.append(entry.record.snapshot)
                self.events("pruned", snapshot=entry.record.snapshot)
