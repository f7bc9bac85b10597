"""The S3 test bed itself (snapferry_testkit.swift_server): real calls to a real Swift through s3api."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from snapferry_testkit.swift_server import SwiftServer

MIB = 1024 * 1024


def error_of(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    return exc.value.response["Error"]["Code"], exc.value.response["ResponseMetadata"]["HTTPStatusCode"]


def test_put_get_same_bytes(swift: SwiftServer, swift_bucket: str) -> None:
    data = os.urandom(3 * MIB + 17)
    s3 = swift.client()
    s3.put_object(Bucket=swift_bucket, Key="dir/blob", Body=data)
    got = s3.get_object(Bucket=swift_bucket, Key="dir/blob")["Body"].read()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    assert s3.head_object(Bucket=swift_bucket, Key="dir/blob")["ContentLength"] == len(data)


def test_listing_shows_fresh_objects_by_prefix(swift: SwiftServer, swift_bucket: str) -> None:
    # No updater or replicator runs: the object server updates the container server as it writes.
    s3 = swift.client()
    for key in ("a/1", "a/2", "ab", "b/1"):
        s3.put_object(Bucket=swift_bucket, Key=key, Body=key.encode())
    listed = s3.list_objects_v2(Bucket=swift_bucket, Prefix="a/")
    assert [item["Key"] for item in listed["Contents"]] == ["a/1", "a/2"]
    assert [item["Size"] for item in listed["Contents"]] == [3, 3]
    s3.delete_object(Bucket=swift_bucket, Key="a/1")
    assert [item["Key"] for item in s3.list_objects_v2(Bucket=swift_bucket)["Contents"]] == ["a/2", "ab", "b/1"]


def test_multipart_upload_and_ranged_get_across_parts(swift: SwiftServer, swift_bucket: str) -> None:
    s3 = swift.client()
    parts = [os.urandom(5 * MIB), os.urandom(5 * MIB)]
    upload = s3.create_multipart_upload(Bucket=swift_bucket, Key="big")["UploadId"]
    etags = [
        s3.upload_part(Bucket=swift_bucket, Key="big", UploadId=upload, PartNumber=number, Body=body)["ETag"]
        for number, body in enumerate(parts, start=1)
    ]
    listed = s3.list_parts(Bucket=swift_bucket, Key="big", UploadId=upload)["Parts"]
    assert [(part["PartNumber"], part["Size"]) for part in listed] == [(1, 5 * MIB), (2, 5 * MIB)]
    s3.complete_multipart_upload(
        Bucket=swift_bucket,
        Key="big",
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, start=1)]},
    )
    whole = b"".join(parts)
    start, end = 5 * MIB - 100, 5 * MIB + 99
    ranged = s3.get_object(Bucket=swift_bucket, Key="big", Range=f"bytes={start}-{end}")
    assert ranged["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert ranged["Body"].read() == whole[start : end + 1]
    assert hashlib.sha256(s3.get_object(Bucket=swift_bucket, Key="big")["Body"].read()).digest() == hashlib.sha256(whole).digest()
    assert s3.head_object(Bucket=swift_bucket, Key="big")["ETag"].endswith('-2"')
    assert s3.list_multipart_uploads(Bucket=swift_bucket).get("Uploads", []) == []


def test_wrong_secret_is_refused(swift: SwiftServer, swift_bucket: str) -> None:
    with pytest.raises(ClientError) as refused:
        swift.client(secret_key="not-the-secret").list_objects_v2(Bucket=swift_bucket)
    # tempauth answers an unknown access key with SignatureDoesNotMatch too.
    assert error_of(refused) in {("SignatureDoesNotMatch", 403), ("InvalidAccessKeyId", 403)}


def test_other_user_may_not_touch_the_bucket(swift: SwiftServer, swift_bucket: str) -> None:
    swift.client().put_object(Bucket=swift_bucket, Key="mine", Body=b"mine")
    other = swift.client(other=True)
    calls = {
        "get": lambda: other.get_object(Bucket=swift_bucket, Key="mine"),
        "put": lambda: other.put_object(Bucket=swift_bucket, Key="theirs", Body=b"x"),
        "list": lambda: other.list_objects_v2(Bucket=swift_bucket),
        "create": lambda: other.create_bucket(Bucket=f"{swift_bucket}-other"),
    }
    for name, call in calls.items():
        with pytest.raises(ClientError) as refused:
            call()
        assert error_of(refused) == ("AccessDenied", 403), name
    assert [item["Key"] for item in swift.client().list_objects_v2(Bucket=swift_bucket)["Contents"]] == ["mine"]


def test_bucket_quota_refuses_puts_and_parts(swift: SwiftServer, swift_bucket: str) -> None:
    s3 = swift.client()
    s3.put_object(Bucket=swift_bucket, Key="first", Body=b"x" * 1000)
    swift.set_bucket_quota(swift_bucket, 1500)
    with pytest.raises(ClientError) as full:
        s3.put_object(Bucket=swift_bucket, Key="second", Body=b"x" * 1000)
    assert error_of(full) == ("EntityTooLarge", 400)
    s3.put_object(Bucket=swift_bucket, Key="small", Body=b"x" * 500)  # exactly up to the quota
    upload = s3.create_multipart_upload(Bucket=swift_bucket, Key="big")["UploadId"]
    with pytest.raises(ClientError) as full:
        s3.upload_part(Bucket=swift_bucket, Key="big", UploadId=upload, PartNumber=1, Body=b"y" * 2000)
    assert error_of(full) == ("EntityTooLarge", 400)
    swift.set_bucket_quota(swift_bucket, None)
    s3.put_object(Bucket=swift_bucket, Key="second", Body=b"x" * 1000)
    s3.upload_part(Bucket=swift_bucket, Key="big", UploadId=upload, PartNumber=1, Body=b"y" * 2000)


def test_stopped_proxy_refuses_connections_and_comes_back(swift: SwiftServer, swift_bucket: str) -> None:
    swift.client().put_object(Bucket=swift_bucket, Key="kept", Body=b"kept")
    s3 = swift.client(max_attempts=1)
    swift.stop_proxy()
    try:
        with pytest.raises(EndpointConnectionError):
            s3.get_object(Bucket=swift_bucket, Key="kept")
    finally:
        swift.start_proxy()
    assert s3.get_object(Bucket=swift_bucket, Key="kept")["Body"].read() == b"kept"


def test_env_gives_a_subprocess_the_credentials(swift: SwiftServer, swift_bucket: str) -> None:
    swift.client().put_object(Bucket=swift_bucket, Key="seen", Body=b"1")
    script = (
        "import sys, boto3\n"
        "s3 = boto3.client('s3', endpoint_url=sys.argv[1])\n"
        "print(' '.join(item['Key'] for item in s3.list_objects_v2(Bucket=sys.argv[2])['Contents']))\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    result = subprocess.run(
        [sys.executable, "-c", script, swift.endpoint_url, swift_bucket],
        env={**env, **swift.env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "seen"), result.stderr
