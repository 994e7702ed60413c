"""Storage in an Alibaba Cloud OSS bucket (``oss://bucket/prefix``), through oss2."""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import oss2
import oss2.credentials
import oss2.exceptions
import requests.adapters
from urllib3.util.retry import Retry

from funcpipe.errors import (
    BucketNotFound,
    ConfigError,
    IntegrityError,
    ObjectNotFound,
    StorageAccessDenied,
    StorageError,
)
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
    "ACCESS_KEY_ID_ENV",
    "ACCESS_KEY_SECRET_ENV",
    "DELETE_BATCH",
    "ENDPOINT_ENV",
    "SECURITY_TOKEN_ENV",
    "OSSStorage",
]

MiB = 2**20

#: Where the endpoint comes from when neither the URL nor the constructor names one.
ENDPOINT_ENV = "OSS_ENDPOINT"
#: The variables Function Compute sets in every function (an STS token of the
#: function's role), and that a developer sets by hand (then usually without a token).
ACCESS_KEY_ID_ENV = "ALIBABA_CLOUD_ACCESS_KEY_ID"
ACCESS_KEY_SECRET_ENV = "ALIBABA_CLOUD_ACCESS_KEY_SECRET"
SECURITY_TOKEN_ENV = "ALIBABA_CLOUD_SECURITY_TOKEN"

#: Objects of at least this many bytes are uploaded as a multipart upload...
DEFAULT_MULTIPART_THRESHOLD = 16 * MiB
#: ... and downloaded as parallel ranged GETs pinned to one ETag (oss2's names).
DEFAULT_MULTIGET_THRESHOLD = 16 * MiB
#: Preferred part size (oss2.determine_part_size keeps the count under 10,000).
DEFAULT_PART_SIZE = 8 * MiB
DEFAULT_MAX_CONCURRENCY = 8
#: HTTP connections kept by the storage's oss2 session (see S3Storage for why so many).
DEFAULT_POOL_SIZE = 32
#: Attempts per request, first try included: urllib3's Retry inside the requests
#: adapter that oss2.Session takes, on connection errors and 5xx answers.
DEFAULT_MAX_ATTEMPTS = 5
#: Keys per batch delete request: OSS's limit.
DELETE_BATCH = 1000
#: Keys per ListObjects page: OSS's maximum.
DEFAULT_PAGE_SIZE = 1000

_URL_PARAMS = ("endpoint", "max_attempts", "multiget_threshold", "multipart_threshold", "region")
_BAD_CREDENTIALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "SecurityTokenExpired", "InvalidSecurityToken"}
)
# The RAM action an operation needs, for the hint of StorageAccessDenied.
_RAM_ACTION = {
    "GetObject": "oss:GetObject",
    "HeadObject": "oss:GetObject",
    "PutObject": "oss:PutObject",
    "MultipartUpload": "oss:PutObject",
    "DeleteObject": "oss:DeleteObject",
    "DeleteMultipleObjects": "oss:DeleteObject",
    "ListObjects": "oss:ListObjects",
}


T = TypeVar("T")


class _NoCredentials(Exception):
    """Raised inside oss2's request signing when no credentials are configured."""


class _CredentialsProvider(oss2.credentials.CredentialsProvider):  # type: ignore[misc]  # oss2 is untyped
    """Credentials given explicitly, else the ``ALIBABA_CLOUD_*`` variables, read at every request.

    Reading at every request follows the rotation of a function's STS token.
    Nothing here is ever formatted into a message, a URL or a ``repr``.
    """

    def __init__(self, access_key_id: str | None, access_key_secret: str | None, security_token: str | None) -> None:
        self._static = (
            None
            if access_key_id is None
            else oss2.credentials.Credentials(access_key_id, access_key_secret or "", security_token or "")
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'explicit' if self._static is not None else 'environment'})"

    def get_credentials(self) -> Any:
        if self._static is not None:
            return self._static
        key_id = os.environ.get(ACCESS_KEY_ID_ENV)
        secret = os.environ.get(ACCESS_KEY_SECRET_ENV)
        if not key_id or not secret:
            raise _NoCredentials()
        return oss2.credentials.Credentials(key_id, secret, os.environ.get(SECURITY_TOKEN_ENV, ""))


