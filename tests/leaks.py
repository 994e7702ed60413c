"""Looking for credential values in what a test run wrote: payloads, every object version, log records."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import boto3
import pytest

from tests.conftest import FAKE_ACCESS_KEY_ID, FAKE_OSS_ENV, FAKE_SECRET_ACCESS_KEY

#: Every fake credential value the test session puts in the environment.
SECRETS = (FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, *FAKE_OSS_ENV.values())


def leaks(data: bytes | str, secrets: Iterable[str] = SECRETS) -> list[str]:
    """The secrets found in ``data`` (as UTF-8 bytes: how JSON, pickle and logs hold a string)."""
    raw = data.encode() if isinstance(data, str) else data
    return [secret for secret in secrets if secret.encode() in raw]


def versioned_bucket(endpoint: str, name: str) -> None:
    """Create bucket ``name`` on an S3 server with versioning on: deleted objects stay readable."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})


def every_version(endpoint: str, bucket: str, prefix: str) -> Iterator[tuple[str, bytes]]:
    """``(key, bytes)`` of every version ever written under ``prefix``, deleted ones included."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for version in page.get("Versions", ()):
            body = client.get_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])["Body"]
            yield version["Key"], body.read()


def capture_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Capture funcpipe's records at DEBUG and every other logger's at INFO and above.

    Not the SDKs' DEBUG records: at DEBUG botocore logs each request's headers
    (``Authorization`` holds the access key ID, ``X-Amz-Security-Token`` a session
    token) and oss2 its strings to sign (with the STS token). The function entries
    log at INFO; whoever turns the SDKs' DEBUG on (``funcpipe --debug`` does, for
    every logger) gets those in the log.
    """
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="funcpipe")


def record_leaks(records: Iterable[logging.LogRecord], secrets: Iterable[str] = SECRETS) -> list[str]:
    """``logger: secret`` for every record whose message (or traceback) holds a secret."""
    secrets = tuple(secrets)
    found = []
    for record in records:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        found += [f"{record.name}: {secret}" for secret in leaks(text, secrets)]
    return found
