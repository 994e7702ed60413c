"""BoundedStorage: every request waited for at most timeout_s, a hung one a StorageTimeout naming it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from funcpipe.errors import ObjectNotFound, StorageFailure, StorageTimeout
from funcpipe.storage import MemoryStorage
from funcpipe.storage.bounded import BoundedStorage

#: Generous: a request that should time out after TIMEOUT_S must have raised well within this.
TIMEOUT_S = 0.5
WITHIN_S = 30.0


class Hangs(MemoryStorage):
    """Memory storage whose requests of keys starting with ``hang/`` block until ``release`` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.left = threading.Event()
        self.threads: list[threading.Thread] = []

    def _maybe_hang(self, key: str) -> None:
        if key.startswith("hang/"):
            self.threads.append(threading.current_thread())
            self.entered.set()
            self.release.wait(WITHIN_S * 4)
            self.left.set()

    def put(self, key: str, data: bytes) -> None:
        self._maybe_hang(key)
        super().put(key, data)

    def get_if_exists(self, key: str) -> bytes | None:
        self._maybe_hang(key)
        return super().get_if_exists(key)

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for key in keys:
            self._maybe_hang(key)
        super().delete(keys)

    def list(self, prefix: str) -> list[str]:
        self._maybe_hang(prefix)
        return super().list(prefix)


@pytest.fixture
def hangs() -> Iterator[Hangs]:
    inner = Hangs(f"bounded-{uuid.uuid4().hex}")
    yield inner
    inner.release.set()
    inner.clear()


def test_every_primitive_reaches_the_inner_store(hangs: Hangs) -> None:
    store = BoundedStorage(hangs, TIMEOUT_S)
    store.put("a/1", b"xyz")
    assert store.create("a/2", b"first") is True
    assert store.create("a/2", b"second") is False
    assert hangs.get("a/2") == b"first"
    assert store.get("a/1") == b"xyz"
    assert store.get_if_exists("a/3") is None
    assert store.exists("a/1") and not store.exists("a/3")
    assert store.list("a/") == ["a/1", "a/2"]
    store.delete(["a/1", "a/9"])
    store.delete([])
    assert hangs.list("a/") == ["a/2"]
    assert store.url == hangs.url
    assert (store.poll_initial_s, store.poll_max_s) == (hangs.poll_initial_s, hangs.poll_max_s)


def test_the_inner_stores_errors_reach_the_caller_unchanged(hangs: Hangs) -> None:
    store = BoundedStorage(hangs, TIMEOUT_S)
    with pytest.raises(ObjectNotFound) as info:
        store.get("nothing/here")
    assert info.value.key == "nothing/here"

    class Broken(MemoryStorage):
        def put(self, key: str, data: bytes) -> None:
            raise OSError("disk on fire")

    with pytest.raises(StorageFailure, match="OSError: disk on fire"):
        BoundedStorage(Broken(f"broken-{uuid.uuid4().hex}"), TIMEOUT_S).put("k", b"")


@pytest.mark.parametrize("op", ["put", "get", "wait", "delete", "list"])
def test_a_request_that_hangs_raises_storage_timeout_naming_it(hangs: Hangs, op: str) -> None:
    store = BoundedStorage(hangs, TIMEOUT_S)
    key = "hang/i00000002/input.s0.r0.m1"
    begun = time.monotonic()
    with pytest.raises(StorageTimeout) as info:
        if op == "put":
            store.put(key, b"x" * 1234)
        elif op == "get":
            store.get_if_exists(key)
        elif op == "wait":  # each of its polls is bounded
            store.wait(key, timeout=WITHIN_S * 10)
        elif op == "delete":
            store.delete([key, "hang/other"])
        else:
            store.list(key)
    elapsed = time.monotonic() - begun
    assert hangs.entered.is_set()  # it did hang in the inner store, and was not merely slow to start
    assert TIMEOUT_S <= elapsed < WITHIN_S
    message = str(info.value)
    verb = {"wait": "get", "get": "get"}.get(op, op)
    assert f"{verb} of " in message and repr(key) in message and "within 0.5 s" in message
    assert "a slow link or a hung storage" in message and "Trainer(timeout_s=...)" in message
    if op == "put":
        assert "of 1,234 bytes did not finish" in message
    if op == "delete":
        assert "and 1 more keys" in message
    assert isinstance(info.value, TimeoutError)
    (stuck,) = hangs.threads
    assert stuck.daemon and stuck.is_alive()  # still blocked in the store, but it cannot keep the process up
    hangs.release.set()
    assert hangs.left.wait(WITHIN_S)


def test_a_hung_request_does_not_delay_the_next(hangs: Hangs) -> None:
    store = BoundedStorage(hangs, TIMEOUT_S)
    with pytest.raises(StorageTimeout):
        store.put("hang/a", b"")
    # The pool thread is stuck in the store; the next requests run on another and finish at once.
    for n in range(5):
        store.put(f"ok/{n}", b"v")
        assert store.get(f"ok/{n}") == b"v"
    hangs.release.set()
    assert hangs.wait("hang/a", WITHIN_S) == b""  # the late request completes once the store answers


def test_concurrent_requests_run_side_by_side(hangs: Hangs) -> None:
    store = BoundedStorage(hangs, WITHIN_S)
    hanging = threading.Thread(target=store.put, args=("hang/b", b"late"), daemon=True)
    hanging.start()
    assert hangs.entered.wait(WITHIN_S)
    store.put("ok/c", b"now")  # not queued behind the hung put
    assert hangs.get("ok/c") == b"now" and not hangs.exists("hang/b")
    hangs.release.set()
    hanging.join(WITHIN_S)
    assert hangs.get("hang/b") == b"late"


def test_the_timeout_can_be_changed_and_is_measured_per_request(hangs: Hangs) -> None:
    store = BoundedStorage(hangs, WITHIN_S)
    store.timeout_s = TIMEOUT_S
    with pytest.raises(StorageTimeout, match=r"within 0\.5 s"):
        store.put("hang/x", b"")


HANGS_FOR_EVER = """
import threading, sys
from funcpipe.storage import MemoryStorage
from funcpipe.storage.bounded import BoundedStorage
from funcpipe.errors import StorageTimeout

class Stuck(MemoryStorage):
    def put(self, key, data):
        threading.Event().wait()  # never returns

try:
    BoundedStorage(Stuck("stuck"), 0.2).put("k", b"x")
except StorageTimeout as exc:
    print("timed out:", exc)
    sys.exit(0)
sys.exit(3)
"""


def test_a_request_stuck_for_ever_does_not_keep_the_interpreter_from_exiting(tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[2] / "src"
    done = subprocess.run([sys.executable, "-c", HANGS_FOR_EVER], capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()
    assert b"timed out: storage memory://stuck: put of 'k' of 1 bytes" in done.stdout
