"""Storing one snapshot's stream as numbered chunk objects, several in flight, resuming from what the bucket already holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from snapferry.core.events import EventSink
from snapferry.core.streamio import Buffer, Sink
from snapferry.errors import Refused, StaleToken
from snapferry.offsite.bucket import Bucket
from snapferry.offsite.chunkseal import ChunkSeal
from snapferry.offsite.layout import MANIFEST_OBJECT, UPLOAD_OBJECT, StoredSnapshot, chunk_key, parse_chunk_key, snapshot_prefix


class RateLimit:
    """--bwlimit shared by every upload thread: each chunk takes its turn of `size / rate` seconds."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, size: int) -> None:
        if not self._rate:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + size / self._rate
        time.sleep(max(0.0, start - now))


class _Chunker:
    """A Sink that cuts the stream into chunks and hands each to `ship` (in a thread pool, at most `jobs` at once).

    `ship(index, chunk)` returns the chunk's fingerprint (64 hex digits). What is kept of a shipped chunk is
    its 32-byte digest, so that a 50 TiB stream's 800 000 chunks cost 25 MiB, not a Future each.
    """

    def __init__(self, chunk_size: int, jobs: int, ship: Callable[[int, bytearray], str]) -> None:
        self._size = chunk_size
        self._buffer = bytearray()
        self._ship = ship
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="chunk")
        # One more chunk may fill while `jobs` are in flight: memory stays at (jobs + 1) chunks, whatever the stream's size.
        self._slots = threading.Semaphore(jobs)
        self._lock = threading.Lock()
        self._pending: set[Future[str]] = set()
        self._digests = bytearray()
        self._failure: BaseException | None = None
        self._last_size = 0
        self.index = 0
        self.bytes = 0

    def __call__(self, parts: Sequence[Buffer]) -> None:
        for part in parts:
            view = memoryview(part).cast("B")
            self.bytes += len(view)
            while view:
                take = min(len(view), self._size - len(self._buffer))
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) == self._size:
                    self._submit()

    def _submit(self) -> None:
        self._raise_failure()
        self._slots.acquire()
        index, chunk = self.index, self._buffer
        self._last_size = len(chunk)
        future = self._pool.submit(self._ship, index, chunk)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(lambda done: self._done(index, done))
        self.index += 1
        self._buffer = bytearray()

    def _done(self, index: int, future: Future[str]) -> None:
        with self._lock:
            self._pending.discard(future)
            if not future.cancelled():
                failure = future.exception()
                if failure is not None:
                    self._failure = self._failure or failure
                else:
                    end = (index + 1) * 32
                    if len(self._digests) < end:
                        self._digests.extend(bytes(end - len(self._digests)))
                    self._digests[index * 32 : end] = bytes.fromhex(future.result())
        self._slots.release()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def finish(self) -> list[tuple[int, str]]:
        """Ship the last chunk, wait for every upload; each chunk's (size, fingerprint) in order."""
        if self._buffer or not self.index:
            self._submit()
        self._pool.shutdown(wait=True)
        self._raise_failure()
        sizes = [self._size] * (self.index - 1) + [self._last_size]
        return [(size, self._digests[i * 32 : (i + 1) * 32].hex()) for i, size in enumerate(sizes)]

    def abandon(self) -> None:
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.cancel()
        self._pool.shutdown(wait=True)


def read_record(bucket: Bucket, key: str) -> StoredSnapshot:
    return StoredSnapshot.decode(bucket.get(key), key)


def upload_snapshot(
    bucket: Bucket,
    seal: ChunkSeal,
    dataset_key: str,
    record: StoredSnapshot,
    send: Callable[[Sink], int],
    events: EventSink,
    *,
    jobs: int = 4,
    rate: RateLimit | None = None,
) -> StoredSnapshot:
    """Store the stream `send` writes as the snapshot `record` describes; its manifest.

    The bucket is the state: chunks already stored (from an interrupted run, on any host) are not sent
    again, but the stream is made again up to them and each is checked against its stored fingerprint.
    The manifest is written last, so a snapshot without one is never taken as stored.
    """
    prefix = snapshot_prefix(dataset_key, record.snapshot)
    where = f"s3://{bucket.name}/{prefix}"
    address = f"s3://{bucket.name}/{dataset_key}@{record.snapshot}"
    names = {key[len(prefix) :] for key in bucket.keys(prefix)}
    if MANIFEST_OBJECT in names:
        return read_record(bucket, prefix + MANIFEST_OBJECT)
    if UPLOAD_OBJECT in names:
        started = read_record(bucket, prefix + UPLOAD_OBJECT)
        if started.identity != record.identity:
            raise StaleToken(
                f"{where} holds a partial upload of another snapshot named {record.snapshot} (identity {started.identity}); "
                f"remove it with: snapferry forget {address}"
            )
        if not started.same_stream(record):
            raise Refused(
                f"{where} holds a partial upload of this snapshot made with another base, chunk size, key or send flags; "
                f"resume it with the same options, or remove it with: snapferry forget {address}"
            )
        record = started
    else:
        bucket.put(prefix + UPLOAD_OBJECT, record.encode())
    stored = dict(c for c in map(parse_chunk_key, names) if c is not None)
    if stored:
        events("resume", dataset=record.dataset, snapshot=record.snapshot, chunks=len(stored))
    limit = rate or RateLimit(None)

    def ship(index: int, plain: bytearray) -> str:
        fingerprint = seal.fingerprint(plain)
        if index in stored:
            if stored[index] != fingerprint:
                raise StaleToken(
                    f"the stream of {record.dataset}@{record.snapshot} made now differs from the one stored in {where} "
                    f"(chunk {index}): the source changed; remove the partial upload with: snapferry forget {address}"
                )
            events("chunk", index=index, bytes=len(plain), uploaded=False)
            return fingerprint
        key = prefix + chunk_key(index, fingerprint)
        sealed = seal.seal(plain, key)
        limit.wait(len(sealed))
        bucket.put(key, sealed)
        events("chunk", index=index, bytes=len(plain), uploaded=True)
        return fingerprint

    chunker = _Chunker(record.chunk_size, jobs, ship)
    try:
        send(chunker)
        chunks = chunker.finish()
    except BaseException:
        chunker.abandon()
        raise
    beyond = sorted(i for i in stored if i >= len(chunks))
    if beyond:
        raise StaleToken(
            f"the stream of {record.dataset}@{record.snapshot} made now is shorter than the one stored in {where} "
            f"(it has chunk {beyond[0]}); "
            f"remove the partial upload with: snapferry forget {address}"
        )
    manifest = replace(record, finished=int(time.time()), size=chunker.bytes, chunks=tuple(chunks))
    bucket.put(prefix + MANIFEST_OBJECT, manifest.encode())
    events("stored", dataset=record.dataset, snapshot=record.snapshot, bytes=chunker.bytes, chunks=len(chunks))
    return manifest
