"""The behaviour every Storage backend shares, run against every backend.

Backends (the ``storage`` fixture's parameters):

=================  ===========================================================
file               FileStorage in a temporary directory
memory             MemoryStorage in a fresh namespace
throttled-memory   ThrottledStorage over memory, bandwidth and latency in fake time
throttled-file     ThrottledStorage over file, real time, no limits
counting-memory    CountingStorage over memory
s3-moto            S3Storage against moto's S3 server on loopback
s3-moto-prefix     the same under a key prefix
s3-seaweedfs       S3Storage against a real seaweedfs S3 gateway (signatures checked)
oss-moto           OSSStorage against moto's S3 server, which speaks enough of
                   OSS for objects by key (put/get/head/delete), not for
                   listings or batch deletes: tests that need those run on the
                   other backends (``@needs_listing``); OSS listing and batch
                   delete are tested with recorded OSS XML in test_oss.py
=================  ===========================================================

Object stores use a 5 MiB multipart threshold here, so the large object below
(11 MiB) is uploaded or downloaded in parts, and s3-moto-prefix and
s3-seaweedfs list 3 keys per request, so listings span pages.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from funcpipe.errors import ObjectNotFound, StorageError
from funcpipe.storage import (
    CountingStorage,
    FileStorage,
    MemoryStorage,
    Storage,
    ThrottledStorage,
    WaitCancelled,
    open_storage,
)
from funcpipe.storage.bounded import BoundedStorage
from tests.storage.fakes import FakeClock

MiB = 2**20
MB = 10**6

BACKENDS = [
    "file",
    "memory",
    "throttled-memory",
    "throttled-file",
    "counting-memory",
    "bounded-memory",
    "bounded-file",
    "s3-moto",
    "s3-moto-prefix",
    "s3-seaweedfs",
    "oss-moto",
]
LISTING_BACKENDS = [name for name in BACKENDS if name != "oss-moto"]

#: For tests that list keys or delete several at once (see the module docstring).
needs_listing = pytest.mark.parametrize("storage", LISTING_BACKENDS, indirect=True)
#: For tests of conditional creates: every backend (oss-moto through tests/conftest.py's translation of
#: OSS's x-oss-forbid-overwrite into the If-None-Match: * moto honours, answered as OSS does).
#: moto checks then writes without a lock, so its race is won by one through its tiny window, not by design.
needs_conditional_create = pytest.mark.parametrize("storage", BACKENDS, indirect=True)


@functools.cache
def _admin_client(endpoint: str) -> Any:
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _new_bucket(endpoint: str) -> str:
    bucket = f"conf-{uuid.uuid4().hex[:24]}"
    _admin_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


def _empty_bucket(endpoint: str, bucket: str) -> None:
    """Delete every object with boto3 (OSSStorage cannot list on moto); frees the server's memory."""
    client = _admin_client(endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", ())]
        if objects:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    backend: str = request.param
    if backend == "file":
        yield FileStorage(tmp_path / "store")
    elif backend in ("memory", "throttled-memory"):
        inner = MemoryStorage(f"conformance-{uuid.uuid4().hex}")
        if backend == "memory":
            yield inner
        else:
            clock = FakeClock()
            yield ThrottledStorage(
                inner, uplink_bytes_per_s=10 * MB, downlink_bytes_per_s=10 * MB, latency_s=0.02,
                clock=clock, sleep=clock.sleep,
            )
        inner.clear()
    elif backend == "counting-memory":
        name = f"conformance-{uuid.uuid4().hex}"
        counted = open_storage(f"counted+memory://{name}?counter={name}")
        assert isinstance(counted, CountingStorage)
        yield counted
        MemoryStorage(name).clear()
    elif backend == "bounded-memory":
        name = f"conformance-{uuid.uuid4().hex}"
        yield BoundedStorage(MemoryStorage(name), 60.0)
        MemoryStorage(name).clear()
    elif backend == "bounded-file":
        yield BoundedStorage(FileStorage(tmp_path / "store"), 60.0)
    elif backend == "throttled-file":
        yield ThrottledStorage(FileStorage(tmp_path), uplink_bytes_per_s=None, downlink_bytes_per_s=None)
    else:
        yield from _object_store(request, backend)


def _object_store(request: pytest.FixtureRequest, backend: str) -> Iterator[Storage]:
    server = "seaweedfs_endpoint" if backend == "s3-seaweedfs" else "moto_endpoint"
    endpoint: str = request.getfixturevalue(server)
    bucket = _new_bucket(endpoint)
    store: Any
    if backend.startswith("oss"):
        request.getfixturevalue("oss_env")
        from funcpipe.storage.oss import OSSStorage

        # moto cannot parse oss2's multipart upload, so uploads stay single PUTs;
        # downloads of 5 MiB and more are parallel ranged GETs, which moto serves.
        store = OSSStorage(
            bucket, endpoint=endpoint, multipart_threshold=64 * MiB, multiget_threshold=5 * MiB,
            part_size=5 * MiB,
        )
    else:
        from funcpipe.storage.s3 import S3Storage

        # Pages of 3 keys on two of the three, so every listing there spans pages;
        # the default 1000 is covered by test_s3's 1005-key listing.
        store = S3Storage(
            bucket, "runs/job-1" if backend.endswith("prefix") else "", endpoint_url=endpoint,
            region="us-east-1", multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
            page_size=1000 if backend == "s3-moto" else 3,
        )
    yield store
    store.close()
    _empty_bucket(endpoint, bucket)


class TestConformance:
    # -- put / get ---------------------------------------------------------

    def test_roundtrip(self, storage: Storage) -> None:
        storage.put("job/0/act/1", b"hello")
        assert storage.get("job/0/act/1") == b"hello"

    @needs_conditional_create
    def test_create_writes_only_where_nothing_is(self, storage: Storage) -> None:
        assert storage.create("lease/0", b"first") is True
        assert storage.get("lease/0") == b"first"
        assert storage.create("lease/0", b"second") is False
        assert storage.get("lease/0") == b"first"
        storage.put("lease/0", b"renewed")  # a put still replaces it
        assert storage.get("lease/0") == b"renewed"

    @needs_conditional_create
    def test_of_racing_creates_exactly_one_wins(self, storage: Storage) -> None:
        barrier = threading.Barrier(6)
        won: list[int] = []

        def take(n: int) -> None:
            barrier.wait()
            if storage.create("race/key", f"racer {n}".encode()):
                won.append(n)

        threads = [threading.Thread(target=take, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        assert storage.get("race/key") == f"racer {won[0]}".encode()

    def test_roundtrip_empty(self, storage: Storage) -> None:
        storage.put("empty", b"")
        assert storage.get("empty") == b""
        assert storage.exists("empty")
        assert storage.get_if_exists("empty") == b""

    def test_roundtrip_large(self, storage: Storage) -> None:
        # 11 MiB + 3: above the multipart threshold the object-store fixtures set
        # (5 MiB), so it travels as three parts of 5, 5 and 1 MiB + 3 bytes.
        data = bytes(range(256)) * (11 * 2**20 // 256) + b"end"
        storage.put("large/blob", data)
        assert storage.get("large/blob") == data
        assert storage.get_if_exists("large/blob") == data

    def test_put_accepts_bytearray_and_keeps_a_copy(self, storage: Storage) -> None:
        data = bytearray(b"abc")
        storage.put("k", data)  # type: ignore[arg-type]  # bytes-like is fine at runtime
        data[0] = ord("z")
        assert storage.get("k") == b"abc"

    @needs_listing
    def test_overwrite(self, storage: Storage) -> None:
        storage.put("a/k", b"first")
        storage.put("a/k", b"second, longer")
        assert storage.get("a/k") == b"second, longer"
        storage.put("a/k", b"3")
        assert storage.get("a/k") == b"3"
        assert storage.list("a/") == ["a/k"]

    def test_get_missing(self, storage: Storage) -> None:
        with pytest.raises(ObjectNotFound) as info:
            storage.get("no/such/key")
        assert isinstance(info.value, KeyError)
        assert isinstance(info.value, StorageError)
        assert info.value.key == "no/such/key"
        assert "no/such/key" in str(info.value)

    def test_get_if_exists(self, storage: Storage) -> None:
        assert storage.get_if_exists("maybe") is None
        storage.put("maybe", b"yes")
        assert storage.get_if_exists("maybe") == b"yes"

    # -- exists / delete ---------------------------------------------------

    def test_exists(self, storage: Storage) -> None:
        assert not storage.exists("x/y")
        storage.put("x/y", b"1")
        assert storage.exists("x/y")
        assert not storage.exists("x/y2")

    def test_delete(self, storage: Storage) -> None:
        storage.put("d/1", b"1")
        storage.put("d/2", b"2")
        storage.delete(["d/1"])
        assert not storage.exists("d/1")
        assert storage.get("d/2") == b"2"
        with pytest.raises(ObjectNotFound):
            storage.get("d/1")

    @needs_listing
    def test_delete_missing_keys_is_fine(self, storage: Storage) -> None:
        storage.put("present", b"1")
        storage.delete(["absent", "deep/absent/key", "present", "present"])
        assert not storage.exists("present")
        storage.delete([])

    @needs_listing
    def test_delete_many(self, storage: Storage) -> None:
        keys = [f"many/{i % 7}/{i}" for i in range(100)]
        for key in keys:
            storage.put(key, key.encode())
        storage.put("keep/me", b"k")
        storage.delete(key for key in keys)  # any iterable, here a generator
        assert storage.list("many") == []
        assert storage.list("") == ["keep/me"]

    @needs_listing
    def test_put_after_delete_of_whole_prefix(self, storage: Storage) -> None:
        storage.put("p/q/r", b"1")
        storage.delete(["p/q/r"])
        storage.put("p/q/s", b"2")
        assert storage.list("p/") == ["p/q/s"]

    # -- list ----------------------------------------------------------------

    @needs_listing
    def test_list(self, storage: Storage) -> None:
        for key in ["a/b/c", "a/bc/d", "a/x", "b/1", "top"]:
            storage.put(key, b".")
        assert storage.list("") == ["a/b/c", "a/bc/d", "a/x", "b/1", "top"]
        assert storage.list("a/") == ["a/b/c", "a/bc/d", "a/x"]
        assert storage.list("a") == ["a/b/c", "a/bc/d", "a/x"]
        assert storage.list("a/b/") == ["a/b/c"]
        assert storage.list("a/b") == ["a/b/c", "a/bc/d"]  # a string prefix, not a directory
        assert storage.list("a/bc/d") == ["a/bc/d"]
        assert storage.list("t") == ["top"]
        assert storage.list("nothing") == []
        assert storage.list("a/nothing/") == []
        assert storage.list("top/") == []

    @needs_listing
    def test_list_is_sorted(self, storage: Storage) -> None:
        keys = [f"s/{i}" for i in (3, 10, 1, 2, 20)]
        for key in keys:
            storage.put(key, b".")
        assert storage.list("s/") == sorted(keys)

    # -- wait ----------------------------------------------------------------

    def test_wait_present(self, storage: Storage) -> None:
        storage.put("ready", b"go")
        assert storage.wait("ready", timeout=5) == b"go"

    def test_wait_times_out(self, storage: Storage) -> None:
        with pytest.raises(ObjectNotFound) as info:
            storage.wait("never", timeout=0.05)
        assert info.value.key == "never"
        assert "did not appear" in str(info.value)

    def test_wait_cancelled(self, storage: Storage) -> None:
        with pytest.raises(WaitCancelled):
            storage.wait("never", timeout=60, cancelled=lambda: True)

    def test_wait_sees_a_later_put(self, storage: Storage) -> None:
        polls: list[bytes | None] = []
        polled = threading.Event()
        original = storage.get_if_exists

        def get_if_exists(key: str) -> bytes | None:
            data = original(key)
            polls.append(data)
            polled.set()
            return data

        storage.get_if_exists = get_if_exists  # type: ignore[method-assign]  # spy on the polls

        def writer() -> None:
            assert polled.wait(timeout=60)  # only write once the waiter has looked
            storage.put("late", b"arrived")

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            assert storage.wait("late", timeout=60) == b"arrived"
        finally:
            thread.join()
        assert polls[0] is None
        assert polls[-1] == b"arrived"

    # -- concurrency -----------------------------------------------------------

    @needs_listing
    def test_concurrent_puts(self, storage: Storage) -> None:
        errors: list[BaseException] = []

        def put_many(thread_id: int) -> None:
            try:
                for i in range(25):
                    storage.put(f"conc/{thread_id}/{i}", f"{thread_id}:{i}".encode() * 100)
            except BaseException as exc:  # handed to the main thread below
                errors.append(exc)

        threads = [threading.Thread(target=put_many, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(storage.list("conc/")) == 8 * 25
        for t in range(8):
            for i in range(25):
                assert storage.get(f"conc/{t}/{i}") == f"{t}:{i}".encode() * 100

    # -- re-opening by URL, as workers do --------------------------------------------

    def test_reopened_from_url_sees_the_same_objects(self, storage: Storage) -> None:
        storage.put("shared/by-driver", b"weights")
        reopened = open_storage(storage.url)
        try:
            # The driver's bounded wrapper has its inner store's URL: workers re-open that store.
            unwrapped = storage.inner if isinstance(storage, BoundedStorage) else storage
            assert type(reopened) is type(unwrapped)
            assert reopened.url == storage.url
            assert reopened.get("shared/by-driver") == b"weights"
            reopened.put("shared/by-worker", b"activations")
            assert storage.get("shared/by-worker") == b"activations"
            reopened.delete(["shared/by-driver"])
            assert not storage.exists("shared/by-driver")
        finally:
            reopened.close()

    def test_delete_of_one_absent_key(self, storage: Storage) -> None:
        storage.delete(["never/written"])
        assert not storage.exists("never/written")
