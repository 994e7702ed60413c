"""Storage in process memory (``memory://name``), shared by name within a process."""

from __future__ import annotations

import builtins
import re
import threading
from collections.abc import Iterable
from urllib.parse import urlsplit

from funcpipe.errors import ConfigError, ObjectNotFound
from funcpipe.storage.base import POLL_BACKOFF_S, Storage
from funcpipe.storage.file import check_key, check_prefix

__all__ = ["MemoryStorage"]

_NAME = re.compile(r"[A-Za-z0-9._~-]+")


class _Namespace:
    """The objects of one name, and the lock that guards them."""

    __slots__ = ("lock", "objects")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, bytes] = {}


_NAMESPACES: dict[str, _Namespace] = {}
_NAMESPACES_LOCK = threading.Lock()


class MemoryStorage(Storage):
    """A dict in this process; instances with the same ``name`` share objects.

    Workers that run as threads of one process re-open storage by URL and so
    see each other's objects; other processes do not. Thread-safe.

    Args:
        name: the namespace; URL ``memory://<name>``. Letters, digits and
            ``.``, ``_``, ``~``, ``-`` only.
    """

    poll_initial_s, poll_max_s = POLL_BACKOFF_S["memory"]

    def __init__(self, name: str = "default") -> None:
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"invalid memory storage name {name!r}: use letters, digits, '.', '_', '~' "
                "or '-' (it is the host part of memory://<name>)"
            )
        self.name = name
        self.url = f"memory://{name}"
        with _NAMESPACES_LOCK:
            self._ns = _NAMESPACES.setdefault(name, _Namespace())

    @classmethod
    def from_url(cls, url: str) -> MemoryStorage:
        """Open ``memory://name``; ``memory://`` is the namespace ``default``.

        Raises:
            ConfigError: not a ``memory`` URL, or it has a path, query or fragment.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() != "memory":
            raise ConfigError(f"not a memory URL: {url!r}; write memory://name")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"memory URLs take only a name, got {url!r}; write memory://name")
        return cls(parts.netloc or "default")

    def put(self, key: str, data: bytes) -> None:
        """Store a copy of ``data`` under ``key``."""
        check_key(key)
        value = bytes(data)  # bytes are immutable; bytearray/memoryview get copied
        ns = self._ns
        with ns.lock:
            ns.objects[key] = value

    def create(self, key: str, data: bytes) -> bool:
        """Store a copy of ``data`` under ``key`` unless it holds an object (atomic under the namespace's lock)."""
        check_key(key)
        value = bytes(data)
        ns = self._ns
        with ns.lock:
            if key in ns.objects:
                return False
            ns.objects[key] = value
        return True

    def get(self, key: str) -> bytes:
        """Return the bytes under ``key``; raise :class:`ObjectNotFound` if absent."""
        check_key(key)
        ns = self._ns
        with ns.lock:
            data = ns.objects.get(key)
        if data is None:
            raise ObjectNotFound(key)
        return data

    def get_if_exists(self, key: str) -> bytes | None:
        """The bytes under ``key``, or ``None``."""
        check_key(key)
        ns = self._ns
        with ns.lock:
            return ns.objects.get(key)

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""
        check_key(key)
        ns = self._ns
        with ns.lock:
            return key in ns.objects

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys``; absent ones are ignored.

        Raises:
            ConfigError: ``keys`` is a single string, or holds an invalid key.
        """
        if isinstance(keys, str):
            raise ConfigError(
                f"delete() takes an iterable of keys, got the string {keys!r}; write delete([{keys!r}])"
            )
        keys = builtins.list(keys)
        for key in keys:
            check_key(key)
        ns = self._ns
        with ns.lock:
            for key in keys:
                ns.objects.pop(key, None)

    def list(self, prefix: str) -> builtins.list[str]:
        """Every key starting with ``prefix``, sorted."""
        check_prefix(prefix)
        ns = self._ns
        with ns.lock:
            keys = [key for key in ns.objects if key.startswith(prefix)]
        keys.sort()
        return keys

    def clear(self) -> None:
        """Delete every object in this namespace (for every instance sharing it)."""
        ns = self._ns
        with ns.lock:
            ns.objects.clear()
