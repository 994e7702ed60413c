"""OSSStorage: listing, batch delete, multipart upload and errors at oss2's HTTP layer; URLs and credentials.

Object operations by key also run against moto in test_conformance.py. What
moto cannot answer in OSS's dialect (listings, batch deletes, multipart
uploads, OSS error codes) is answered here from OSS XML in the form the OSS
API reference documents, through :class:`ReplayAdapter`, so oss2's own
signing, request writing and XML parsing run.
"""

from __future__ import annotations

import base64
import hashlib
import os
import traceback
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import oss2
import pytest
import requests

from funcpipe.errors import (
    BucketNotFound,
    ConfigError,
    IntegrityError,
    ObjectNotFound,
    StorageAccessDenied,
    StorageError,
)
from funcpipe.storage import open_storage
from funcpipe.storage.oss import OSSStorage
from tests.conftest import FAKE_OSS_ENV
from tests.storage.fakes import CannedResponse, ReplayAdapter, canned_http_server

MiB = 2**20
BUCKET = "funcpipe-oss"
ENDPOINT = "https://oss-cn-hangzhou.aliyuncs.com"
SECRETS = (
    FAKE_OSS_ENV["ALIBABA_CLOUD_ACCESS_KEY_ID"],
    FAKE_OSS_ENV["ALIBABA_CLOUD_ACCESS_KEY_SECRET"],
    FAKE_OSS_ENV["ALIBABA_CLOUD_SECURITY_TOKEN"],
)

Answer = tuple[int, dict[str, str], bytes]


def replay(adapter: ReplayAdapter, prefix: str = "", **kwargs: Any) -> OSSStorage:
    return OSSStorage(BUCKET, prefix, endpoint=ENDPOINT, session=oss2.Session(adapter=adapter), **kwargs)


def query(request: requests.PreparedRequest) -> dict[str, list[str]]:
    return parse_qs(urlsplit(request.url or "").query, keep_blank_values=True)


def path(request: requests.PreparedRequest) -> str:
    return unquote(urlsplit(request.url or "").path)


def error_xml(code: str, message: str, **extra: str) -> bytes:
    fields = "".join(f"<{name}>{value}</{name}>" for name, value in extra.items())
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n'
        f"  <Code>{code}</Code>\n  <Message>{message}</Message>\n"
        "  <RequestId>5C3D9175B6FC2012930000FF</RequestId>\n"
        f"  <HostId>{BUCKET}.oss-cn-hangzhou.aliyuncs.com</HostId>{fields}\n</Error>\n"
    ).encode()


def assert_no_secrets(error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))
    for secret in SECRETS:
        assert secret not in text


@pytest.fixture(autouse=True)
def credentials(oss_env: dict[str, str]) -> dict[str, str]:
    return oss_env


# -- listing -----------------------------------------------------------------------------

# Two pages of GetBucket (ListObjects) with encoding-type=url, as OSS answers them.
LIST_PAGE_1 = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult>
  <Name>funcpipe-oss</Name>
  <Prefix>runs%2Fjob-1%2F</Prefix>
  <Marker></Marker>
  <MaxKeys>2</MaxKeys>
  <Delimiter></Delimiter>
  <EncodingType>url</EncodingType>
  <IsTruncated>true</IsTruncated>
  <NextMarker>runs%2Fjob-1%2Fa%2F%C3%BC%20x</NextMarker>
  <Contents>
    <Key>runs%2Fjob-1%2Fa%2F1</Key>
    <LastModified>2024-05-01T08:00:00.000Z</LastModified>
    <ETag>"5B3C1A2E053D763E1B002CC607C5A0FE"</ETag>
    <Type>Normal</Type>
    <Size>344606</Size>
    <StorageClass>Standard</StorageClass>
    <Owner><ID>0022012****</ID><DisplayName>user-example</DisplayName></Owner>
  </Contents>
  <Contents>
    <Key>runs%2Fjob-1%2Fa%2F%C3%BC%20x</Key>
    <LastModified>2024-05-01T08:00:01.000Z</LastModified>
    <ETag>"6C4D2B3F164E874F2C113DD718D6B10F"</ETag>
    <Type>Multipart</Type>
    <Size>10485760</Size>
    <StorageClass>Standard</StorageClass>
    <Owner><ID>0022012****</ID><DisplayName>user-example</DisplayName></Owner>
  </Contents>
