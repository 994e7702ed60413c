"""A storage wrapper that counts requests as an object store bills them: PUT, GET, HEAD, LIST, DELETE.

``counted+<inner url>?counter=<name>`` opens ``<inner url>`` wrapped in a
:class:`CountingStorage` that adds to the process-wide :class:`RequestCounter`
``counter(name)``: every storage a worker opens by that URL in this process
(the ``thread`` executor's workers, the driver) counts into the same counter,
so a benchmark can hold a run's requests against the cost model's
(:func:`funcpipe.costmodel.requests_per_iteration`). Workers in other processes
(Ray, functions) count into their own process's counter.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import re
import threading
from collections.abc import Callable, Iterable
from urllib.parse import unquote_plus

from funcpipe.errors import ConfigError
from funcpipe.storage.base import Pause, Storage

__all__ = ["OPERATIONS", "SCHEME_PREFIX", "CountingStorage", "Request", "RequestCounter", "counter"]

#: ``counted+<inner url>?counter=<name>``
SCHEME_PREFIX = "counted+"

#: The request kinds counted, by the object store's names: ``put``; ``get`` and
#: ``get_if_exists``; ``exists``; ``list``; ``delete`` (one request per call: S3 and OSS
#: delete up to 1000 keys per request, more than a job ever deletes at once).
OPERATIONS = ("PUT", "GET", "HEAD", "LIST", "DELETE")

_NAME = re.compile(r"[A-Za-z0-9._~-]+")


@dataclasses.dataclass(frozen=True)
class Request:
    """One request a :class:`CountingStorage` made.

    Attributes:
        op: one of :data:`OPERATIONS`.
        key: the key (``LIST``: the prefix; ``DELETE``: the first key, ``""`` for none).
        found: ``GET`` / ``HEAD``: whether the object was there (a poll of an
            object not written yet is a ``GET`` that found nothing); else ``None``.
        nbytes: bytes uploaded (``PUT``) or downloaded (``GET``).
        keys: ``DELETE``: how many keys the request deleted; else 1.
        client: the name of the counting storage that made it (see :class:`CountingStorage`).
    """

    op: str
    key: str
    found: bool | None
    nbytes: int
    keys: int
    client: str


class RequestCounter:
    """Requests counted by operation, thread-safe; optionally every request handed to listeners."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._listeners: list[Callable[[Request], None]] = []

    def add(self, request: Request) -> None:
        """Count ``request`` (and, for a ``GET`` or ``HEAD`` that found nothing, one miss of it)."""
        with self._lock:
            self._counts[request.op] += 1
            if request.found is False:
                self._counts[f"{request.op}_miss"] += 1
            listeners = builtins.list(self._listeners)
        for listener in listeners:
            listener(request)

    def counts(self) -> dict[str, int]:
        """Requests so far: every operation of :data:`OPERATIONS`, then ``GET_miss`` and ``HEAD_miss``."""
        with self._lock:
            return {name: self._counts[name] for name in (*OPERATIONS, "GET_miss", "HEAD_miss")}

    def listen(self, listener: Callable[[Request], None]) -> Callable[[], None]:
        """Call ``listener(request)`` for every request from now on (in the requesting thread);
        returns the function that stops it."""
        with self._lock:
            self._listeners.append(listener)

        def stop() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return stop

    def since(self, earlier: dict[str, int]) -> dict[str, int]:
        """Requests counted since :meth:`counts` returned ``earlier``."""
        now = self.counts()
        return {name: now[name] - earlier.get(name, 0) for name in now}

    def reset(self) -> None:
        """Forget the counts (listeners stay)."""
        with self._lock:
            self._counts.clear()


_COUNTERS: dict[str, RequestCounter] = {}
_COUNTERS_LOCK = threading.Lock()


