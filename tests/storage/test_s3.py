"""S3Storage against moto's S3 server on loopback: conformance, transfers, URLs and named errors."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest

import funcpipe.storage as storage_module
from funcpipe.errors import BucketNotFound, ConfigError, ObjectNotFound, StorageAccessDenied, StorageError
from funcpipe.storage import open_storage
from funcpipe.storage.s3 import S3Storage
from tests.conftest import (
    FAKE_ACCESS_KEY_ID,
    FAKE_SECRET_ACCESS_KEY,
    READER_ACCESS_KEY_ID,
    READER_SECRET_ACCESS_KEY,
)
from tests.storage.fakes import CannedResponse, canned_http_server

MiB = 2**20


def new_bucket(endpoint: str) -> str:
    bucket = f"test-{uuid.uuid4().hex[:20]}"
    raw_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


@functools.cache
def raw_client(endpoint: str) -> Any:
    """A boto3 client of our own, to look at the bucket behind the storage's back."""
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


class Calls:
    """Records the S3 operations a client is asked for, with their API parameters (before retries)."""

    def __init__(self, client: Any) -> None:
        self.names: list[str] = []
        self.params: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        client.meta.events.register("before-parameter-build.s3", self._record)

    def _record(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        with self._lock:
            self.names.append(model.name)
            self.params.append(params)

    def count(self, name: str) -> int:
        return self.names.count(name)


@pytest.fixture
def bucket(moto_endpoint: str) -> str:
    return new_bucket(moto_endpoint)


def make_storage(endpoint: str, bucket: str, prefix: str = "", **kwargs: Any) -> S3Storage:
    # multipart_threshold at S3's smallest part size, so the conformance suite's
    # large object (11 MiB) travels in three parts.
    kwargs.setdefault("multipart_threshold", 5 * MiB)
    kwargs.setdefault("multipart_chunksize", 5 * MiB)
    return S3Storage(bucket, prefix, endpoint_url=endpoint, region="us-east-1", **kwargs)


@pytest.fixture
def s3(moto_endpoint: str, bucket: str) -> Iterator[S3Storage]:
    storage = make_storage(moto_endpoint, bucket)
    yield storage
    storage.delete(storage.list(""))  # moto keeps objects in memory for the whole session
    storage.close()


# -- layout, transfers and request counts ---------------------------------------------


def test_prefix_maps_keys_into_the_bucket(moto_endpoint: str, bucket: str) -> None:
    storage = make_storage(moto_endpoint, bucket, "/runs/a/")
    storage.put("k/1", b"v")
    client = raw_client(moto_endpoint)
    assert client.get_object(Bucket=bucket, Key="runs/a/k/1")["Body"].read() == b"v"
    client.put_object(Bucket=bucket, Key="runs/ab/other", Body=b"x")  # a sibling prefix, not ours
    client.put_object(Bucket=bucket, Key="runs/a/", Body=b"")  # a console's "folder" marker
    assert storage.list("") == ["k/1"]
    assert storage.list("k") == ["k/1"]
    assert storage.url == (
        f"s3://{bucket}/runs/a?endpoint_url={moto_endpoint}&region=us-east-1&multipart_threshold={5 * MiB}"
    )


def test_large_objects_use_multipart_upload_and_ranged_download(moto_endpoint: str, bucket: str) -> None:
    storage = make_storage(moto_endpoint, bucket)
    calls = Calls(storage.client)
    data = os.urandom(12 * MiB)
    storage.put("big", data)
    assert calls.count("CreateMultipartUpload") == 1
    assert calls.count("UploadPart") == 3  # 5 + 5 + 2 MiB
    assert calls.count("PutObject") == 0
    etag = raw_client(moto_endpoint).head_object(Bucket=bucket, Key="big")["ETag"]
    assert etag.endswith('-3"')  # S3's mark of an object assembled from three parts

    calls.names.clear()
    calls.params.clear()
    assert storage.get("big") == data
    ranges = {params["Range"] for params in calls.params if "Range" in params}
    assert ranges == {f"bytes=0-{5 * MiB - 1}", f"bytes={5 * MiB}-{10 * MiB - 1}", f"bytes={10 * MiB}-"}


def test_small_objects_take_one_request(s3: S3Storage) -> None:
    calls = Calls(s3.client)
    s3.put("small", b"x" * 1000)
    assert s3.get_if_exists("small") == b"x" * 1000
    assert s3.get_if_exists("absent") is None
    assert calls.names == ["PutObject", "GetObject", "GetObject"]


def test_exists_checks_the_bucket_once(s3: S3Storage) -> None:
    calls = Calls(s3.client)
    assert not s3.exists("a")
    assert not s3.exists("b")
    s3.put("c", b"")
    assert s3.exists("c")
    assert calls.names == ["HeadObject", "HeadBucket", "HeadObject", "PutObject", "HeadObject"]


def test_list_and_delete_more_than_a_page(moto_endpoint: str, bucket: str) -> None:
    storage = make_storage(moto_endpoint, bucket)
    keys = [f"many/{i:05d}" for i in range(1005)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: storage.put(key, b""), keys))
    storage.put("other/1", b"")
    calls = Calls(storage.client)
    assert storage.list("many/") == keys
    assert calls.count("ListObjectsV2") == 2  # 1000 + 5
    storage.delete([*keys, "many/absent"])
    assert calls.count("DeleteObjects") == 2  # 1000 + 6
    assert storage.list("") == ["other/1"]