</ListBucketResult>
"""

LIST_PAGE_2 = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult>
  <Name>funcpipe-oss</Name>
  <Prefix>runs%2Fjob-1%2F</Prefix>
  <Marker>runs%2Fjob-1%2Fa%2F%C3%BC%20x</Marker>
  <MaxKeys>2</MaxKeys>
  <Delimiter></Delimiter>
  <EncodingType>url</EncodingType>
  <IsTruncated>false</IsTruncated>
  <Contents>
    <Key>runs%2Fjob-1%2Fb%2F0</Key>
    <LastModified>2024-05-01T08:00:02.000Z</LastModified>
    <ETag>"7D5E3C40275F985A3D224EE829E7C210"</ETag>
    <Type>Normal</Type>
    <Size>0</Size>
    <StorageClass>Standard</StorageClass>
    <Owner><ID>0022012****</ID><DisplayName>user-example</DisplayName></Owner>
  </Contents>
  <Contents>
    <Key>runs%2Fjob-1%2Fc%2F</Key>
    <LastModified>2024-05-01T08:00:03.000Z</LastModified>
    <ETag>"D41D8CD98F00B204E9800998ECF8427E"</ETag>
    <Type>Normal</Type>
    <Size>0</Size>
    <StorageClass>Standard</StorageClass>
    <Owner><ID>0022012****</ID><DisplayName>user-example</DisplayName></Owner>
  </Contents>
</ListBucketResult>
"""


def test_list_follows_markers_decodes_keys_and_strips_the_prefix() -> None:
    def handler(request: requests.PreparedRequest) -> Answer:
        marker = query(request).get("marker", [""])[0]
        return 200, {"Content-Type": "application/xml"}, LIST_PAGE_2 if marker else LIST_PAGE_1

    adapter = ReplayAdapter(handler)
    storage = replay(adapter, "runs/job-1", page_size=2)
    # "c/" is a console's folder marker, not an object.
    assert storage.list("") == ["a/1", "a/ü x", "b/0"]
    first, second = adapter.requests
    assert first.method == second.method == "GET"
    assert urlsplit(first.url or "").hostname == f"{BUCKET}.oss-cn-hangzhou.aliyuncs.com"
    assert query(first)["prefix"] == ["runs/job-1/"]
    assert query(first)["max-keys"] == ["2"]
    assert query(first).get("marker", [""]) == [""]
    assert query(second)["marker"] == ["runs/job-1/a/ü x"]


def test_list_with_a_key_prefix_sends_it_whole() -> None:
    adapter = ReplayAdapter(lambda request: (200, {}, LIST_PAGE_2))
    storage = replay(adapter, "runs/job-1")
    assert storage.list("b/") == ["b/0"]
    assert query(adapter.requests[0])["prefix"] == ["runs/job-1/b/"]
    assert query(adapter.requests[0])["max-keys"] == ["1000"]


def test_a_listing_oss2_cannot_parse_is_a_storage_error() -> None:
    """An S3 server's listing (no IsTruncated where OSS puts it) is not OSS's: say so, not a RuntimeError."""
    s3_listing = b"<ListBucketResult><Name>b</Name><Prefix></Prefix></ListBucketResult>"
    storage = replay(ReplayAdapter(lambda request: (200, {}, s3_listing)), "runs/job-1")
    with pytest.raises(StorageError, match=r"not OSS's format.*hint: is the endpoint an OSS endpoint"):
        storage.list("")


# -- batch delete ---------------------------------------------------------------------


