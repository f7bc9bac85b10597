"""One S3 bucket through boto3: the few calls a backup makes, with every failure turned into one clear line."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from snapferry.errors import DatasetMissing, OutOfSpace, Refused, SnapferryError, TransferInterrupted, UsageError

T = TypeVar("T")
_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"}
_QUOTA = {"QuotaExceeded", "EntityTooLarge", "RequestEntityTooLarge", "InsufficientStorage", "StorageQuotaExceeded"}
# Our own retries, after botocore's: a proxy restart or a link down for a minute must not cost a re-read.
BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


@dataclass(frozen=True)
class StoreOptions:
    """How to reach the store; credentials come from boto3's own chain (environment, profile, instance role)."""

    endpoint_url: str | None = None
    profile: str | None = None
    jobs: int = 4


class Bucket:
    """A bucket's objects by key; thread-safe (boto3 clients are), so that several chunks can be in flight."""

    def __init__(self, name: str, options: StoreOptions, retries: int = len(BACKOFF)) -> None:
        # boto3 costs 0.3 s of start-up: only the object-store verbs load it.
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ProfileNotFound

        self.name = name
        self.where = options.endpoint_url or "S3"
        self.retries = retries
        try:
            session = boto3.session.Session(profile_name=options.profile)
        except ProfileNotFound:
            raise UsageError(f"no AWS profile {options.profile!r} (see ~/.aws/config)") from None
        except BotoCoreError as exc:
            raise UsageError(f"cannot set up the S3 client: {exc}") from None
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if options.endpoint_url else "auto"},
            retries={"max_attempts": 4, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=max(10, options.jobs * 2),
        )
        self._client: Any = session.client(
            "s3", endpoint_url=options.endpoint_url, region_name=session.region_name or "us-east-1", config=config
        )

    # --- calls --------------------------------------------------------------------------------

    def check(self) -> None:
        """Fail early, with the reason, when the bucket cannot be reached or used."""
        # A listing, not a HEAD: a HEAD's refusal has no body, so it cannot tell bad credentials from a missing permission.
        self._call("reach", f"s3://{self.name}", lambda: self._client.list_objects_v2(Bucket=self.name, MaxKeys=1))

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        # Content-MD5 makes the store refuse a body damaged on the way, so that no damaged chunk is ever stored.
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        self._call("store", key, lambda: self._client.put_object(Bucket=self.name, Key=key, Body=data, ContentMD5=md5))

    def get(self, key: str) -> bytes:
        def read() -> bytes:
            body: bytes = self._client.get_object(Bucket=self.name, Key=key)["Body"].read()
            return body

        return self._call("read", key, read)

    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under prefix."""
        for objects, _ in self._pages(prefix, None):
            yield from objects

    def children(self, prefix: str) -> tuple[list[str], list[str]]:
        """One level under prefix (which ends in '/'): the keys of its objects, and its sub-prefixes."""
        objects: list[str] = []
        prefixes: list[str] = []
        for page_objects, page_prefixes in self._pages(prefix, "/"):
            objects += page_objects
            prefixes += page_prefixes
        return objects, prefixes

    def _pages(self, prefix: str, delimiter: str | None) -> Iterator[tuple[list[str], list[str]]]:
        extra = {"Delimiter": delimiter} if delimiter else {}
        token: str | None = None
        while True:
            arguments = {"Bucket": self.name, "Prefix": prefix, **extra, **({"ContinuationToken": token} if token else {})}
            page = self._call("list", prefix or "/", partial(self._client.list_objects_v2, **arguments))
            yield [o["Key"] for o in page.get("Contents", ())], [p["Prefix"] for p in page.get("CommonPrefixes", ())]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def delete(self, keys: list[str]) -> None:
        """Delete objects one call each, a few at a time: the multi-object delete needs a Content-MD5 that recent
        boto3 no longer sends (it sends a CRC32 instead), which S3 implementations such as Swift's refuse."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="delete") as pool:
            for future in [pool.submit(self._delete_one, key) for key in keys]:
                future.result()

    def _delete_one(self, key: str) -> None:
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self.name, Key=key))

    # --- failures -----------------------------------------------------------------------------

    def _call(self, doing: str, key: str, call: Callable[[], T]) -> T:
        """call(), tried again after a passing failure (back-off: BACKOFF), with every failure as a SnapferryError."""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except Exception as exc:  # botocore's exceptions are many, and none may escape as a traceback
                error = self._as_error(exc, doing, key)
                if not error.retryable or attempt == self.retries:
                    raise error from None
                time.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
        raise AssertionError("unreachable")

    def _as_error(self, exc: Exception, doing: str, key: str) -> SnapferryError:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        where = f"s3://{self.name}/{key}" if key != f"s3://{self.name}" else key
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return UsageError(
                "no credentials for the object store: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE, or use an instance role"
            )
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _CREDENTIALS:
                return Refused(f"the object store at {self.where} refused the credentials ({code}): check the access key and secret")
            if code in ("NoSuchBucket",) or (status == 404 and doing == "reach"):
                return Refused(f"no bucket {self.name!r} at {self.where}: create it first (aws s3 mb s3://{self.name})")
            if code in ("AccessDenied", "AllAccessDisabled", "Forbidden") or status == 403:
                return Refused(f"no permission to {doing} {where} ({code or status}): check the bucket's policy for these credentials")
            if code in _QUOTA or status in (413, 507):
                return OutOfSpace(f"the object store refused to {doing} {where}: quota exceeded ({code or status}); what is stored is kept")
            if code in ("NoSuchKey", "404") or status == 404:
                return DatasetMissing(f"no object {where}")
            if status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"):
                return TransferInterrupted(f"the object store failed to {doing} {where} ({code or status}); try again later")
            return Refused(f"the object store refused to {doing} {where} ({code or status})")
        if isinstance(exc, (BotoCoreError, OSError)):
            return TransferInterrupted(f"cannot reach the object store at {self.where} to {doing} {where}: {type(exc).__name__}")
        return SnapferryError(f"cannot {doing} {where}: {type(exc).__name__}: {exc}")
