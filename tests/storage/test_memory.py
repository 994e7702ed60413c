"""MemoryStorage: the conformance suite, shared namespaces and URLs."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from funcpipe.errors import ConfigError
from funcpipe.storage import MemoryStorage


def unique_name() -> str:
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def name() -> Iterator[str]:
    name = unique_name()
    yield name
    MemoryStorage(name).clear()


def test_same_name_shares_objects(name: str) -> None:
    first = MemoryStorage(name)
    first.put("k", b"v")
    assert MemoryStorage(name).get("k") == b"v"
    assert MemoryStorage.from_url(f"memory://{name}").get("k") == b"v"


def test_different_names_are_isolated(name: str) -> None:
    MemoryStorage(name).put("k", b"v")
    other = MemoryStorage(unique_name())
    assert not other.exists("k")


def test_instances_in_other_threads_share_objects(name: str) -> None:
    seen: list[bytes] = []

    def reopen_and_read() -> None:
        seen.append(MemoryStorage.from_url(f"memory://{name}").get("k"))

    MemoryStorage(name).put("k", b"v")
    thread = threading.Thread(target=reopen_and_read)
    thread.start()
    thread.join()
    assert seen == [b"v"]


def test_clear(name: str) -> None:
    storage = MemoryStorage(name)
    storage.put("a", b"1")
    MemoryStorage(name).clear()
    assert storage.list("") == []


def test_url() -> None:
    assert MemoryStorage("abc").url == "memory://abc"
    assert MemoryStorage().url == "memory://default"
    assert MemoryStorage.from_url("memory://").name == "default"
    assert MemoryStorage.from_url("memory:///").name == "default"
    assert MemoryStorage.from_url("memory://x-1.y_z").url == "memory://x-1.y_z"


@pytest.mark.parametrize("url", ["memory://a/b", "memory://a?x=1", "memory://a#f", "file:///x"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        MemoryStorage.from_url(url)
    assert url in str(info.value)


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "a:1", "ü"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        MemoryStorage(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("key", ["", "/a", "a//b", "a/", "a/../b", "."])
def test_invalid_keys_are_rejected_like_file_storage(name: str, key: str) -> None:
    with pytest.raises(ConfigError):
        MemoryStorage(name).put(key, b"x")
