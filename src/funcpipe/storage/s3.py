"""Storage in an Amazon S3 or S3-compatible bucket (``s3://bucket/prefix``), through boto3."""

from __future__ import annotations

import builtins
import io
import threading
from collections.abc import Iterable
from typing import Any

import boto3
import boto3.exceptions
import botocore.exceptions
import botocore.loaders
import botocore.session
import s3transfer.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from funcpipe.errors import BucketNotFound, ConfigError, ObjectNotFound, StorageAccessDenied, StorageError
from funcpipe.storage.base import POLL_BACKOFF_S, Storage
from funcpipe.storage.bucket_url import (
    check_bucket,
    compose_bucket_url,
    int_param,
    join_key,
    normalize_prefix,
    parse_bucket_url,
)
from funcpipe.storage.file import check_key, check_prefix

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_POOL_CONNECTIONS",
    "DEFAULT_MULTIPART_THRESHOLD",
    "DELETE_BATCH",
    "S3Storage",
]

MiB = 2**20

#: Objects of at least this many bytes go through boto3's transfer manager
#: (multipart upload, parallel ranged download); smaller ones take one request.
DEFAULT_MULTIPART_THRESHOLD = 8 * MiB
#: Part size of multipart transfers; S3 wants at least 5 MiB for every part but the last.
DEFAULT_MULTIPART_CHUNKSIZE = 8 * MiB
#: Threads of one multipart transfer.
DEFAULT_MAX_CONCURRENCY = 8
#: HTTP connections the client keeps: a worker's upload and download threads,
#: its parallel fetches (worker.FETCH_CONNECTIONS) and the transfer manager's
#: threads all share one client, and botocore blocks when the pool is empty.
DEFAULT_MAX_POOL_CONNECTIONS = 32
#: botocore's retry mode and total attempts (first try included). "standard"
#: backs off exponentially on throttling (503 SlowDown), 5xx and connection errors.
DEFAULT_RETRY_MODE = "standard"
DEFAULT_MAX_ATTEMPTS = 5
#: Keys per DeleteObjects request: S3's limit.
DELETE_BATCH = 1000
#: Keys per ListObjectsV2 page: S3's maximum.
DEFAULT_PAGE_SIZE = 1000

_RETRY_MODES = ("adaptive", "legacy", "standard")
_ADDRESSING_STYLES = ("auto", "path", "virtual")
_URL_PARAMS = ("addressing_style", "endpoint_url", "max_attempts", "multipart_threshold", "region", "retry_mode")

# Error codes S3 (and compatible servers) answer when the credentials are refused
# rather than the operation.
_BAD_CREDENTIALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
)
_DENIED = frozenset({"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"})

# The IAM action an API operation needs, for the hint of StorageAccessDenied.
_IAM_ACTION = {
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
    "DeleteObjects": "s3:DeleteObject",
    "ListObjectsV2": "s3:ListBucket",
    "HeadBucket": "s3:ListBucket",
}