class OSSStorage(Storage):
    """Objects in one OSS bucket, under an optional key prefix.

    Credentials are ``access_key_id`` / ``access_key_secret`` /
    ``security_token`` if given, else ``ALIBABA_CLOUD_ACCESS_KEY_ID`` /
    ``ALIBABA_CLOUD_ACCESS_KEY_SECRET`` / ``ALIBABA_CLOUD_SECURITY_TOKEN``
    (with a token: STS), read at each request. They never go into :attr:`url`
    (which workers receive), a ``repr`` or a message: a worker re-opening the
    URL uses its own environment, as Function Compute provides it.

    The endpoint is ``endpoint`` if given, else ``$OSS_ENDPOINT``, e.g.
    ``https://oss-cn-hangzhou.aliyuncs.com`` (without a scheme, https is used).
    With ``region`` requests are signed with OSS signature V4, else V1.

    Small objects take one request; objects of ``multipart_threshold`` bytes or
    more use oss2's multipart upload (parts sized by
    :func:`oss2.determine_part_size`), and objects of ``multiget_threshold``
    bytes or more are downloaded as parallel ranged GETs pinned to one ETag.
    Retries: urllib3's ``Retry`` in the requests adapter of the
    ``oss2.Session`` (connection errors, 5xx), and ObjectIterator's own.

    Args:
        bucket: the bucket; it must exist.
        prefix: key prefix inside the bucket.
        endpoint: the OSS endpoint URL.
        region: e.g. ``"cn-hangzhou"``; turns on signature V4.
        access_key_id, access_key_secret, security_token: explicit credentials.
        max_attempts: attempts per request, first try included.
        pool_size: HTTP connections kept.
        connect_timeout: seconds to connect and between bytes read.
        multipart_threshold: size in bytes from which uploads are multipart.
        multiget_threshold: size in bytes from which downloads are parallel ranged GETs.
        part_size: preferred part size, bytes.
        max_concurrency: parallel part uploads / range downloads of one object.
        page_size: keys per ListObjects request (at most 1000).
        session: an ``oss2.Session`` to use instead of one built from the settings above.

    Raises:
        ConfigError: no endpoint, or a malformed bucket, prefix or setting.
    """

    # A GET is tens of milliseconds and costs money: start at 10 ms, back off to 200 ms.
    poll_initial_s, poll_max_s = POLL_BACKOFF_S["oss"]

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        access_key_secret: str | None = None,
        security_token: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout: float = 30.0,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multiget_threshold: int = DEFAULT_MULTIGET_THRESHOLD,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        page_size: int = DEFAULT_PAGE_SIZE,
        session: Any = None,
    ) -> None:
        check_bucket("oss", bucket)
        if (access_key_id is None) != (access_key_secret is None):
            raise ConfigError("give both access_key_id and access_key_secret, or neither (then the environment's)")
        for name, value in (
            ("max_attempts", max_attempts),
            ("pool_size", pool_size),
            ("multipart_threshold", multipart_threshold),
            ("multiget_threshold", multiget_threshold),
            ("max_concurrency", max_concurrency),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 1 <= page_size <= DEFAULT_PAGE_SIZE:
            raise ConfigError(f"page_size must be between 1 and {DEFAULT_PAGE_SIZE}, got {page_size!r}")
        if part_size < oss2.defaults.min_part_size:
            raise ConfigError(
                f"part_size must be at least {oss2.defaults.min_part_size} bytes (OSS's smallest part), "
                f"got {part_size!r}"
            )
        resolved = endpoint or os.environ.get(ENDPOINT_ENV)
        if not resolved:
            raise ConfigError(
                f"no OSS endpoint for oss://{bucket}: set {ENDPOINT_ENV} (e.g. "
                "https://oss-cn-hangzhou.aliyuncs.com) or write oss://bucket/prefix?endpoint=..."
            )
        if "://" not in resolved:
            resolved = "https://" + resolved
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.endpoint = resolved
        self.region = region
        self._multipart_threshold = multipart_threshold
        self._multiget_threshold = multiget_threshold
        self._part_size = part_size
        self._max_concurrency = max_concurrency
        self._page_size = page_size
        self._max_attempts = max_attempts
        if session is None:
            retry = Retry(
                total=max_attempts - 1,
                status_forcelist=(500, 502, 503, 504),
                allowed_methods=None,  # every method: our PUTs, DELETEs and POSTs are idempotent
                backoff_factor=0.2,
                raise_on_status=False,  # hand the last answer to oss2, which raises its error
                respect_retry_after_header=True,
            )
            adapter = requests.adapters.HTTPAdapter(
                pool_connections=pool_size, pool_maxsize=pool_size, max_retries=retry
            )
            session = oss2.Session(adapter=adapter)
        provider = _CredentialsProvider(access_key_id, access_key_secret, security_token)
        auth = oss2.ProviderAuthV4(provider) if region else oss2.ProviderAuth(provider)
        try:
            self._bucket: Any = oss2.Bucket(
                auth, resolved, bucket, session=session, connect_timeout=connect_timeout, region=region,
                # oss2's own CRC check wraps every body in a one-shot stream, which urllib3's
                # Retry cannot rewind: a PUT retried after a 503 went out without its body.
                # Bodies stay bytes, and _check_crc compares the CRC-64 OSS reports.
                enable_crc=False,
            )
        except oss2.exceptions.ClientError as exc:
            raise ConfigError(f"cannot use OSS bucket {bucket!r} at {resolved!r}: {exc}") from exc
        self.url = compose_bucket_url(
            "oss",
            bucket,
            self.prefix,
            {
                "endpoint": endpoint,
                "region": region,
                "max_attempts": None if max_attempts == DEFAULT_MAX_ATTEMPTS else str(max_attempts),
                "multipart_threshold": (
                    None if multipart_threshold == DEFAULT_MULTIPART_THRESHOLD else str(multipart_threshold)
                ),
                "multiget_threshold": (
                    None if multiget_threshold == DEFAULT_MULTIGET_THRESHOLD else str(multiget_threshold)
                ),
            },
        )

    @classmethod
    def from_url(cls, url: str) -> OSSStorage:
        """Open ``oss://bucket/prefix?endpoint=..&region=..``.

        Query parameters (all optional): ``endpoint`` (else ``$OSS_ENDPOINT``),
        ``region``, ``max_attempts``, ``multipart_threshold`` and
        ``multiget_threshold`` (bytes).
        Credentials are never read from the URL.

        Raises:
            ConfigError: the URL is malformed, has an unknown parameter, or no
                endpoint is known.
        """
        parts = parse_bucket_url(url, "oss", allowed=_URL_PARAMS)
        params = parts.params
        return cls(
            parts.bucket,
            parts.prefix,
            endpoint=params.get("endpoint") or None,
            region=params.get("region") or None,
            max_attempts=int_param(params, "max_attempts", DEFAULT_MAX_ATTEMPTS, url),
            multipart_threshold=int_param(params, "multipart_threshold", DEFAULT_MULTIPART_THRESHOLD, url),
            multiget_threshold=int_param(params, "multiget_threshold", DEFAULT_MULTIGET_THRESHOLD, url),
        )

    @property
    def oss_bucket(self) -> Any:
        """The ``oss2.Bucket`` behind this storage."""
        return self._bucket

    # -- the five primitives ------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``; large objects as a multipart upload."""
        name = self._name(key)
        body = data if isinstance(data, bytes) else bytes(data)
        if len(body) >= self._multipart_threshold:
            self._multipart_upload(name, body)
            return
        try:
            result = self._bucket.put_object(name, body)
        except _SDK_ERRORS as exc:
            raise self._error(exc, "PutObject", name) from _cause(exc)
        self._check_crc("PutObject", name, body, result.crc)

    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` unless it holds an object: a PUT with ``x-oss-forbid-overwrite: true``
        (OSS answers 409 FileAlreadyExists)."""
        name = self._name(key)
        body = data if isinstance(data, bytes) else bytes(data)
        try:
            result = self._bucket.put_object(name, body, headers={"x-oss-forbid-overwrite": "true"})
        except oss2.exceptions.ServerError as exc:
            if exc.status == 409 and exc.code == "FileAlreadyExists":
                return False
            raise self._error(exc, "PutObject", name) from _cause(exc)
        except _SDK_ERRORS as exc:
            raise self._error(exc, "PutObject", name) from _cause(exc)
        self._check_crc("PutObject", name, body, result.crc)
        return True

    def _multipart_upload(self, name: str, data: bytes) -> None:
        size = len(data)
        part_size = oss2.determine_part_size(size, preferred_size=self._part_size)
        offsets = range(0, size, part_size)
        try:
            upload_id = self._bucket.init_multipart_upload(name).upload_id
        except _SDK_ERRORS as exc:
            raise self._error(exc, "MultipartUpload", name) from _cause(exc)

        def upload(number: int, offset: int) -> Any:
            part = data[offset : offset + part_size]
            result = self._bucket.upload_part(name, upload_id, number, part)
            self._check_crc(f"UploadPart {number}", name, part, result.crc)
            return oss2.models.PartInfo(number, result.etag, size=min(part_size, size - offset))

        try:
            calls = [(upload, (number, offset)) for number, offset in enumerate(offsets, 1)]
            parts = _run_all(self._max_concurrency, calls)
            self._bucket.complete_multipart_upload(name, upload_id, parts)
        except _SDK_ERRORS as exc:
            self._abort(name, upload_id)
            raise self._error(exc, "MultipartUpload", name) from _cause(exc)
        except BaseException:
            self._abort(name, upload_id)
            raise

    def _abort(self, name: str, upload_id: str) -> None:
        # Best effort: a bucket lifecycle rule removes parts an abort leaves behind.
        with contextlib.suppress(*_SDK_ERRORS):
            self._bucket.abort_multipart_upload(name, upload_id)

    def get(self, key: str) -> bytes:
        """Return the bytes under ``key``; raise :class:`ObjectNotFound` if absent."""
        data = self._read(key)
        if data is None:
            raise ObjectNotFound(key, f"no object at key {key!r} (oss://{self.bucket}/{self._name(key)})")
        return data

    def get_if_exists(self, key: str) -> bytes | None:
        """The bytes under ``key``, or ``None``; one GET for objects below the multipart threshold."""
        return self._read(key)

    def _read(self, key: str) -> bytes | None:
        name = self._name(key)
        # A large object is fetched in ranges pinned to the ETag of the first
        # answer; if it is replaced meanwhile (412), start over once.
        for _ in range(2):
            try:
                result = self._bucket.get_object(name)
            except oss2.exceptions.NoSuchKey:
                return None
            except _SDK_ERRORS as exc:
                raise self._error(exc, "GetObject", name) from _cause(exc)
            size = result.content_length
            if size is None or size < self._multiget_threshold:
                try:
                    data: bytes = result.read()
                except _SDK_ERRORS as exc:
                    raise self._error(exc, "GetObject", name) from exc
                self._check_crc("GetObject", name, data, result.server_crc)
                return data
            result.resp.response.close()  # drop the stream unread; ranges follow
            try:
                return self._ranged_download(name, size, result.etag)
            except oss2.exceptions.PreconditionFailed:
                continue
            except oss2.exceptions.NoSuchKey:
                return None
            except _SDK_ERRORS as exc:
                raise self._error(exc, "GetObject", name) from _cause(exc)
        raise StorageError(
            f"OSS object oss://{self.bucket}/{name} was replaced twice while it was being downloaded; "
            "is more than one writer using this key?"
        )

    def _ranged_download(self, name: str, size: int, etag: str) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        part = self._part_size
        headers = {"If-Match": f'"{etag}"'}

        def fetch(start: int) -> None:
            end = min(start + part, size) - 1
            result = self._bucket.get_object(name, byte_range=(start, end), headers=headers)
            chunk = result.read()
            if len(chunk) != end - start + 1:
                raise StorageError(
                    f"OSS returned {len(chunk)} bytes for range {start}-{end} of oss://{self.bucket}/{name}"
                )
            view[start : end + 1] = chunk

        _run_all(self._max_concurrency, [(fetch, (start,)) for start in range(0, size, part)])
        return bytes(buffer)

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object (a HEAD request)."""
        name = self._name(key)
        try:
            found: bool = self._bucket.object_exists(name)
        except _SDK_ERRORS as exc:
            raise self._error(exc, "HeadObject", name) from _cause(exc)
        return found

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys``: one DeleteObject for a single key, else batches of 1000.

        Absent keys are ignored.

        Raises:
            ConfigError: ``keys`` is a single string, or holds an invalid key.
        """
        if isinstance(keys, str):
            raise ConfigError(
                f"delete() takes an iterable of keys, got the string {keys!r}; write delete([{keys!r}])"
            )
        names = builtins.list(dict.fromkeys(self._name(key) for key in keys))  # unique, in order
        if len(names) == 1:  # the common case of a pipeline: one request without an XML body
            try:
                self._bucket.delete_object(names[0])
            except _SDK_ERRORS as exc:
                raise self._error(exc, "DeleteObject", names[0]) from _cause(exc)
            return
        for start in range(0, len(names), DELETE_BATCH):
            batch = names[start : start + DELETE_BATCH]
            try:
                self._bucket.batch_delete_objects(batch)
            except _SDK_ERRORS as exc:
                raise self._error(exc, "DeleteMultipleObjects", batch[0]) from _cause(exc)

    def list(self, prefix: str) -> builtins.list[str]:
        """Every key starting with ``prefix``, sorted; oss2.ObjectIterator page by page."""
        check_prefix(prefix)
        full = join_key(self.prefix, prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: builtins.list[str] = []
        iterator = oss2.ObjectIterator(
            self._bucket, prefix=full, max_keys=self._page_size, max_retries=self._max_attempts
        )
        try:
            for info in iterator:
                name: str = info.key
                if not name.endswith("/"):  # skip "folder" markers that consoles create
                    keys.append(name[strip:])
        except _SDK_ERRORS as exc:
            raise self._error(exc, "ListObjects", full) from _cause(exc)
        except RuntimeError as exc:  # oss2's XML parser: the answer is not OSS's listing format
            if not str(exc).startswith("parse xml"):
                raise
            raise StorageError(
                f"cannot list {full!r} in OSS bucket {self.bucket!r}: the server's ListObjects answer is not "
                f"OSS's format ({exc}); "
                "hint: is the endpoint an OSS endpoint? S3-compatible servers serve OSS objects by key only"
            ) from None
        keys.sort()
        return keys

    def close(self) -> None:
        """Close the HTTP connections of the storage's session."""
        self._bucket.session.session.close()

    # -- helpers --------------------------------------------------------------------

    def _name(self, key: str) -> str:
        check_key(key)
        return join_key(self.prefix, key)

    def _check_crc(self, operation: str, name: str, data: bytes, reported: int | None) -> None:
        """Raise :class:`IntegrityError` if OSS reports a CRC-64 other than that of ``data``."""
        if reported is None:  # S3-compatible servers report none
            return
        crc = oss2.utils.Crc64(0)
        crc.update(data)
        if crc.crc != reported:
            raise IntegrityError(
                f"OSS {operation} of oss://{self.bucket}/{name}: the CRC-64 of the {len(data)} bytes here is "
                f"{crc.crc}, OSS reports {reported}; the data changed in transit; hint: retry, and check "
                "the network path (a proxy) if it happens again"
            )

    def _error(self, exc: BaseException, operation: str, name: str) -> StorageError:
        """Translate an oss2 exception into a funcpipe error (never quoting credentials)."""
        target = f"oss://{self.bucket}/{name}" if name else f"oss://{self.bucket}"
        if isinstance(exc, _NoCredentials):
            return StorageAccessDenied(
                self.bucket,
                name,
                f"no OSS credentials for {operation} of {target}: set {ACCESS_KEY_ID_ENV} and "
                f"{ACCESS_KEY_SECRET_ENV} (and {SECURITY_TOKEN_ENV} for STS), or pass access_key_id/"
                "access_key_secret to OSSStorage",
            )
        if isinstance(exc, oss2.exceptions.ServerError):
            code = exc.code or ""
            where = f"{code}: {exc.message}" if code else f"HTTP {exc.status}"
            request = f"HTTP {exc.status}, request id {exc.request_id or '?'}"
            if isinstance(exc, oss2.exceptions.NoSuchBucket):
                return BucketNotFound(
                    self.bucket,
                    f"OSS bucket {self.bucket!r} does not exist at {self.endpoint} (NoSuchBucket on {operation} "
                    f"of {target}); create it with `ossutil mb oss://{self.bucket}` or in the OSS console, or "
                    "check the bucket name and the endpoint's region",
                )
            if code in _BAD_CREDENTIALS:
                return StorageAccessDenied(
                    self.bucket,
                    name,
                    f"OSS refused the credentials for {operation} of {target} ({code}: {exc.message}; {request}); "
                    f"check {ACCESS_KEY_ID_ENV}/{ACCESS_KEY_SECRET_ENV}/{SECURITY_TOKEN_ENV} (an STS token "
                    "expires) or the explicit credentials, and that they belong to this endpoint's account",
                )
            if isinstance(exc, oss2.exceptions.AccessDenied) or exc.status == 403:
                action = _RAM_ACTION.get(operation, f"oss:{operation}")
                resource = f"acs:oss:*:*:{self.bucket}" + ("" if action == "oss:ListObjects" else f"/{name or '*'}")
                return StorageAccessDenied(
                    self.bucket,
                    name,
                    f"access denied: OSS {operation} of {target} ({where}; {request}); check that the RAM "
                    f"policy of these credentials allows {action} on {resource}",
                )
            return StorageError(f"OSS {operation} of {target} failed: {where} ({request})")
        if isinstance(exc, oss2.exceptions.RequestError):
            return StorageError(
                f"cannot reach the OSS endpoint {self.endpoint} for {operation} of {target} "
                f"after {self._max_attempts} attempt(s): {exc.exception!r}; check the endpoint "
                f"({ENDPOINT_ENV} or ?endpoint=) and the network"
            )
        return StorageError(f"OSS {operation} of {target} failed: {type(exc).__name__}: {exc}")


# Everything oss2 raises for a failed request, and our signal of absent credentials.
_SDK_ERRORS = (oss2.exceptions.OssError, _NoCredentials)

# OSS error details can carry the access key id (SignatureDoesNotMatch echoes
# OSSAccessKeyId and the string to sign), and oss2 prints all details in str():
# for these the SDK exception is not chained into ours.
_CREDENTIAL_CODES = _BAD_CREDENTIALS | {"AccessDenied"}


def _run_all(threads: int, calls: builtins.list[tuple[Callable[..., T], tuple[Any, ...]]]) -> builtins.list[T]:
    """Run ``calls`` on up to ``threads`` threads; their results in order, or the first failure.

    On a failure the calls not yet started are cancelled, so a failed part
    does not wait for every other part to be sent.
    """
    with ThreadPoolExecutor(max(1, min(threads, len(calls)))) as pool:
        futures = [pool.submit(function, *args) for function, args in calls]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _cause(exc: BaseException) -> BaseException | None:
    """``exc``, or ``None`` when its text may carry a credential or it is our own signal."""
    if isinstance(exc, _NoCredentials):
        return None
    if isinstance(exc, oss2.exceptions.ServerError) and (exc.code or "") in _CREDENTIAL_CODES:
        return None
    return exc

