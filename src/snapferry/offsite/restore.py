"""Reading backups back: `restore` (a chain of stored snapshots into a file system, resuming), `get` and `verify`."""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

from snapferry.core.events import EventSink, ignore_events
from snapferry.core.streamio import Readable, Sink, write_all
from snapferry.errors import CommandFailed, DatasetMissing, NothingToDo, SnapferryError, StoredChunkDamaged, UsageError
from snapferry.interface import Backend, ReceiveRequest
from snapferry.offsite.bucket import Bucket
from snapferry.offsite.catalog import Entry, chain_to, dataset_entries, walk
from snapferry.offsite.chunkseal import ChunkSeal
from snapferry.offsite.download import StoredStream
from snapferry.offsite.layout import BucketUrl, StoredSnapshot, chunk_key, parse_chunk_key

# Tries of one stored snapshot's receive that the receiving command failed with an I/O error.
RECEIVE_ATTEMPTS = 3


def seal_for(record: StoredSnapshot, key_material: bytes | None, where: str) -> ChunkSeal:
    if record.encryption is None:
        return ChunkSeal(None)
    if key_material is None:
        raise UsageError(f"{where} is encrypted: give its key file with --key-file")
    return ChunkSeal(key_material)


def _address(bucket: Bucket, entry: Entry) -> str:
    return f"s3://{bucket.name}/{entry.dataset_key}@{entry.record.snapshot}"


def stored_chain(bucket: Bucket, url: BucketUrl) -> list[Entry]:
    if not url.snapshot:
        raise UsageError(f"name the snapshot to read: {url}@SNAPSHOT (snapferry ls {url} shows them)")
    return chain_to(dataset_entries(bucket, url.path), url.snapshot)


@contextmanager
def _continuation(produce: Callable[[Sink], object]) -> Iterator[tuple[Readable, list[BaseException]]]:
    """A Readable of what `produce` writes (in a thread), and the failure it ended with, if any."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            produce(lambda parts: write_all(write_fd, parts))
        except BaseException as exc:  # reported by the caller, once the receiver has stopped
            failure.append(exc)
        finally:
            os.close(write_fd)

    thread = threading.Thread(target=run, name="continuation", daemon=True)
    thread.start()
    with os.fdopen(read_fd, "rb", buffering=0) as reader:
        try:
            yield reader, failure
        finally:
            reader.close()
            thread.join()


def restore(
    backend: Backend,
    bucket: Bucket,
    url: BucketUrl,
    target: str,
    key_material: bytes | None,
    events: EventSink,
    *,
    jobs: int,
    force: bool,
    checkpoint: int | None = None,
) -> list[str]:
    """Apply the stored chain up to url's snapshot to target: only the links it lacks; an interrupted one goes on from
    the receiver's last checkpoint, downloading from the chunk that holds it."""
    chain = stored_chain(bucket, url)
    have = backend.restored_identities(target)
    start = max((i + 1 for i, e in enumerate(chain) if e.record.identity in have), default=0)
    if start == len(chain):
        raise NothingToDo(f"{target} already has {url.snapshot}")
    received: list[str] = []
    for entry in chain[start:]:
        request = backend.restore_request(target, force, dict(entry.record.properties))
        if checkpoint:
            request = replace(request, checkpoint=checkpoint)
        for attempt in range(1, RECEIVE_ATTEMPTS + 1):
            try:
                received += _apply_link(backend, bucket, entry, key_material, request, events, jobs)
                break
            except CommandFailed as exc:
                # zfs-fuse now and then answers a receive "I/O error" (docs/RELIABILITY.md): what was committed
                # stays, and the next attempt goes on from it.
                if "I/O error" not in str(exc) or attempt == RECEIVE_ATTEMPTS:
                    raise
                events("warning", message=f"{exc}; trying again from the last checkpoint ({attempt} of {RECEIVE_ATTEMPTS})")
    return received


def _apply_link(
    backend: Backend,
    bucket: Bucket,
    entry: Entry,
    key_material: bytes | None,
    request: ReceiveRequest,
    events: EventSink,
    jobs: int,
) -> list[str]:
    """One stored snapshot into the target: whole, or from the receiver's last checkpoint when it has one."""
    where = _address(bucket, entry)
    seal = seal_for(entry.record, key_material, where)
    token = backend.resume_token(request.target, entry.record.snapshot)
    if token is None:
        events("restore", snapshot=entry.record.snapshot, source=where, bytes=entry.record.size)
        with StoredStream(bucket, seal, entry.dataset_key, entry.record, ahead=jobs) as stream:
            return backend.receive(request, stream, events)
    events("resume", snapshot=entry.record.snapshot, source=where)
    return _resume_link(backend, bucket, entry, seal, request, token, events, jobs)