def test_delete_many_keys_in_batches_of_1000() -> None:
    bodies: list[list[str]] = []

    def handler(request: requests.PreparedRequest) -> Answer:
        assert request.method == "POST"
        assert "delete" in query(request)
        body = request.body
        assert isinstance(body, bytes)
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        assert request.headers["Content-MD5"] == md5
        root = ElementTree.fromstring(body)
        keys = [unquote(node.text or "") for node in root.iter("Key")]
        bodies.append(keys)
        deleted = "".join(f"<Deleted><Key>{key}</Key></Deleted>" for key in keys)
        return 200, {}, (
            '<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult>'
            f"<EncodingType>url</EncodingType>{deleted}</DeleteResult>"
        ).encode()

    adapter = ReplayAdapter(handler)
    storage = replay(adapter, "p")
    keys = [f"k/{i:04d}" for i in range(1500)]
    storage.delete([*keys, keys[0]])  # a repeated key is sent once
    assert [len(batch) for batch in bodies] == [1000, 500]
    assert bodies[0] + bodies[1] == [f"p/{key}" for key in keys]


def test_delete_one_key_is_one_delete_request() -> None:
    adapter = ReplayAdapter(lambda request: (204, {}, b""))
    replay(adapter, "p").delete(["only"])
    replay(adapter).delete([])
    assert [(request.method, path(request)) for request in adapter.requests] == [("DELETE", "/p/only")]


# -- multipart upload ------------------------------------------------------------------


class MultipartServer:
    """Answers InitiateMultipartUpload, UploadPart, CompleteMultipartUpload and Abort as OSS does."""

    def __init__(self, fail_part: int | None = None) -> None:
        self.parts: dict[int, bytes] = {}
        self.completed: list[tuple[int, str]] = []
        self.aborted = False
        self.fail_part = fail_part

    def __call__(self, request: requests.PreparedRequest) -> Answer:
        params = query(request)
        if request.method == "POST" and "uploads" in params:
            return 200, {}, (
                b'<?xml version="1.0" encoding="UTF-8"?>\n<InitiateMultipartUploadResult>'
                b"<Bucket>funcpipe-oss</Bucket><Key>p/big</Key>"
                b"<UploadId>0004B9894A22E5B1888A1E29F823****</UploadId></InitiateMultipartUploadResult>"
            )
        assert params["uploadId"] == ["0004B9894A22E5B1888A1E29F823****"]
        if request.method == "PUT":
            number = int(params["partNumber"][0])
            if number == self.fail_part:
                return 500, {}, error_xml("InternalError", "We encountered an internal error. Please try again.")
            assert isinstance(request.body, bytes)
            self.parts[number] = request.body
            return 200, {"ETag": f'"{hashlib.md5(request.body).hexdigest().upper()}"'}, b""
        if request.method == "POST":
            assert isinstance(request.body, bytes)
            root = ElementTree.fromstring(request.body)
            self.completed = [
                (int(part.findtext("PartNumber") or 0), (part.findtext("ETag") or "").strip('"'))
                for part in root.iter("Part")
            ]
            return 200, {"ETag": '"097DE458AD02B5F89F9D0530231876B9-3"'}, (
                b'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult>'
                b"<Location>http://funcpipe-oss.oss-cn-hangzhou.aliyuncs.com/p/big</Location>"
                b"<Bucket>funcpipe-oss</Bucket><Key>p/big</Key>"
                b'<ETag>"097DE458AD02B5F89F9D0530231876B9-3"</ETag></CompleteMultipartUploadResult>'
            )
        assert request.method == "DELETE"
        self.aborted = True
        return 204, {}, b""


def test_large_put_is_a_multipart_upload() -> None:
    server = MultipartServer()
    adapter = ReplayAdapter(server)
    storage = replay(adapter, "p", multipart_threshold=5 * MiB, part_size=5 * MiB)
    data = os.urandom(12 * MiB + 1)
    storage.put("big", data)
    assert sorted(server.parts) == [1, 2, 3]
    assert b"".join(server.parts[number] for number in (1, 2, 3)) == data
    assert server.completed == [
        (number, hashlib.md5(server.parts[number]).hexdigest().upper()) for number in (1, 2, 3)
    ]
    assert not server.aborted