class S3Storage(Storage):
    """Objects in one S3 bucket, under an optional key prefix.

    Credentials come only from boto3's standard chain (environment,
    ``~/.aws``, container or instance role); they are never taken as
    arguments, written into :attr:`url` or put in a message. The endpoint is
    ``endpoint_url`` if given, else what boto3 itself reads from
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / the config file, else AWS.

    Small objects take one request each; objects of ``multipart_threshold``
    bytes or more go through boto3's transfer manager (multipart upload,
    parallel ranged download). Retries are botocore's own. The client is
    thread-safe and shared by all threads of the storage.

    Args:
        bucket: the bucket; it must exist.
        prefix: key prefix inside the bucket (``"runs/a"`` stores key ``k`` as ``runs/a/k``).
        endpoint_url: e.g. ``"http://127.0.0.1:9000"`` for an S3-compatible server.
        region: the bucket's region; default from boto3's chain (``AWS_REGION``, ...).
        addressing_style: ``"path"``, ``"virtual"`` or ``"auto"`` (botocore's default).
        retry_mode: botocore retry mode, ``"standard"``, ``"adaptive"`` or ``"legacy"``.
        max_attempts: botocore's total attempts per request, first try included.
        max_pool_connections: HTTP connections kept by the client.
        multipart_threshold: size in bytes from which the transfer manager is used.
        multipart_chunksize: part size of those transfers, bytes.
        max_concurrency: threads per transfer-manager transfer.
        page_size: keys per ListObjectsV2 request (at most 1000).

    Raises:
        ConfigError: a malformed bucket, prefix or setting.
    """

    # A GET is tens of milliseconds and costs money: start at 10 ms, back off to 200 ms.
    poll_initial_s, poll_max_s = POLL_BACKOFF_S["s3"]

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str | None = None,
        retry_mode: str = DEFAULT_RETRY_MODE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        check_bucket("s3", bucket)
        if retry_mode not in _RETRY_MODES:
            raise ConfigError(f"retry_mode must be one of {', '.join(_RETRY_MODES)}, got {retry_mode!r}")
        if addressing_style is not None and addressing_style not in _ADDRESSING_STYLES:
            raise ConfigError(
                f"addressing_style must be one of {', '.join(_ADDRESSING_STYLES)}, got {addressing_style!r}"
            )
        _check_positive("max_attempts", max_attempts)
        _check_positive("max_pool_connections", max_pool_connections)
        _check_positive("multipart_threshold", multipart_threshold)
        _check_positive("max_concurrency", max_concurrency)
        if not 1 <= page_size <= DEFAULT_PAGE_SIZE:
            raise ConfigError(f"page_size must be between 1 and {DEFAULT_PAGE_SIZE}, got {page_size!r}")
        if multipart_chunksize < 5 * MiB:
            raise ConfigError(
                f"multipart_chunksize must be at least 5 MiB ({5 * MiB}), S3's smallest part, "
                f"got {multipart_chunksize!r}"
            )
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.endpoint_url = endpoint_url
        self.region = region
        self._page_size = page_size
        self._multipart_threshold = multipart_threshold
        config = Config(
            retries={"mode": retry_mode, "total_max_attempts": max_attempts},
            max_pool_connections=max_pool_connections,
            **({"s3": {"addressing_style": addressing_style}} if addressing_style else {}),
        )
        try:
            self._client: Any = _new_client(endpoint_url=endpoint_url, region_name=region, config=config)
        except (ValueError, botocore.exceptions.BotoCoreError) as exc:
            raise ConfigError(
                f"cannot create an S3 client for s3://{bucket} (endpoint_url={endpoint_url!r}, "
                f"region={region!r}): {exc}"
            ) from exc
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        # Set once a HeadBucket succeeded, so exists() tells a missing bucket
        # from a missing key (a HEAD of a key answers a bare 404 for both).
        self._bucket_seen = False
        self.url = compose_bucket_url(
            "s3",
            bucket,
            self.prefix,
            {
                "endpoint_url": endpoint_url,
                "region": region,
                "addressing_style": addressing_style,
                "retry_mode": None if retry_mode == DEFAULT_RETRY_MODE else retry_mode,
                "max_attempts": None if max_attempts == DEFAULT_MAX_ATTEMPTS else str(max_attempts),
                "multipart_threshold": (
                    None if multipart_threshold == DEFAULT_MULTIPART_THRESHOLD else str(multipart_threshold)
                ),
            },
        )

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        """Open ``s3://bucket/prefix?endpoint_url=..&region=..``.

        Query parameters (all optional): ``endpoint_url``, ``region``,
        ``addressing_style``, ``retry_mode``, ``max_attempts``,
        ``multipart_threshold`` (bytes). Credentials are never read from the URL.

        Raises:
            ConfigError: the URL is malformed or has an unknown parameter.
        """
        parts = parse_bucket_url(url, "s3", allowed=_URL_PARAMS)
        params = parts.params
        return cls(
            parts.bucket,
            parts.prefix,
            endpoint_url=params.get("endpoint_url") or None,
            region=params.get("region") or None,
            addressing_style=params.get("addressing_style") or None,
            retry_mode=params.get("retry_mode", DEFAULT_RETRY_MODE),
            max_attempts=int_param(params, "max_attempts", DEFAULT_MAX_ATTEMPTS, url),
            multipart_threshold=int_param(params, "multipart_threshold", DEFAULT_MULTIPART_THRESHOLD, url),
        )

    @property
    def client(self) -> Any:
        """The boto3 S3 client (thread-safe), e.g. to attach a ``botocore.stub.Stubber``."""
        return self._client

    # -- the five primitives ------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``; large objects as a multipart upload."""
        name = self._name(key)
        try:
            if len(data) >= self._multipart_threshold:
                self._client.upload_fileobj(io.BytesIO(data), self.bucket, name, Config=self._transfer)
            else:
                body = data if isinstance(data, bytes) else bytes(data)
                self._client.put_object(Bucket=self.bucket, Key=name, Body=body)
        except _SDK_ERRORS as exc:
            raise self._error(exc, "PutObject", name) from exc

    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` unless it holds an object: a PUT with ``If-None-Match: *``
        (S3 answers 412 PreconditionFailed, or 409 ConditionalRequestConflict to a racing write)."""
        name = self._name(key)
        body = data if isinstance(data, bytes) else bytes(data)
        try:
            self._client.put_object(Bucket=self.bucket, Key=name, Body=body, IfNoneMatch="*")
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if _code(exc) in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return False
            if _code(exc) == "NotImplemented" or status == 501:
                raise StorageError(
                    f"S3 PutObject with If-None-Match: * of s3://{self.bucket}/{name} failed: the server at "
                    f"{self._where()} does not implement conditional writes ({_code(exc)}, HTTP {status}); "
                    "funcpipe's job lease needs them: use AWS S3 or an S3-compatible server that supports "
                    "If-None-Match on PutObject"
                ) from exc
            raise self._error(exc, "PutObject", name) from exc
        except _SDK_ERRORS as exc:
            raise self._error(exc, "PutObject", name) from exc
        return True

    def get(self, key: str) -> bytes:
        """Return the bytes under ``key``; raise :class:`ObjectNotFound` if absent."""
        data = self._read(key)
        if data is None:
            raise ObjectNotFound(key, f"no object at key {key!r} (s3://{self.bucket}/{self._name(key)})")
        return data

    def get_if_exists(self, key: str) -> bytes | None:
        """The bytes under ``key``, or ``None``; one GET for objects below the multipart threshold."""
        return self._read(key)

    def _read(self, key: str) -> bytes | None:
        name = self._name(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "NoSuchKey":
                return None
            raise self._error(exc, "GetObject", name) from exc
        except _SDK_ERRORS as exc:
            raise self._error(exc, "GetObject", name) from exc
        body = response["Body"]
        if response["ContentLength"] >= self._multipart_threshold:
            # Large: drop this stream unread and let the transfer manager fetch
            # ranges in parallel (it pins them to one ETag with If-Match).
            body.close()
            return self._download(name)
        try:
            with body:
                data: bytes = body.read()
        except _SDK_ERRORS as exc:
            raise self._error(exc, "GetObject", name) from exc
        return data

    def _download(self, name: str) -> bytes | None:
        buffer = io.BytesIO()
        try:
            self._client.download_fileobj(self.bucket, name, buffer, Config=self._transfer)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None  # deleted since the first GET
            raise self._error(exc, "GetObject", name) from exc
        except _SDK_ERRORS as exc:
            raise self._error(exc, "GetObject", name) from exc
        return buffer.getvalue()

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object (a HEAD request)."""
        name = self._name(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=name)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) not in ("404", "NoSuchKey"):
                raise self._error(exc, "HeadObject", name) from exc
        except _SDK_ERRORS as exc:
            raise self._error(exc, "HeadObject", name) from exc
        else:
            return True
        self._check_bucket()
        return False

    def _check_bucket(self) -> None:
        """Raise :class:`BucketNotFound` if the bucket is missing; checked once per instance."""
        if self._bucket_seen:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket"):
                raise self._missing_bucket("HeadBucket", "") from exc
            raise self._error(exc, "HeadBucket", "") from exc
        except _SDK_ERRORS as exc:
            raise self._error(exc, "HeadBucket", "") from exc
        self._bucket_seen = True

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` with DeleteObjects, 1000 per request; absent keys are ignored.

        Raises:
            ConfigError: ``keys`` is a single string, or holds an invalid key.
            StorageAccessDenied: a key may not be deleted with these credentials.
            StorageError: S3 reported another per-key failure.
        """
        if isinstance(keys, str):
            raise ConfigError(
                f"delete() takes an iterable of keys, got the string {keys!r}; write delete([{keys!r}])"
            )
        names = builtins.list(dict.fromkeys(self._name(key) for key in keys))  # unique, in order
        for start in range(0, len(names), DELETE_BATCH):
            batch = names[start : start + DELETE_BATCH]
            try:
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": name} for name in batch], "Quiet": True},
                )
            except _SDK_ERRORS as exc:
                raise self._error(exc, "DeleteObjects", batch[0]) from exc
            failures = response.get("Errors") or []
            failed = [f for f in failures if f.get("Code") != "NoSuchKey"]  # absent is fine
            if failed:
                first = failed[0]
                code, message, name = first.get("Code", "?"), first.get("Message", ""), first.get("Key", "")
                summary = f"{len(failed)} of {len(batch)} keys, first {name!r}: {code}: {message}"
                if code in _DENIED:
                    raise StorageAccessDenied(
                        self.bucket,
                        name,
                        f"access denied: S3 DeleteObjects in s3://{self.bucket} failed for {summary}; "
                        f"{self._policy_hint('DeleteObjects', name)}",
                    )
                raise StorageError(f"S3 DeleteObjects in s3://{self.bucket} failed for {summary}")

    def list(self, prefix: str) -> builtins.list[str]:
        """Every key starting with ``prefix``, sorted; ListObjectsV2 page by page."""
        check_prefix(prefix)
        full = join_key(self.prefix, prefix)  # "p/" + prefix, or prefix without a storage prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: builtins.list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self._page_size}
            ):
                for item in page.get("Contents", ()):
                    name: str = item["Key"]
                    if not name.endswith("/"):  # skip "folder" markers that consoles create
                        keys.append(name[strip:])
        except _SDK_ERRORS as exc:
            raise self._error(exc, "ListObjectsV2", full) from exc
        keys.sort()
        return keys

    def close(self) -> None:
        """Close the client's HTTP connections."""
        self._client.close()

    # -- helpers --------------------------------------------------------------------

    def _name(self, key: str) -> str:
        check_key(key)
        return join_key(self.prefix, key)

    def _where(self) -> str:
        return self.endpoint_url or self._client.meta.endpoint_url or "AWS"

    def _missing_bucket(self, operation: str, name: str) -> BucketNotFound:
        on = f" of key {name!r}" if name else ""
        return BucketNotFound(
            self.bucket,
            f"S3 bucket {self.bucket!r} does not exist at {self._where()} (NoSuchBucket on {operation}{on}); "
            f"create it with `aws s3 mb s3://{self.bucket}`, or check the bucket name, region and endpoint",
        )

    def _policy_hint(self, operation: str, name: str) -> str:
        action = _IAM_ACTION.get(operation, f"s3:{operation}")
        resource = f"arn:aws:s3:::{self.bucket}" + ("" if action == "s3:ListBucket" else f"/{name or '*'}")
        hint = f"check that the IAM policy of these credentials allows {action} on {resource}"
        if operation in ("GetObject", "HeadObject"):
            hint += (
                f" (without s3:ListBucket on arn:aws:s3:::{self.bucket}, S3 also answers 403 "
                "instead of 404 for a key that does not exist)"
            )
        return hint

    def _error(self, exc: Exception, operation: str, name: str) -> StorageError:
        """Translate a boto3/botocore/s3transfer exception into a funcpipe error.

        Only the service's error code and message go into the text: never a
        credential (botocore keeps those out of ``Error.Message``).
        """
        target = f"s3://{self.bucket}/{name}" if name else f"s3://{self.bucket}"
        if isinstance(exc, botocore.exceptions.ClientError):
            code = _code(exc)
            operation = getattr(exc, "operation_name", operation) or operation
            error = exc.response.get("Error", {})
            message = error.get("Message", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            if code == "NoSuchBucket":
                return self._missing_bucket(operation, name)
            if code in _BAD_CREDENTIALS:
                return StorageAccessDenied(
                    self.bucket,
                    name,
                    f"S3 refused the credentials for {operation} of {target} ({code}: {message}); check the "
                    "credentials boto3's chain found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/"
                    "AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws, the function's role) and that they are "
                    f"meant for {self._where()}",
                )
            if code in _DENIED or status == 403:
                return StorageAccessDenied(
                    self.bucket,
                    name,
                    f"access denied: S3 {operation} of {target} ({code}: {message}); "
                    f"{self._policy_hint(operation, name)}",
                )
            return StorageError(f"S3 {operation} of {target} failed: {code}: {message} (HTTP {status})")
        if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            return StorageAccessDenied(
                self.bucket,
                name,
                f"no usable AWS credentials for S3 {operation} of {target} ({exc}); set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an IAM role "
                "(boto3's standard credential chain)",
            )
        if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectionError):
            return StorageError(
                f"cannot reach the S3 endpoint {self._where()} for {operation} of {target}: {exc}; check "
                "endpoint_url (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) and the network"
            )
        return StorageError(f"S3 {operation} of {target} failed: {type(exc).__name__}: {exc}")


# boto3 sessions are not thread-safe, and each new one parses the S3 service model
# again (~0.2 s): every storage gets a session of its own (so credentials and
# endpoint variables are read afresh) that shares one model loader, under a lock.
_CLIENT_LOCK = threading.Lock()
_LOADER: Any = None


def _new_client(**kwargs: Any) -> Any:
    global _LOADER
    with _CLIENT_LOCK:
        if _LOADER is None:
            _LOADER = botocore.loaders.create_loader()
        core = botocore.session.Session()
        core.register_component("data_loader", _LOADER)
        return boto3.session.Session(botocore_session=core).client("s3", **kwargs)


# Everything boto3 and its transfer manager raise for a failed request.
_SDK_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
    s3transfer.exceptions.RetriesExceededError,
)


def _code(exc: botocore.exceptions.ClientError) -> str:
    code: str = exc.response.get("Error", {}).get("Code", "")
    return code


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")

