"""CountingStorage: requests counted by operation, misses apart, and the counted+ URL."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

from funcpipe.errors import ConfigError, ObjectNotFound
from funcpipe.storage import CountingStorage, FileStorage, MemoryStorage, ThrottledStorage, open_storage
from funcpipe.storage.base import SLEEP
from funcpipe.storage.counting import Request, RequestCounter, counter


def _name() -> str:
    return f"count-{uuid.uuid4().hex[:12]}"


def test_each_operation_counts_once_and_absent_reads_count_as_misses() -> None:
    store = CountingStorage(MemoryStorage(_name()))
    store.put("a/1", b"xyz")
    store.put("a/2", b"")
    assert store.get("a/1") == b"xyz"
    assert store.get_if_exists("a/3") is None
    with pytest.raises(ObjectNotFound):
        store.get("a/4")
    assert store.exists("a/2") and not store.exists("a/5")
    assert store.list("a/") == ["a/1", "a/2"]
    store.delete(["a/1", "a/2", "a/9"])
    assert store.requests.counts() == {
        "PUT": 2, "GET": 3, "HEAD": 2, "LIST": 1, "DELETE": 1, "GET_miss": 2, "HEAD_miss": 1,
    }


def test_a_wait_counts_every_poll_until_the_object_appears() -> None:
    inner = MemoryStorage(_name())
    store = CountingStorage(inner)
    polled = threading.Event()

    def note(request: Request) -> None:
        if request.found is False:
            polled.set()

    store.requests.listen(note)
    writer = threading.Thread(target=lambda: (polled.wait(5), inner.put("k", b"v")))
    writer.start()
    assert store.wait("k", timeout=5) == b"v"
    writer.join()
    counts = store.requests.counts()
    assert counts["GET_miss"] >= 1
    assert counts["GET"] == counts["GET_miss"] + 1  # the polls that missed, and the one that found it


def test_listeners_see_each_request_with_its_key_bytes_and_client() -> None:
    requests = RequestCounter()
    store = CountingStorage(MemoryStorage(_name()), requests, client="worker-3")
    seen: list[Request] = []
    stop = requests.listen(seen.append)
    store.put("k", b"abcd")
    store.get("k")
    stop()
    store.get("k")
    assert seen == [Request("PUT", "k", None, 4, 1, "worker-3"), Request("GET", "k", True, 4, 1, "worker-3")]
    requests.reset()
    assert requests.counts()["GET"] == 0


def test_the_url_shares_one_counter_per_name_and_passes_other_parameters_on() -> None:
    name, space = _name(), _name()
    a = open_storage(f"counted+throttled+memory://{space}?latency_ms=0&counter={name}")
    b = open_storage(a.url)
    assert isinstance(a, CountingStorage) and isinstance(a.inner, ThrottledStorage)
    assert a.url == f"counted+throttled+memory://{space}?counter={name}"
    a.put("k", b"1")
    assert b.get("k") == b"1"
    assert a.requests is b.requests is counter(name)
    assert counter(name).counts()["PUT"] == 1 and counter(name).counts()["GET"] == 1


@pytest.mark.parametrize("url", ["counted+memory://x", "counted+memory://x?counter=a&counter=b",
                                 "counted+memory://x?counter=no/slash"])
def test_a_url_without_exactly_one_good_counter_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="counter"):
        open_storage(url)


def test_a_create_counts_as_one_put_whether_it_creates_or_not() -> None:
    requests = RequestCounter()
    store = CountingStorage(MemoryStorage(_name()), requests)
    seen: list[Request] = []
    requests.listen(seen.append)
    assert store.create("lease", b"abc") is True
    assert store.create("lease", b"de") is False
    assert store.get("lease") == b"abc"
    assert {op: n for op, n in requests.counts().items() if n} == {"PUT": 2, "GET": 1}
    assert [(r.op, r.key, r.nbytes) for r in seen[:2]] == [("PUT", "lease", 3), ("PUT", "lease", 2)]


def test_a_wait_keeps_the_inner_stores_pause_and_clock(tmp_path: Any) -> None:
    # A FileStorage put wakes a waiter on the same root (its doorbell): counting keeps that pause.
    inner = FileStorage(str(tmp_path))
    store = CountingStorage(inner)
    assert store.clock is inner.clock
    assert store.pause_for_wait() is inner.pause_for_wait() is not SLEEP  # the thread's doorbell listener


def test_a_store_with_a_wait_of_its_own_keeps_it_and_it_counts_as_one_get() -> None:
    class OwnWait(MemoryStorage):
        waits = 0

        def wait(self, key: str, timeout: float, *, cancelled: Any = None) -> bytes:
            type(self).waits += 1
            return super().wait(key, timeout, cancelled=cancelled)

    inner = OwnWait(_name())
    inner.put("k", b"v")
    nested = CountingStorage(CountingStorage(inner))
    assert nested.wait("k", 1.0) == b"v" and OwnWait.waits == 1
    assert nested.requests.counts()["GET"] == 1 and nested.inner.requests.counts()["GET"] == 1  # type: ignore[attr-defined]
    # Over a polling store, every poll of the outer counter is one of the inner one's too.
    polling = CountingStorage(CountingStorage(MemoryStorage(_name())))
    with pytest.raises(ObjectNotFound):
        polling.wait("absent", 0.05)
    outer, inner_counts = polling.requests.counts(), polling.inner.requests.counts()  # type: ignore[attr-defined]
    assert outer == inner_counts and outer["GET_miss"] >= 2
