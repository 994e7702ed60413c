"""serverless: the status objects a function reports through, and the driver's watcher that reads them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from funcpipe import binding
from funcpipe.errors import ForeignObject, IntegrityError, WorkerFailed
from funcpipe.executors.serverless import Timing, _Call, _Watcher
from funcpipe.function import _Reporter
from funcpipe.protocol import STATUS_PREFIX
from funcpipe.protocol import decode_status as _read_status
from funcpipe.storage import MemoryStorage
from funcpipe.storage.authenticated import AuthenticatedStorage

KEY = STATUS_PREFIX + "job-b/call-2"
OTHER = STATUS_PREFIX + "job-a/call-7"
RESULT_TIMEOUT_S = 30.0
#: The watcher polls fast; no call here may start late or fall silent.
TIMING = Timing(poll_s=0.001, heartbeat_s=1.0, start_timeout_s=600.0, silence_timeout_s=600.0)

STATUSES: list[dict[str, Any]] = [
    {"state": "started", "beat": 0},
    {"state": "running", "beat": 7},
    {"state": "done", "result": {"stage": 0, "iterations": [{"loss": 0.5}]}},
    {"state": "done", "result": None},
    {"state": "failed", "cause": "ValueError: boom", "traceback": "Traceback ...\n"},
]


@pytest.fixture
def memory() -> Iterator[MemoryStorage]:
    storage = MemoryStorage(f"test-serverless-{uuid.uuid4().hex}")
    yield storage
    storage.clear()


@pytest.mark.parametrize("status", STATUSES, ids=lambda s: s["state"])
def test_what_the_reporter_writes_reads_back(memory: MemoryStorage, status: dict[str, Any]) -> None:
    _Reporter(memory, KEY, heartbeat_s=1.0, remaining_s=None).write(status)
    assert _read_status(memory.get(KEY), KEY) == status


def test_a_status_written_for_another_call_is_refused_naming_both_keys(memory: MemoryStorage) -> None:
    _Reporter(memory, OTHER, heartbeat_s=1.0, remaining_s=None).write({"state": "done", "result": 1})
    with pytest.raises(ForeignObject) as info:
        _read_status(memory.get(OTHER), KEY)
    assert (info.value.key, info.value.written_for) == (KEY, OTHER)


@pytest.mark.parametrize(
    "status",
    [
        {"state": "finished"},
        {"state": 3},
        {"beat": 1},
        {"state": "running"},
        {"state": "running", "beat": "1"},
        {"state": "running", "beat": True},
        {"state": "failed", "cause": "ValueError: boom"},
        {"state": "failed", "cause": None, "traceback": ""},
        {"state": "done"},
    ],
    ids=repr,
)
def test_a_malformed_status_is_an_integrity_error(status: dict[str, Any]) -> None:
    with pytest.raises(IntegrityError) as info:
        _read_status(binding.encode_json(KEY, status), KEY)
    assert not isinstance(info.value, ForeignObject)
    assert repr(KEY) in str(info.value)


#: The status objects' key of the watched call.
SECRET = "c0" * 32


class CountingReads(MemoryStorage):
    """Sets ``read_thrice`` once ``KEY`` has been read three times."""

    def __init__(self, namespace: str) -> None:
        super().__init__(namespace)
        self.reads = 0
        self.read_thrice = threading.Event()

    def get_if_exists(self, key: str) -> bytes | None:
        data = super().get_if_exists(key)
        if key == KEY:
            self.reads += 1
            if self.reads >= 3:
                self.read_thrice.set()
        return data


def watch(storage: MemoryStorage) -> tuple[_Watcher, Future[Any]]:
    watcher = _Watcher(TIMING.poll_s)
    future: Future[Any] = Future()
    watcher.watch(_Call("stage 0 replica 0", KEY, future, invoked=time.monotonic(), status_secret=SECRET),
                  storage, TIMING)
    return watcher, future


def test_the_watcher_does_not_settle_a_call_on_another_calls_status(caplog: pytest.LogCaptureFixture) -> None:
    storage = CountingReads(f"test-serverless-{uuid.uuid4().hex}")
    signed = AuthenticatedStorage(storage, SECRET)  # as the call's function writes
    signed.put(KEY, binding.encode_json(OTHER, {"state": "done", "result": "not this call's"}))
    with caplog.at_level("WARNING", logger="funcpipe.executors.serverless"):
        watcher, future = watch(storage)
        try:
            assert storage.read_thrice.wait(RESULT_TIMEOUT_S)
            # The watcher handles one read before it makes the next: two were handled and ignored.
            assert not future.done()
            _Reporter(signed, KEY, heartbeat_s=1.0, remaining_s=None).write({"state": "done", "result": "mine"})
            assert future.result(timeout=RESULT_TIMEOUT_S) == "mine"
        finally:
            watcher.stop()
            storage.clear()
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and repr(KEY) in warnings[0] and repr(OTHER) in warnings[0], warnings


def test_the_watcher_refuses_a_status_not_written_under_the_calls_secret(memory: MemoryStorage) -> None:
    memory.put(KEY, binding.encode_json(KEY, {"state": "done", "result": "forged"}))
    watcher, future = watch(memory)
    try:
        with pytest.raises(WorkerFailed, match=f"IntegrityError: object {KEY!r} failed its authentication"):
            future.result(timeout=RESULT_TIMEOUT_S)
    finally:
        watcher.stop()


def test_the_watcher_fails_a_call_whose_status_is_malformed(memory: MemoryStorage) -> None:
    AuthenticatedStorage(memory, SECRET).put(KEY, b"\x80\x04\x95 a pickle, say")
    watcher, future = watch(memory)
    try:
        with pytest.raises(WorkerFailed, match=f"IntegrityError: object {KEY!r} is not JSON"):
            future.result(timeout=RESULT_TIMEOUT_S)
    finally:
        watcher.stop()