def test_list_page_size(moto_endpoint: str, bucket: str) -> None:
    storage = make_storage(moto_endpoint, bucket, page_size=7)
    keys = [f"p/{i:02d}" for i in range(25)]
    for key in reversed(keys):
        storage.put(key, b".")
    calls = Calls(storage.client)
    assert storage.list("p/") == keys
    assert calls.count("ListObjectsV2") == 4
    assert {params["MaxKeys"] for params in calls.params} == {7}


def test_poll_intervals_suit_a_remote_store(s3: S3Storage) -> None:
    # Every poll is a paid GET of tens of milliseconds.
    assert 0.005 <= s3.poll_initial_s <= s3.poll_max_s <= 1.0


# -- URLs, endpoints and the registry ---------------------------------------------------


def test_reopened_from_url_sees_the_same_objects(moto_endpoint: str, bucket: str) -> None:
    storage = make_storage(moto_endpoint, bucket, "job")
    storage.put("a/b", b"written before")
    reopened = open_storage(storage.url)
    assert isinstance(reopened, S3Storage)
    assert reopened.url == storage.url
    assert reopened.get("a/b") == b"written before"
    reopened.put("a/c", b"written by the worker")
    assert storage.list("a/") == ["a/b", "a/c"]


def test_url_with_all_parameters(moto_endpoint: str, bucket: str) -> None:
    url = (
        f"s3://{bucket}/p?endpoint_url={moto_endpoint}&region=us-east-1&addressing_style=path"
        "&retry_mode=adaptive&max_attempts=3&multipart_threshold=6291456"
    )
    storage = open_storage(url)
    assert isinstance(storage, S3Storage)
    assert storage.url == url
    config = storage.client.meta.config
    assert config.retries == {"mode": "adaptive", "total_max_attempts": 3}
    assert config.s3 == {"addressing_style": "path"}
    assert config.max_pool_connections >= 16
    storage.put("k", b"v")
    assert storage.get("k") == b"v"


def test_default_url_is_bare(aws_env: dict[str, str]) -> None:
    storage = S3Storage("my-bucket")
    assert storage.url == "s3://my-bucket"
    assert storage.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}
    assert S3Storage("my-bucket", "a/b").url == "s3://my-bucket/a/b"


def test_endpoint_from_boto3_environment(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, bucket: str) -> None:
    # boto3 itself reads AWS_ENDPOINT_URL_S3; the storage passes no endpoint and
    # does not put the variable's value into its URL.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    storage = S3Storage(bucket)
    assert storage.client.meta.endpoint_url == moto_endpoint
    assert storage.url == f"s3://{bucket}"
    storage.put("via-env", b"1")
    assert open_storage(storage.url).get("via-env") == b"1"


