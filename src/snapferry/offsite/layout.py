"""Where a backup lives in a bucket: `s3://` addresses, object keys, and the upload and manifest records (pure)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from snapferry.errors import StreamFormatError, UsageError

FORMAT = "snapferry-offsite/1"
DEFAULT_CHUNK_SIZE = 64 << 20
# S3 takes up to 5 GiB in one PUT; a chunk is held in memory once per upload in flight.
MAX_CHUNK_SIZE = 1 << 30
MIN_CHUNK_SIZE = 1 << 20
UPLOAD_OBJECT = "upload.json"
MANIFEST_OBJECT = "manifest.json"
_CHUNK = re.compile(r"^chunk-(\d{8})-([0-9a-f]{64})$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class _Bad(ValueError):
    """A record that parses but says something impossible (the reason is ours, never the object's text)."""


@dataclass(frozen=True)
class BucketUrl:
    """`s3://BUCKET/PATH`: PATH is the prefix of a backup tree, or below it a dataset (and `@SNAP`)."""

    bucket: str
    path: str  # no leading or trailing slash; may be empty
    snapshot: str | None = None

    @classmethod
    def parse(cls, text: str) -> BucketUrl:
        if not text.startswith("s3://"):
            raise UsageError(f"not an object store address: {text!r} (expected s3://BUCKET/PREFIX)")
        bucket, _, path = text[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket):
            raise UsageError(f"not a bucket name: {bucket!r} (3-63 lower-case letters, digits, dots and dashes)")
        path, at, snapshot = path.partition("@")
        path = path.strip("/")
        if at and (not snapshot or "/" in snapshot):
            raise UsageError(f"not a snapshot name: {snapshot!r} in {text}")
        if any(part in ("", ".", "..") for part in path.split("/")) and path:
            raise UsageError(f"not a clean prefix: {path!r} (no empty, '.' or '..' parts)")
        return cls(bucket, path, snapshot if at else None)

    def below(self, dataset: str) -> str:
        """The key prefix of a dataset's backups under this prefix (a btrfs path loses its leading '/')."""
        return "/".join(p for p in (self.path, dataset.strip("/")) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.path}" + (f"@{self.snapshot}" if self.snapshot else "")


def snapshot_prefix(dataset_key: str, snapshot: str) -> str:
    """Every object of one stored snapshot is under this key prefix."""
    return f"{dataset_key}/@{snapshot}/"


def chunk_key(index: int, fingerprint: str) -> str:
    """A chunk's name in its snapshot's prefix: its place and its fingerprint, so that a listing is the upload's state."""
    return f"chunk-{index:08d}-{fingerprint}"


def parse_chunk_key(name: str) -> tuple[int, str] | None:
    match = _CHUNK.match(name)
    return (int(match[1]), match[2]) if match else None


@dataclass(frozen=True)
class StoredSnapshot:
    """What is being (upload.json) or was (manifest.json) stored of one snapshot's stream."""

    backend: str  # "zfs", "btrfs"
    dataset: str  # the source's name for it: pool/fs, or the btrfs directory
    snapshot: str  # short name
    identity: str  # ZFS guid, btrfs UUID
    order: int  # the source's creation order (createtxg, otransid): newest last
    created: int  # when the source snapshot was taken (unix seconds; 0: unknown)
    base: str | None  # an incremental's base snapshot (short name), None for a full stream
    base_identity: str | None
    chunk_size: int
    encryption: str | None  # None or "aes-256-gcm"
    started: int  # when its upload started (unix seconds)
    send_flags: tuple[str, ...] = ()
    # The source's own properties (ZFS; `zfs get -s local`), set again on the file system a restore makes.
    properties: tuple[tuple[str, str], ...] = ()
    # The manifest only: when the upload finished, the stream's size, and every chunk's (size, fingerprint).
    finished: int | None = None
    size: int | None = None
    chunks: tuple[tuple[int, str], ...] = field(default=())

    @property
    def complete(self) -> bool:
        return self.finished is not None

    def encode(self) -> bytes:
        body: dict[str, Any] = {"format": FORMAT, **asdict(self)}
        body["chunks"] = [list(c) for c in self.chunks]
        body["send_flags"] = list(self.send_flags)
        body["properties"] = dict(self.properties)
        return (json.dumps(body, indent=1) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes, key: str) -> StoredSnapshot:
        """The record stored at `key`; StreamFormatError naming it when it is not one."""
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or body.pop("format", None) != FORMAT:
                raise _Bad(f"not a {FORMAT} record")
            body["chunks"] = tuple((int(size), str(fp)) for size, fp in body.get("chunks", ()))
            body["send_flags"] = tuple(str(f) for f in body.get("send_flags", ()))
            body["properties"] = tuple((str(k), str(v)) for k, v in dict(body.get("properties", {})).items())
            record = cls(**body)
            record._check()
        except _Bad as exc:
            reason = str(exc)
        except json.JSONDecodeError:
            reason = "not JSON"
        except (ValueError, TypeError, KeyError, AttributeError):
            # Their text may quote the object's own bytes: a line of a message must not be made by the bucket.
            reason = "a field is missing, unknown or of the wrong type"
        else:
            return record
        raise StreamFormatError(f"{key} is not a snapferry backup record ({reason}): a foreign or damaged prefix")

    def _check(self) -> None:
        texts = (self.backend, self.dataset, self.snapshot, self.identity)
        if not all(isinstance(t, str) and t and t.isprintable() for t in texts) or "/" in self.snapshot:
            raise _Bad("a name is missing or not printable")
        if not all(type(n) is int for n in (self.order, self.created, self.started, self.chunk_size)):
            raise _Bad("a number is not an integer")
        if not (MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE) or self.encryption not in (None, "aes-256-gcm"):
            raise _Bad("bad chunk size or encryption")
        if self.complete:
            sizes = [size for size, _ in self.chunks]
            if self.size != sum(sizes) or any(s != self.chunk_size for s in sizes[:-1]) or (sizes and not 0 < sizes[-1] <= self.chunk_size):
                raise _Bad("its chunk sizes do not add up")
            if any(not re.fullmatch(r"[0-9a-f]{64}", fp) for _, fp in self.chunks):
                raise _Bad("bad chunk fingerprint")

    def same_stream(self, other: StoredSnapshot) -> bool:
        """Whether two records describe the same stream: the upload record and a resumed upload's."""
        return (self.identity, self.base_identity, self.chunk_size, self.encryption, self.send_flags) == (
            other.identity,
            other.base_identity,
            other.chunk_size,
            other.encryption,
            other.send_flags,
        )
