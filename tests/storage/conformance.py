"""The behaviour every Storage backend must share; mix into a class that provides ``storage``."""

from __future__ import annotations

import threading

import pytest

from funcpipe.errors import ObjectNotFound, StorageError
from funcpipe.storage import Storage, WaitCancelled


class StorageConformance:
    """Tests run against the ``storage`` fixture, which each backend's test class provides.

    Example::

        class TestMemory(StorageConformance):
            @pytest.fixture
            def storage(self) -> Iterator[Storage]:
                yield MemoryStorage(unique_name())
    """

    # -- put / get ---------------------------------------------------------

    def test_roundtrip(self, storage: Storage) -> None:
        storage.put("job/0/act/1", b"hello")
        assert storage.get("job/0/act/1") == b"hello"

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

    def test_delete_missing_keys_is_fine(self, storage: Storage) -> None:
        storage.put("present", b"1")
        storage.delete(["absent", "deep/absent/key", "present", "present"])
        assert not storage.exists("present")
        storage.delete([])

    def test_delete_many(self, storage: Storage) -> None:
        keys = [f"many/{i % 7}/{i}" for i in range(100)]
        for key in keys:
            storage.put(key, key.encode())
        storage.put("keep/me", b"k")
        storage.delete(key for key in keys)  # any iterable, here a generator
        assert storage.list("many") == []
        assert storage.list("") == ["keep/me"]

    def test_put_after_delete_of_whole_prefix(self, storage: Storage) -> None:
        storage.put("p/q/r", b"1")
        storage.delete(["p/q/r"])
        storage.put("p/q/s", b"2")
        assert storage.list("p/") == ["p/q/s"]

    # -- list ----------------------------------------------------------------

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
