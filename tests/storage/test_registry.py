"""open_storage and register: schemes, entry points, errors and install hints."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import pytest

import funcpipe.storage as storage_module
from funcpipe.errors import ConfigError
from funcpipe.storage import (
    FileStorage,
    MemoryStorage,
    ThrottledStorage,
    open_storage,
    register,
)
from tests.storage import NoPrimitives


class CustomStorage(MemoryStorage):
    """A backend for a made-up scheme: MemoryStorage under ``custom://name``."""

    @classmethod
    def from_url(cls, url: str) -> CustomStorage:
        storage = cls(url.removeprefix("custom://") or "default")
        storage.url = url
        return storage


class NoFromUrl(NoPrimitives):
    """A storage class without from_url."""


class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint."""

    def __init__(self, name: str, value: str, loaded: object) -> None:
        self.name = name
        self.value = value
        self._loaded = loaded

    def load(self) -> object:
        if isinstance(self._loaded, BaseException):
            raise self._loaded
        return self._loaded


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test sees the built-in registry and no installed plugins; changes are undone."""
    monkeypatch.setattr(storage_module, "_REGISTRY", dict(storage_module._REGISTRY))
    monkeypatch.setattr(storage_module, "_PLUGINS", {})
    yield


def test_all_is_sorted_and_complete() -> None:
    assert storage_module.__all__ == sorted(storage_module.__all__)
    for name in storage_module.__all__:
        assert hasattr(storage_module, name)


def test_open_file(tmp_path: Path) -> None:
    storage = open_storage(f"file://{tmp_path}")
    assert isinstance(storage, FileStorage)
    assert storage.root == tmp_path
    assert storage.url == tmp_path.as_uri()


def test_open_memory() -> None:
    storage = open_storage("memory://registry-test")
    assert isinstance(storage, MemoryStorage)
    assert storage.url == "memory://registry-test"
    assert open_storage("memory://").url == "memory://default"


def test_open_throttled() -> None:
    storage = open_storage("throttled+memory://registry-test?latency_ms=1")
    assert isinstance(storage, ThrottledStorage)
    assert isinstance(storage.inner, MemoryStorage)


def test_registry_is_sorted() -> None:
    register("zzz", CustomStorage)
    register("aaa", CustomStorage)
    assert list(storage_module._REGISTRY) == sorted(storage_module._REGISTRY)


def test_unknown_scheme() -> None:
    with pytest.raises(ConfigError) as info:
        open_storage("ftp://x")
    message = str(info.value)
    assert "'ftp://x'" in message
    assert "'ftp'" in message
    assert "known schemes: file, memory, oss, s3, throttled+<url>" in message


def test_no_scheme() -> None:
    with pytest.raises(ConfigError, match="no scheme"):
        open_storage("/tmp/x")


def test_register_class() -> None:
    register("custom", CustomStorage)
    storage = open_storage("custom://reg")
    assert isinstance(storage, CustomStorage)
    assert storage.url == "custom://reg"
    with pytest.raises(ConfigError) as info:
        open_storage("ftp://x")
    assert "custom, file, memory" in str(info.value)


def test_register_dotted_path() -> None:
    register("custom", f"{__name__}:CustomStorage")
    assert isinstance(open_storage("custom://reg"), CustomStorage)


def test_register_twice() -> None:
    register("custom", CustomStorage)
    register("custom", CustomStorage)  # the same target again is fine
    with pytest.raises(ConfigError, match="already registered"):
        register("custom", f"{__name__}:CustomStorage")
    register("custom", f"{__name__}:CustomStorage", clobber=True)


@pytest.mark.parametrize("scheme", ["", "S3", "1x", "a_b", "throttled", "with space"])
def test_register_bad_scheme(scheme: str) -> None:
    with pytest.raises(ConfigError) as info:
        register(scheme, CustomStorage)
    assert repr(scheme) in str(info.value)


@pytest.mark.parametrize("target", ["no_colon", "a:b:c", "mod:", ":Cls", object])
def test_register_bad_target(target: object) -> None:
    with pytest.raises(ConfigError):
        register("custom", target)  # type: ignore[arg-type]


def test_install_hint_when_the_module_is_missing() -> None:
    register("nope", "funcpipe_no_such_module.sub:Storage", install_hint="pip install 'funcpipe[nope]'")
    with pytest.raises(ConfigError) as info:
        open_storage("nope://bucket/key")
    message = str(info.value)
    assert "pip install 'funcpipe[nope]'" in message
    assert "funcpipe_no_such_module" in message
    assert isinstance(info.value.__cause__, ImportError)


def test_missing_class_in_module() -> None:
    register("nope", f"{__name__}:NoSuchClass", install_hint="upgrade it")
    with pytest.raises(ConfigError, match="upgrade it"):
        open_storage("nope://x")


def test_target_without_from_url() -> None:
    register("nofrom", NoFromUrl)
    with pytest.raises(ConfigError, match="from_url"):
        open_storage("nofrom://x")


def test_target_that_is_not_a_storage() -> None:
    register("notstorage", f"{__name__}:FakeEntryPoint")
    with pytest.raises(ConfigError, match="not a Storage"):
        open_storage("notstorage://x")


def test_entry_point_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage_module, "_PLUGINS", None)
    requested: list[str] = []

    def entry_points(*, group: str) -> list[FakeEntryPoint]:
        requested.append(group)
        return [FakeEntryPoint("custom", "thirdparty:CustomStorage", CustomStorage)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert isinstance(open_storage("custom://plugin"), CustomStorage)
    assert isinstance(open_storage("custom://plugin"), CustomStorage)
    assert requested == ["funcpipe.storage"]  # read once, lazily
    with pytest.raises(ConfigError, match="custom, file, memory"):
        open_storage("ftp://x")


def test_entry_point_that_fails_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = FakeEntryPoint("broken", "gone:Storage", ImportError("No module named 'gone'"))
    monkeypatch.setattr(storage_module, "_PLUGINS", {"broken": broken})
    with pytest.raises(ConfigError) as info:
        open_storage("broken://x")
    assert "gone:Storage" in str(info.value)
    assert "No module named 'gone'" in str(info.value)


def test_registered_scheme_wins_over_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = FakeEntryPoint("memory", "thirdparty:Other", CustomStorage)
    monkeypatch.setattr(storage_module, "_PLUGINS", {"memory": plugin})
    assert type(open_storage("memory://x")) is MemoryStorage
