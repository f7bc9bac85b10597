"""Reading a stored stream back: its chunks fetched ahead in order, each checked before a byte of it is given out."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from snapferry.errors import StreamFormatError
from snapferry.offsite.bucket import Bucket
from snapferry.offsite.chunkseal import ChunkSeal
from snapferry.offsite.layout import StoredSnapshot, chunk_key, snapshot_prefix


def dataset_key_of(manifest_key: str) -> str:
    """The dataset's key prefix, from the key of one of its snapshots' records (`.../DATASET/@SNAP/manifest.json`)."""
    return manifest_key.rsplit("/@", 1)[0]


class StoredStream:
    """A Readable over a stored snapshot's stream from byte `start`: chunks are fetched `ahead` at a time and checked."""

    def __init__(self, bucket: Bucket, seal: ChunkSeal, dataset_key: str, manifest: StoredSnapshot, start: int = 0, ahead: int = 2) -> None:
        if not 0 <= start <= (manifest.size or 0):
            raise StreamFormatError(f"stream byte {start} is beyond the stored stream of {manifest.snapshot} ({manifest.size} bytes)")
        self._bucket = bucket
        self._seal = seal
        self._prefix = snapshot_prefix(dataset_key, manifest.snapshot)
        self._chunks = manifest.chunks
        self._next = start // manifest.chunk_size
        self._skip = start % manifest.chunk_size
        self._ahead = max(1, ahead)
        self._pool = ThreadPoolExecutor(max_workers=self._ahead, thread_name_prefix="fetch")
        self._pending: deque[Future[bytes]] = deque()
        self._current = memoryview(b"")
        self.chunks_fetched = 0

    def _fetch(self, index: int) -> bytes:
        _, fingerprint = self._chunks[index]
        key = self._prefix + chunk_key(index, fingerprint)
        return self._seal.open(self._bucket.get(key), key, fingerprint)

    def _fill(self) -> None:
        while len(self._pending) < self._ahead and self._next < len(self._chunks):
            self._pending.append(self._pool.submit(self._fetch, self._next))
            self._next += 1

    def _load(self) -> bool:
        """Make the next chunk current when the current one is used up; False at the end of the stream."""
        while not self._current:
            self._fill()
            if not self._pending:
                return False
            plain = self._pending.popleft().result()
            self.chunks_fetched += 1
            self._current = memoryview(plain)[self._skip :]
            self._skip = 0
        return True

    def readinto(self, buffer: memoryview, /) -> int:
        if not self._load():
            return 0
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n

    def read_chunk(self) -> memoryview:
        """The rest of the current chunk, or the next one whole (empty at the end): for copying out in big pieces."""
        if not self._load():
            return memoryview(b"")
        out, self._current = self._current, memoryview(b"")
        return out

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> StoredStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