def test_failed_multipart_upload_is_aborted() -> None:
    server = MultipartServer(fail_part=2)
    storage = replay(ReplayAdapter(server), "p", multipart_threshold=5 * MiB, part_size=5 * MiB)
    with pytest.raises(StorageError, match=r"InternalError.*HTTP 500") as info:
        storage.put("big", bytes(11 * MiB))
    assert "oss://funcpipe-oss/p/big" in str(info.value)
    assert server.aborted


# -- named errors ------------------------------------------------------------------------


def _every_operation(storage: OSSStorage) -> list[tuple[str, Any]]:
    return [
        ("put", lambda: storage.put("k", b"v")),
        ("create", lambda: storage.create("k", b"v")),
        ("get", lambda: storage.get("k")),
        ("get_if_exists", lambda: storage.get_if_exists("k")),
        ("exists", lambda: storage.exists("k")),
        ("delete one", lambda: storage.delete(["k"])),
        ("delete many", lambda: storage.delete(["k", "l"])),
        ("list", lambda: storage.list("")),
    ]


def answer_error(status: int, body: bytes) -> Any:
    def handler(request: requests.PreparedRequest) -> Answer:
        if request.method == "HEAD":  # OSS puts a HEAD's error into x-oss-err
            return status, {"x-oss-err": base64.b64encode(body).decode()}, b""
        return status, {"Content-Type": "application/xml"}, body

    return handler


def test_missing_bucket() -> None:
    body = error_xml("NoSuchBucket", "The specified bucket does not exist.", BucketName=BUCKET, EC="0015-00000101")
    storage = replay(ReplayAdapter(answer_error(404, body)), "p")
    for name, operation in _every_operation(storage):
        with pytest.raises(BucketNotFound) as info:
            operation()
        assert info.value.bucket == BUCKET, name
        assert f"ossutil mb oss://{BUCKET}" in str(info.value), name
        assert ENDPOINT in str(info.value), name
        assert_no_secrets(info.value)


def test_access_denied() -> None:
    message = "You have no right to access this object because of bucket acl."
    body = error_xml("AccessDenied", message, EC="0003-00000001")
    storage = replay(ReplayAdapter(answer_error(403, body)), "p")
    for name, operation in _every_operation(storage):
        with pytest.raises(StorageAccessDenied) as info:
            operation()
        assert info.value.bucket == BUCKET, name
        assert "RAM policy" in str(info.value), name
        assert f"acs:oss:*:*:{BUCKET}" in str(info.value), name
        assert_no_secrets(info.value)
    with pytest.raises(StorageAccessDenied, match=rf"oss:GetObject on acs:oss:\*:\*:{BUCKET}/p/k"):
        storage.get("k")
    with pytest.raises(StorageAccessDenied, match=rf"oss:ListObjects on acs:oss:\*:\*:{BUCKET}\b"):
        storage.list("")


def test_signature_mismatch_does_not_echo_the_key_id() -> None:
    key_id = FAKE_OSS_ENV["ALIBABA_CLOUD_ACCESS_KEY_ID"]
    body = error_xml(
        "SignatureDoesNotMatch",
        "The request signature we calculated does not match the signature you provided.",
        OSSAccessKeyId=key_id,
        SignatureProvided="kMDk5bXk4aW4yN3A=",
        StringToSign="GET\n\n\nWed, 01 May 2024 08:00:00 GMT\n/funcpipe-oss/p/k",
    )
    storage = replay(ReplayAdapter(answer_error(403, body)), "p")
    with pytest.raises(StorageAccessDenied, match="refused the credentials") as info:
        storage.get("k")
    assert "ALIBABA_CLOUD_ACCESS_KEY_ID" in str(info.value)
    assert info.value.__cause__ is None
    assert_no_secrets(info.value)