def test_generic_endpoint_from_boto3_environment(
    monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, bucket: str
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    storage = S3Storage(bucket)
    assert storage.client.meta.endpoint_url == moto_endpoint
    assert not storage.exists("x")


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("s3://b", "invalid bucket"),
        ("s3://", "invalid bucket"),
        ("s3://bucket/a/../b", "invalid key prefix"),
        ("s3://bucket?colour=red", "unknown parameter 'colour'"),
        ("s3://bucket?region=a&region=b", "twice"),
        ("s3://bucket?max_attempts=many", "not an integer"),
        ("s3://bucket?max_attempts=0", "positive"),
        ("s3://bucket?retry_mode=eager", "retry_mode"),
        ("s3://bucket?addressing_style=sideways", "addressing_style"),
        ("s3://bucket#frag", "fragment"),
        ("memory://bucket", "not an s3 URL"),
    ],
)
def test_bad_urls(aws_env: dict[str, str], url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        S3Storage.from_url(url)


@pytest.mark.parametrize(
    "url",
    [
        f"s3://{FAKE_ACCESS_KEY_ID}:{FAKE_SECRET_ACCESS_KEY}@bucket/p",
        f"s3://bucket/p?aws_secret_access_key={FAKE_SECRET_ACCESS_KEY}",
        f"s3://bucket/p?access_key_id={FAKE_ACCESS_KEY_ID}",
    ],
)
def test_credentials_in_the_url_are_refused_without_repeating_them(url: str) -> None:
    with pytest.raises(ConfigError, match="credentials") as info:
        open_storage(url)
    assert FAKE_SECRET_ACCESS_KEY not in str(info.value)
    assert FAKE_ACCESS_KEY_ID not in str(info.value)


def test_bad_constructor_settings(aws_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="multipart_chunksize"):
        S3Storage("bucket", multipart_chunksize=MiB)
    with pytest.raises(ConfigError, match="page_size"):
        S3Storage("bucket", page_size=1001)
    with pytest.raises(ConfigError, match="endpoint_url"):
        S3Storage("bucket", endpoint_url="not a url")


def test_registry_opens_s3_and_the_sdk_loads_only_then() -> None:
    code = (
        "import sys, funcpipe, funcpipe.storage\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'SDK imported early'\n"
        "funcpipe.storage.open_storage('s3://some-bucket/p?region=us-east-1')\n"
        "assert 'boto3' in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_src_dir(), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_install_hint_without_boto3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes "import boto3" fail
    monkeypatch.delitem(sys.modules, "funcpipe.storage.s3", raising=False)
    with pytest.raises(ConfigError) as info:
        storage_module.open_storage("s3://some-bucket/p")
    assert "pip install 'funcpipe[aws]'" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def _src_dir() -> str:
    import funcpipe

    return os.path.dirname(os.path.dirname(funcpipe.__file__))


# -- named errors ------------------------------------------------------------------------


def _every_operation(storage: S3Storage) -> list[tuple[str, Callable[[], object]]]:
    return [
        ("put", lambda: storage.put("k", b"v")),
        ("put large", lambda: storage.put("k", b"v" * (5 * MiB))),
        ("create", lambda: storage.create("k", b"v")),
        ("get", lambda: storage.get("k")),
        ("get_if_exists", lambda: storage.get_if_exists("k")),
        ("exists", lambda: storage.exists("k")),
        ("delete", lambda: storage.delete(["k"])),
        ("list", lambda: storage.list("")),
    ]


def assert_no_credentials(error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))  # the whole chain, causes included
    assert FAKE_ACCESS_KEY_ID not in text
    assert FAKE_SECRET_ACCESS_KEY not in text


def test_missing_bucket(moto_endpoint: str) -> None:
    storage = make_storage(moto_endpoint, "no-such-bucket-funcpipe")
    for name, operation in _every_operation(storage):
        with pytest.raises(BucketNotFound) as info:
            operation()
        error = info.value
        assert error.bucket == "no-such-bucket-funcpipe", name
        assert "aws s3 mb s3://no-such-bucket-funcpipe" in str(error), name
        assert moto_endpoint in str(error), name
        assert_no_credentials(error)


def access_denied() -> CannedResponse:
    return CannedResponse(
        403,
        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
        b"<Message>Access Denied</Message><RequestId>1</RequestId></Error>",
        {"Content-Type": "application/xml"},
    )


def test_access_denied(aws_env: dict[str, str]) -> None:
    # moto's server does not enforce IAM; a loopback server that answers 403
    # AccessDenied, as S3 does, drives botocore's real parsing instead.
    response = access_denied()
    with canned_http_server(response) as endpoint:
        storage = S3Storage("locked", "p", endpoint_url=endpoint, region="us-east-1", max_attempts=1)
        for name, operation in _every_operation(storage):
            with pytest.raises(StorageAccessDenied) as info:
                operation()
            error = info.value
            assert error.bucket == "locked", name
            assert "IAM policy" in str(error), name
            assert "arn:aws:s3:::locked" in str(error), name
            assert_no_credentials(error)
        assert any(method == "PUT" for method, _, _ in response.requests)
        # The requests were signed with the fake key: it is in use, yet never shown.
        assert FAKE_ACCESS_KEY_ID in response.requests[0][2]["Authorization"]


def test_access_denied_hint_names_the_action(aws_env: dict[str, str]) -> None:
    with canned_http_server(access_denied()) as endpoint:
        storage = S3Storage("locked", "p", endpoint_url=endpoint, region="us-east-1", max_attempts=1)
        with pytest.raises(StorageAccessDenied, match=r"s3:GetObject on arn:aws:s3:::locked/p/k.*s3:ListBucket"):
            storage.get("k")
        with pytest.raises(StorageAccessDenied, match=r"s3:PutObject on arn:aws:s3:::locked/p/k"):
            storage.put("k", b"")
        with pytest.raises(StorageAccessDenied, match=r"s3:ListBucket on arn:aws:s3:::locked"):
            storage.list("")


def test_rejected_credentials(aws_env: dict[str, str]) -> None:
    response = CannedResponse(
        403,
        b"<Error><Code>InvalidAccessKeyId</Code><Message>The AWS Access Key Id you provided does not "
        b"exist in our records.</Message><AWSAccessKeyId>" + FAKE_ACCESS_KEY_ID.encode() + b"</AWSAccessKeyId></Error>",
    )
    with canned_http_server(response) as endpoint:
        storage = S3Storage("bucket", endpoint_url=endpoint, region="us-east-1", max_attempts=1)
        with pytest.raises(StorageAccessDenied, match="refused the credentials") as info:
            storage.get("k")
        assert "AWS_ACCESS_KEY_ID" in str(info.value)
        assert FAKE_ACCESS_KEY_ID not in str(info.value)


def test_no_credentials(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, bucket: str) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    storage = make_storage(moto_endpoint, bucket)
    with pytest.raises(StorageAccessDenied, match="no usable AWS credentials") as info:
        storage.get("k")
    assert "AWS_ACCESS_KEY_ID" in str(info.value)


def test_unreachable_endpoint(aws_env: dict[str, str]) -> None:
    with canned_http_server(access_denied()) as endpoint:
        pass  # now closed: nothing listens on that port
    storage = S3Storage("bucket", endpoint_url=endpoint, region="us-east-1", max_attempts=1)
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint") as info:
        storage.get("k")
    assert endpoint in str(info.value)


def test_other_service_errors_keep_code_and_status(aws_env: dict[str, str]) -> None:
    response = CannedResponse(400, b"<Error><Code>InvalidRequest</Code><Message>odd</Message></Error>")
    with canned_http_server(response) as endpoint:
        storage = S3Storage("bucket", endpoint_url=endpoint, region="us-east-1", max_attempts=1)
        with pytest.raises(StorageError, match=r"InvalidRequest: odd \(HTTP 400\)") as info:
            storage.put("k", b"v")
    assert "s3://bucket/k" in str(info.value)
    assert not isinstance(info.value, (ObjectNotFound, BucketNotFound, StorageAccessDenied))


@pytest.mark.parametrize(
    ("status", "code"), [(412, "PreconditionFailed"), (409, "ConditionalRequestConflict"), (412, "")])
def test_create_asks_if_none_match_and_a_refusal_is_false(aws_env: dict[str, str], status: int, code: str) -> None:
    response = CannedResponse(status, f"<Error><Code>{code}</Code><Message>m</Message></Error>".encode()
                              if code else b"")
    with canned_http_server(response) as endpoint:
        storage = S3Storage("bucket", "p", endpoint_url=endpoint, region="us-east-1", max_attempts=1)
        assert storage.create("lease", b"v") is False
    [(method, path, headers)] = response.requests
    assert (method, path, headers.get("If-None-Match")) == ("PUT", "/bucket/p/lease", "*")


def test_a_create_on_a_server_without_conditional_writes_says_so(aws_env: dict[str, str]) -> None:
    response = CannedResponse(501, b"<Error><Code>NotImplemented</Code><Message>A header you provided implies "
                                   b"functionality that is not implemented</Message></Error>")
    with canned_http_server(response) as endpoint:
        storage = S3Storage("bucket", endpoint_url=endpoint, region="us-east-1", max_attempts=1)
        with pytest.raises(StorageError, match=r"s3://bucket/lease failed: the server at .* does not implement "
                                               r"conditional writes \(NotImplemented, HTTP 501\)"):
            storage.create("lease", b"v")


def test_other_create_errors_are_mapped_as_a_put_s(aws_env: dict[str, str]) -> None:
    response = CannedResponse(409, b"<Error><Code>OperationAborted</Code><Message>busy</Message></Error>")
    with canned_http_server(response) as endpoint:
        storage = S3Storage("bucket", endpoint_url=endpoint, region="us-east-1", max_attempts=1)
        with pytest.raises(StorageError, match=r"OperationAborted: busy \(HTTP 409\)"):
            storage.create("lease", b"v")


def test_retries_are_botocore_s(aws_env: dict[str, str]) -> None:
    response = CannedResponse(503, b"<Error><Code>SlowDown</Code><Message>Please reduce</Message></Error>")
    with canned_http_server(response) as endpoint:
        storage = S3Storage("bucket", endpoint_url=endpoint, region="us-east-1", max_attempts=3)
        with pytest.raises(StorageError, match="SlowDown"):
            storage.get("k")
    assert len(response.requests) == 3


@pytest.mark.parametrize(("operation", "method"), [("put", "PUT"), ("get", "GET")])
def test_throttling_twice_then_ok_succeeds_through_botocore_s_retries(
    aws_env: dict[str, str], operation: str, method: str
) -> None:
    """S3's 503 SlowDown is retried by botocore (Config(retries=...)), not by a loop of ours."""
    slow_down = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    # (A PutObject answer has no body: botocore takes a 200 with one for an error in disguise.)
    response = CannedResponse(200, b"payload" if operation == "get" else b"", first=[(503, slow_down)] * 2)
    with canned_http_server(response) as endpoint:
        storage = S3Storage("bucket", endpoint_url=endpoint, region="us-east-1")  # the default attempts
        if operation == "put":
            storage.put("k", b"payload")
        else:
            assert storage.get("k") == b"payload"
        storage.close()
    assert [(m, path) for m, path, _ in response.requests] == [(method, "/bucket/k")] * 3


def test_repr_and_url_hold_no_credentials(s3: S3Storage) -> None:
    for text in (repr(s3), s3.url, str(vars(s3))):
        assert FAKE_ACCESS_KEY_ID not in text
        assert FAKE_SECRET_ACCESS_KEY not in text
    assert repr(s3) == f"S3Storage({s3.url!r})"
    with pytest.raises(ObjectNotFound) as info:
        s3.get("missing")
    assert_no_credentials(info.value)


# -- a real server that checks signatures and permissions: seaweedfs ---------------------------


@pytest.fixture
def seaweed_bucket(seaweedfs_endpoint: str) -> str:
    return new_bucket(seaweedfs_endpoint)


def test_seaweedfs_access_denied_for_a_read_only_identity(
    monkeypatch: pytest.MonkeyPatch, seaweedfs_endpoint: str, seaweed_bucket: str
) -> None:
    make_storage(seaweedfs_endpoint, seaweed_bucket).put("k", b"by the writer")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER_SECRET_ACCESS_KEY)
    reader = make_storage(seaweedfs_endpoint, seaweed_bucket)
    assert reader.get("k") == b"by the writer"
    assert reader.list("") == ["k"]
    for name, operation in [
        ("put", lambda: reader.put("k", b"by the reader")),
        ("put large", lambda: reader.put("big", bytes(6 * MiB))),
        ("delete", lambda: reader.delete(["k", "other"])),
    ]:
        with pytest.raises(StorageAccessDenied) as info:
            operation()
        assert info.value.bucket == seaweed_bucket, name
        assert "IAM policy" in str(info.value), name
        text = "".join(traceback.format_exception(info.value))
        for secret in (READER_ACCESS_KEY_ID, READER_SECRET_ACCESS_KEY, FAKE_SECRET_ACCESS_KEY):
            assert secret not in text, name
    assert reader.get("k") == b"by the writer"


def test_seaweedfs_rejects_unknown_credentials(
    monkeypatch: pytest.MonkeyPatch, seaweedfs_endpoint: str, seaweed_bucket: str
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNTOSEAWEED")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unknown-secret-do-not-leak")
    storage = make_storage(seaweedfs_endpoint, seaweed_bucket, max_attempts=1)
    with pytest.raises(StorageAccessDenied) as info:
        storage.get("k")
    text = "".join(traceback.format_exception(info.value))
    assert "unknown-secret-do-not-leak" not in text
    assert "AKIAUNKNOWNTOSEAWEED" not in str(info.value)


def test_seaweedfs_missing_bucket(seaweedfs_endpoint: str) -> None:
    # Reads and deletes only: seaweedfs creates a missing bucket on the first
    # PUT by an identity with the Admin action.
    storage = make_storage(seaweedfs_endpoint, "no-such-bucket-funcpipe")
    for name, operation in _every_operation(storage):
        if name.startswith(("put", "create")):
            continue
        with pytest.raises(BucketNotFound) as info:
            operation()
        assert "aws s3 mb s3://no-such-bucket-funcpipe" in str(info.value), name