def counter(name: str) -> RequestCounter:
    """The process-wide counter ``counted+...?counter=<name>`` storages add to (made on first use)."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"invalid counter name {name!r}: use letters, digits, '.', '_', '~' or '-'")
    with _COUNTERS_LOCK:
        return _COUNTERS.setdefault(name, RequestCounter())


class CountingStorage(Storage):
    """Wrap ``inner`` and count every request it is asked to make into ``requests``.

    Args:
        inner: the storage that serves the requests.
        requests: the counter to add to (default: a fresh one).
        client: a name for this storage in each :class:`Request` (default: the name
            of the thread that made it, e.g. a worker's).
    """

    def __init__(self, inner: Storage, requests: RequestCounter | None = None, *, client: str | None = None) -> None:
        self.inner = inner
        self.requests = RequestCounter() if requests is None else requests
        self.client = threading.current_thread().name if client is None else client
        self.poll_initial_s = inner.poll_initial_s
        self.poll_max_s = inner.poll_max_s
        self.clock = inner.clock
        self.url = inner.url  # the store it counts (from_url names the counting one)
        self._name: str | None = None

    @classmethod
    def from_url(cls, url: str, open_inner: Callable[[str], Storage]) -> CountingStorage:
        """Open ``counted+<inner url>?counter=<name>``, the inner URL with ``open_inner``.

        The ``counter`` parameter is removed before the inner URL is opened; any
        other query parameters are passed on to it.

        Raises:
            ConfigError: not a counted URL, or ``counter`` is missing, repeated or malformed.
        """
        if not url.startswith(SCHEME_PREFIX):
            raise ConfigError(f"not a counted URL: {url!r}; write {SCHEME_PREFIX}<url>?counter=<name>")
        base, _, query = url[len(SCHEME_PREFIX) :].partition("?")
        names: builtins.list[str] = []
        passed_on: builtins.list[str] = []
        for piece in query.split("&") if query else ():
            raw_name, _, raw_value = piece.partition("=")
            if unquote_plus(raw_name) == "counter":
                names.append(unquote_plus(raw_value))
            else:
                passed_on.append(piece)
        if len(names) != 1:
            raise ConfigError(
                f"{url!r} names {len(names)} counters; write {SCHEME_PREFIX}<url>?counter=<name> (one)"
            )
        storage = cls(open_inner(base + ("?" + "&".join(passed_on) if passed_on else "")), counter(names[0]))
        storage._name = names[0]
        storage.url = _compose_url(storage.inner.url, names[0])
        return storage

    def _add(self, op: str, key: str, found: bool | None = None, nbytes: int = 0, keys: int = 1) -> None:
        self.requests.add(Request(op, key, found, nbytes, keys, self.client))

    def put(self, key: str, data: bytes) -> None:
        """One ``PUT``."""
        try:
            self.inner.put(key, data)
        finally:
            self._add("PUT", key, nbytes=len(data))

    def create(self, key: str, data: bytes) -> bool:
        """One ``PUT`` (a conditional one)."""
        try:
            return self.inner.create(key, data)
        finally:
            self._add("PUT", key, nbytes=len(data))

    def get(self, key: str) -> bytes:
        """One ``GET`` (found or not)."""
        data = None
        try:
            data = self.inner.get(key)
            return data
        finally:
            self._add("GET", key, data is not None, 0 if data is None else len(data))

    def get_if_exists(self, key: str) -> bytes | None:
        """One ``GET``; a miss when the object is not there."""
        data = None
        try:
            data = self.inner.get_if_exists(key)
            return data
        finally:
            self._add("GET", key, data is not None, 0 if data is None else len(data))

    def exists(self, key: str) -> bool:
        """One ``HEAD``."""
        found = False
        try:
            found = self.inner.exists(key)
            return found
        finally:
            self._add("HEAD", key, found)

    def delete(self, keys: Iterable[str]) -> None:
        """One ``DELETE`` of every key (a batched request)."""
        if isinstance(keys, str):
            raise ConfigError(
                f"delete() takes an iterable of keys, got the string {keys!r}; write delete([{keys!r}])"
            )
        keys = builtins.list(keys)
        try:
            self.inner.delete(keys)
        finally:
            self._add("DELETE", keys[0] if keys else "", keys=len(keys))

    def list(self, prefix: str) -> builtins.list[str]:
        """One ``LIST``."""
        try:
            return self.inner.list(prefix)
        finally:
            self._add("LIST", prefix)

    def wait(self, key: str, timeout: float, *, cancelled: Callable[[], bool] | None = None) -> bytes:
        """Poll with :meth:`get_if_exists` (each poll one ``GET``), as :meth:`Storage.wait` does; a store
        with a ``wait`` of its own is left to it, and that wait counts as one ``GET``."""
        if _polls(self.inner):
            return super().wait(key, timeout, cancelled=cancelled)
        data = None
        try:
            data = self.inner.wait(key, timeout, cancelled=cancelled)
            return data
        finally:
            self._add("GET", key, data is not None, 0 if data is None else len(data))

    def pause_for_wait(self) -> Pause:
        """The inner store's pause (a ``FileStorage`` put wakes it early); the polls of a wait are counted."""
        return self.inner.pause_for_wait()

    def close(self) -> None:
        """Close ``inner``."""
        self.inner.close()


def _polls(storage: Storage) -> bool:
    """Whether ``storage.wait`` is :meth:`Storage.wait`'s loop of ``get_if_exists`` (a counting one's, if its
    inner's is): a loop here then sees the same requests."""
    if isinstance(storage, CountingStorage):
        return _polls(storage.inner)
    return type(storage).wait is Storage.wait


def _compose_url(inner_url: str, name: str) -> str:
    if not inner_url:
        return ""  # the inner storage cannot be re-opened by URL, so neither can this
    separator = "&" if "?" in inner_url else "?"
    return f"{SCHEME_PREFIX}{inner_url}{separator}counter={name}"