def test_other_server_errors_keep_code_status_and_request_id() -> None:
    body = error_xml("InvalidArgument", "Invalid argument.")
    storage = replay(ReplayAdapter(answer_error(400, body)), "p")
    with pytest.raises(StorageError) as info:
        storage.put("k", b"v")
    message = str(info.value)
    assert "InvalidArgument: Invalid argument." in message
    assert "HTTP 400" in message
    assert "5C3D9175B6FC2012930000FF" in message
    assert not isinstance(info.value, (ObjectNotFound, BucketNotFound, StorageAccessDenied))


def test_missing_key() -> None:
    body = error_xml("NoSuchKey", "The specified key does not exist.", Key="p/k")
    storage = replay(ReplayAdapter(answer_error(404, body)), "p")
    assert storage.get_if_exists("k") is None
    assert not storage.exists("k")
    with pytest.raises(ObjectNotFound) as info:
        storage.get("k")
    assert info.value.key == "k"


# -- credentials ---------------------------------------------------------------------------


def ok(request: requests.PreparedRequest) -> Answer:
    return 200, {"ETag": '"D41D8CD98F00B204E9800998ECF8427E"'}, b""


def test_sts_credentials_from_the_environment_sign_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = ReplayAdapter(ok)
    storage = replay(adapter)
    storage.put("k", b"v")
    request = adapter.requests[-1]
    assert request.headers["Authorization"].startswith(f"OSS {FAKE_OSS_ENV['ALIBABA_CLOUD_ACCESS_KEY_ID']}:")
    assert request.headers["x-oss-security-token"] == FAKE_OSS_ENV["ALIBABA_CLOUD_SECURITY_TOKEN"]
    # A rotated token (Function Compute refreshes them) is used from the next request on.
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "LTAIrotated")
    monkeypatch.setenv("ALIBABA_CLOUD_SECURITY_TOKEN", "rotated-token")
    storage.put("k", b"v")
    assert adapter.requests[-1].headers["Authorization"].startswith("OSS LTAIrotated:")
    assert adapter.requests[-1].headers["x-oss-security-token"] == "rotated-token"
    monkeypatch.delenv("ALIBABA_CLOUD_SECURITY_TOKEN")
    storage.put("k", b"v")
    assert "x-oss-security-token" not in adapter.requests[-1].headers


def test_explicit_credentials_and_signature_v4() -> None:
    adapter = ReplayAdapter(ok)
    storage = OSSStorage(
        BUCKET, endpoint=ENDPOINT, region="cn-hangzhou", access_key_id="LTAIexplicit",
        access_key_secret="explicit-secret", session=oss2.Session(adapter=adapter),
    )
    storage.put("k", b"v")
    authorization = adapter.requests[-1].headers["Authorization"]
    assert authorization.startswith("OSS4-HMAC-SHA256 Credential=LTAIexplicit/")
    assert "/cn-hangzhou/oss/aliyun_v4_request" in authorization
    for text in (storage.url, repr(storage), str(vars(storage))):
        assert "LTAIexplicit" not in text
        assert "explicit-secret" not in text
    assert storage.url == f"oss://{BUCKET}?endpoint={ENDPOINT}&region=cn-hangzhou"


def test_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIBABA_CLOUD_ACCESS_KEY_ID")
    adapter = ReplayAdapter(ok)
    with pytest.raises(StorageAccessDenied, match="no OSS credentials") as info:
        replay(adapter).get("k")
    assert "ALIBABA_CLOUD_ACCESS_KEY_SECRET" in str(info.value)
    assert adapter.requests == []  # nothing unsigned went out


# -- URLs, endpoints, retries --------------------------------------------------------------


def test_url_roundtrip_and_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = OSSStorage.from_url(f"oss://{BUCKET}/runs/a?endpoint={ENDPOINT}&max_attempts=2")
    assert storage.url == f"oss://{BUCKET}/runs/a?endpoint={ENDPOINT}&max_attempts=2"
    assert storage.endpoint == ENDPOINT
    monkeypatch.setenv("OSS_ENDPOINT", "oss-cn-beijing.aliyuncs.com")
    from_env = open_storage(f"oss://{BUCKET}/runs/a")
    assert isinstance(from_env, OSSStorage)
    assert from_env.endpoint == "https://oss-cn-beijing.aliyuncs.com"
    assert from_env.url == f"oss://{BUCKET}/runs/a"  # workers read their own OSS_ENDPOINT