def restore_tree(
    backend: Backend,
    bucket: Bucket,
    url: BucketUrl,
    target: str,
    key_material: bytes | None,
    events: EventSink,
    *,
    jobs: int,
    force: bool,
    checkpoint: int | None = None,
) -> list[str]:
    """restore -r: every dataset stored at and below url's path that has its snapshot, into the same places below
    target, parents first; one that already has it is skipped, so that an interrupted run goes on where it stopped."""
    snapshot = url.snapshot
    if not snapshot:
        raise UsageError(f"name the snapshot to restore: {url}@SNAPSHOT (snapferry ls {url} shows them)")
    keys = list(dict.fromkeys(e.dataset_key for e in walk(bucket, url.path) if e.record.snapshot == snapshot and e.record.complete))
    if not keys:
        raise DatasetMissing(f"no dataset at or below {url} has {snapshot} stored whole; `snapferry ls` shows what is")
    received: list[str] = []
    for key in keys:
        try:
            received += restore(
                backend, bucket, replace(url, path=key), target + key[len(url.path) :], key_material, events,
                jobs=jobs, force=force, checkpoint=checkpoint,
            )  # fmt: skip
        except NothingToDo:
            events("skip", dataset=target + key[len(url.path) :], reason=f"already has {snapshot}")
    return received


def _resume_link(
    backend: Backend,
    bucket: Bucket,
    entry: Entry,
    seal: ChunkSeal,
    request: ReceiveRequest,
    token: str,
    events: EventSink,
    jobs: int,
) -> list[str]:
    """Receive the continuation of an interrupted restore of `entry`, made from its stored chunks from the token's offset on."""
    opened: list[StoredStream] = []

    def stream_from(offset: int, ahead: int = 1) -> StoredStream:
        stream = StoredStream(bucket, seal, entry.dataset_key, entry.record, start=offset, ahead=ahead)
        opened.append(stream)
        return stream

    def produce(sink: Sink) -> object:
        rest = lambda offset: stream_from(offset, ahead=jobs)  # noqa: E731
        return backend.stored_continuation(token, stream_from(0), rest, sink, ignore_events, _address(bucket, entry))

    try:
        with _continuation(produce) as (pipe, failure):
            try:
                received = backend.receive(request, pipe, events)
            except SnapferryError:
                # The receiver saw the stream end early; the reason is the producer's (a damaged chunk, the store gone).
                if failure and isinstance(failure[0], SnapferryError):
                    raise failure[0] from None
                raise
            if failure:
                raise failure[0]
    finally:
        for stream in opened:
            stream.close()
    events("fetched", chunks=sum(s.chunks_fetched for s in opened))
    return received


def write_stream(bucket: Bucket, url: BucketUrl, key_material: bytes | None, fd: int, events: EventSink, jobs: int) -> int:
    """`get`: one stored snapshot's stream (not its chain) onto fd, every chunk checked first; the bytes written."""
    entry = stored_chain(bucket, url)[-1]
    seal = seal_for(entry.record, key_material, _address(bucket, entry))
    written = 0
    with StoredStream(bucket, seal, entry.dataset_key, entry.record, ahead=jobs) as stream:
        while piece := stream.read_chunk():
            write_all(fd, [piece])
            written += len(piece)
            events("progress", bytes=written)
    return written


def verify(bucket: Bucket, entries: list[Entry], key_material: bytes | None, events: EventSink, jobs: int) -> list[str]:
    """Read and check every chunk and record of the stored snapshots; one line per problem found (none: all whole)."""
    problems: list[str] = []
    checked = 0
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="verify") as pool:
        for entry in entries:
            where = _address(bucket, entry)
            if entry.record.encryption and key_material is None:
                problems.append(f"{where}: encrypted; give --key-file to check its chunks")
                continue
            seal = seal_for(entry.record, key_material, where)
            names = {key[len(entry.prefix) :] for key in bucket.keys(entry.prefix)}
            if entry.record.complete:
                expected = [chunk_key(i, fp) for i, (_, fp) in enumerate(entry.record.chunks)]
            else:
                expected = sorted(n for n in names if parse_chunk_key(n))
            missing = {n for n in expected if n not in names}
            problems += [f"{where}: chunk {entry.prefix}{n} is missing" for n in sorted(missing)]

            def check(name: str, seal: ChunkSeal = seal, entry: Entry = entry) -> int:
                parsed = parse_chunk_key(name)
                assert parsed is not None
                key = entry.prefix + name
                return len(seal.open(bucket.get(key), key, parsed[1]))

            # At most 2 x jobs chunks asked for at once: a big backup has hundreds of thousands.
            window: deque[Future[int]] = deque()
            present = (n for n in expected if n not in missing)
            while True:
                while len(window) < 2 * jobs and (name := next(present, None)) is not None:
                    window.append(pool.submit(check, name))
                if not window:
                    break
                try:
                    checked += window.popleft().result()
                except StoredChunkDamaged as exc:
                    problems.append(str(exc))
                events("progress", bytes=checked)
            events("verified", snapshot=where, chunks=len(expected), complete=entry.record.complete)
    return problems