def test_no_endpoint() -> None:
    with pytest.raises(ConfigError, match="OSS_ENDPOINT"):
        OSSStorage.from_url(f"oss://{BUCKET}/p")


@pytest.mark.parametrize(
    ("url", "match"),
    [
        (f"oss://{BUCKET}?colour=red", "unknown parameter 'colour'"),
        (f"oss://{BUCKET}?access_key_secret=x", "credentials"),
        (f"oss://LTAIabc:secret@{BUCKET}/p", "credentials"),
        (f"oss://{BUCKET}?endpoint={ENDPOINT}&max_attempts=0", "positive"),
        ("oss://x", "invalid bucket"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        open_storage(url)
    assert "secret" not in str(info.value).replace("access_key_secret", "")


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="both"):
        OSSStorage(BUCKET, endpoint=ENDPOINT, access_key_id="LTAIx")
    with pytest.raises(ConfigError, match="part_size"):
        OSSStorage(BUCKET, endpoint=ENDPOINT, part_size=1024)


def test_retries_5xx_with_the_session_s_retry_policy() -> None:
    response = CannedResponse(503, error_xml("ServiceUnavailable", "Please reduce your request rate."))
    with canned_http_server(response) as endpoint:
        storage = OSSStorage(BUCKET, endpoint=endpoint, max_attempts=3)
        with pytest.raises(StorageError, match="ServiceUnavailable"):
            storage.get("k")
    assert len(response.requests) == 3


@pytest.mark.parametrize(("operation", "method"), [("put", "PUT"), ("get", "GET")])
def test_throttling_twice_then_ok_succeeds_through_the_session_s_retries(operation: str, method: str) -> None:
    """OSS's 503 is retried by urllib3's Retry in the oss2 session, not by a loop of ours."""
    busy = error_xml("ServiceUnavailable", "Please reduce your request rate.")
    response = CannedResponse(200, b"payload", first=[(503, busy)] * 2)
    with canned_http_server(response) as endpoint:
        storage = OSSStorage(BUCKET, endpoint=endpoint, access_key_id="LTAIx", access_key_secret="s")
        if operation == "put":
            storage.put("k", b"payload")
        else:
            assert storage.get("k") == b"payload"
        storage.close()
    assert [(m, path) for m, path, _ in response.requests] == [(method, f"/{BUCKET}/k")] * 3


@pytest.mark.parametrize("altered", [False, True], ids=["same", "altered"])
@pytest.mark.parametrize("operation", ["put", "create", "get"])
def test_the_crc_oss_reports_is_checked(operation: str, altered: bool) -> None:
    """oss2's own check is off (its one-shot body streams broke retries): the storage checks instead."""
    data = b"payload"
    crc = oss2.utils.Crc64(0)
    crc.update(data)
    headers = {"x-oss-hash-crc64ecma": str(crc.crc ^ 1 if altered else crc.crc), "ETag": '"E"'}
    storage = replay(ReplayAdapter(lambda request: (200, headers, b"" if request.method == "PUT" else data)))

    def run() -> None:
        if operation == "put":
            storage.put("k", data)
        elif operation == "create":
            assert storage.create("k", data) is True
        else:
            assert storage.get("k") == data

    if not altered:
        run()
        return
    with pytest.raises(IntegrityError, match=rf"the CRC-64 of the 7 bytes here is {crc.crc}, OSS reports"):
        run()


def test_unreachable_endpoint() -> None:
    with canned_http_server(CannedResponse(200, b"")) as endpoint:
        pass  # closed now
    storage = OSSStorage(BUCKET, endpoint=endpoint, max_attempts=1)
    with pytest.raises(StorageError, match="cannot reach the OSS endpoint") as info:
        storage.put("k", b"v")
    assert endpoint in str(info.value)
    assert_no_secrets(info.value)


# -- against moto: what the conformance suite does not show -----------------------------------


@pytest.fixture
def moto_oss(moto_endpoint: str) -> Iterator[OSSStorage]:
    import boto3

    bucket = f"oss-{uuid.uuid4().hex[:20]}"
    boto3.session.Session().client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    storage = OSSStorage(bucket, "p", endpoint=moto_endpoint, multiget_threshold=5 * MiB, part_size=5 * MiB)
    yield storage
    storage.close()


def test_large_get_is_parallel_ranged(moto_oss: OSSStorage) -> None:
    data = os.urandom(12 * MiB)
    moto_oss.put("big", data)
    sent: list[dict[str, str]] = []
    original = moto_oss.oss_bucket.get_object

    def spy(key: str, byte_range: Any = None, headers: Any = None, **kwargs: Any) -> Any:
        sent.append({"range": repr(byte_range), **(headers or {})})
        return original(key, byte_range=byte_range, headers=headers, **kwargs)

    moto_oss.oss_bucket.get_object = spy
    assert moto_oss.get("big") == data
    ranges = sorted(entry["range"] for entry in sent)
    assert ranges == sorted(
        ["None", f"(0, {5 * MiB - 1})", f"({5 * MiB}, {10 * MiB - 1})", f"({10 * MiB}, {12 * MiB - 1})"]
    )
    assert all(entry.get("If-Match") for entry in sent if entry["range"] != "None")


def test_repr_and_url_hold_no_credentials(moto_oss: OSSStorage) -> None:
    for text in (repr(moto_oss), moto_oss.url, str(vars(moto_oss))):
        for secret in SECRETS:
            assert secret not in text
    with pytest.raises(ObjectNotFound) as info:
        moto_oss.get("absent")
    assert_no_secrets(info.value)


def test_moto_serves_an_oss_signature_that_looks_like_a_sigv4_scope(moto_oss: OSSStorage) -> None:
    """The test server itself: an OSS V1 signature holding four ``/`` once made moto answer HTTP 500.

    (conftest's moto fixture routes OSS-signed requests to S3; without that, this GET fails.)
    """
    moto_oss.put("k", b"payload")
    url = f"{moto_oss.endpoint}/{moto_oss.bucket}/p/k"
    answer = requests.get(url, headers={"Authorization": "OSS LTAIid:a/b/c/d/e="}, timeout=10)
    assert (answer.status_code, answer.content) == (200, b"payload")


def test_create_forbids_overwriting_as_oss_does() -> None:
    """A PUT with ``x-oss-forbid-overwrite: true`` on a key that holds an object: OSS answers 409
    FileAlreadyExists and keeps the object; ``create`` says it did not create it."""
    objects: dict[str, bytes] = {}

    def handler(request: requests.PreparedRequest) -> Answer:
        name = path(request)
        if request.method == "PUT":
            if request.headers.get("x-oss-forbid-overwrite") == "true" and name in objects:
                return 409, {"Content-Type": "application/xml"}, error_xml(
                    "FileAlreadyExists", "The object you specified already exists and can not be overwritten.")
            objects[name] = bytes(request.body or b"")  # type: ignore[arg-type]
            return 200, {"ETag": '"E"'}, b""
        return 200, {}, objects[name]

    adapter = ReplayAdapter(handler)
    storage = replay(adapter, "p")
    assert storage.create("lease", b"first") is True
    assert storage.create("lease", b"second") is False
    assert [r.headers.get("x-oss-forbid-overwrite") for r in adapter.requests] == ["true", "true"]
    assert storage.get("lease") == b"first"
    storage.put("lease", b"renewed")  # a plain put replaces it
    assert adapter.requests[-2].headers.get("x-oss-forbid-overwrite") is None


def test_a_create_s_other_conflicts_are_errors_not_a_lost_race() -> None:
    body = error_xml("ObjectNotAppendable", "The object is not appendable.")
    storage = replay(ReplayAdapter(answer_error(409, body)), "p")
    with pytest.raises(StorageError, match=r"ObjectNotAppendable: The object is not appendable\..*HTTP 409"):
        storage.create("lease", b"v")
