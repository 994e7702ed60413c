"""The object-store interface every storage backend implements."""

from __future__ import annotations

import abc
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

from funcpipe.errors import FuncpipeError, ObjectNotFound, StorageFailure

__all__ = ["SLEEP", "Buffer", "Pause", "Storage", "WaitCancelled"]

#: An object's bytes as :meth:`Storage.put_parts` takes its pieces and :meth:`Storage.wait_view`
#: returns them: ``bytes``, or a read-only view of (part of) a larger buffer, shared, not copied.
Buffer: TypeAlias = bytes | memoryview

log = logging.getLogger(__name__)


class WaitCancelled(Exception):
    """Raised inside :meth:`Storage.wait` when its ``cancelled`` callback says so."""


class Pause:
    """How :meth:`Storage.wait` passes the time between two looks at a key: a plain sleep.

    A store that can tell a waiter something was written (:class:`funcpipe.storage.file.FileStorage`
    on one host) returns one whose :meth:`pause` ends early on a wake-up; any wake-up after
    :meth:`arm` ends the next :meth:`pause` at once, so one between a look and the pause after
    it is not lost.
    """

    def arm(self) -> None:
        """Called right before each look; wake-ups from before it no longer end a pause."""

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less; whether a wake-up ended the pause early (never, here)."""
        time.sleep(seconds)
        return False


#: The plain sleep.
SLEEP = Pause()


#: ``(poll_initial_s, poll_max_s)`` of each store by scheme: how :meth:`Storage.wait` backs off
#: while an object is not there yet. Remote stores raise the floor (a GET costs money). The
#: platforms' descriptions (``Platform.poll_initial_s``, ``poll_max_s``) take theirs from here.
POLL_BACKOFF_S: dict[str, tuple[float, float]] = {
    "s3": (0.01, 0.2),
    "oss": (0.01, 0.2),
    "file": (0.0002, 0.002),
    "memory": (0.0001, 0.001),
}


_WARNED_CREATE: set[type] = set()

#: The methods whose exceptions are translated at the storage boundary (:meth:`Storage.__init_subclass__`).
PRIMITIVES = ("put", "create", "get", "get_if_exists", "exists", "delete", "list")


def _translated(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, raising :class:`~funcpipe.StorageFailure` for any exception that is not funcpipe's."""

    @functools.wraps(method)
    def call(self: Storage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (FuncpipeError, WaitCancelled, MemoryError):
            raise
        except Exception as exc:
            where = getattr(self, "url", "") or type(self).__qualname__
            key = args[0] if args else kwargs.get("key", kwargs.get("prefix"))
            what = f" of {key!r}" if isinstance(key, str) else ""
            raise StorageFailure(
                f"storage {where} failed in {method.__name__}{what}: {type(exc).__name__}: {exc}; hint: the storage "
                f"backend {type(self).__module__}.{type(self).__qualname__} raised it (a network, permission or "
                "plugin error); funcpipe retries it like any storage error (fit(max_retries=...))"
            ) from exc

    call.__funcpipe_translated__ = True  # type: ignore[attr-defined]
    return call


class Storage(abc.ABC):
    """A flat key -> bytes object store.

    Subclasses implement five primitives (``put``, ``get``, ``exists``,
    ``delete``, ``list``); :meth:`wait` is written once here. Keys are
    ``/``-separated strings without a leading slash. Values are bytes; tensors
    travel as safetensors bytes (see :mod:`funcpipe.codec`), never pickle.
    """

    #: The URL this storage was opened from; workers re-open it by URL.
    url: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Translate the exceptions of every primitive a subclass defines (built-in or a plugin's) once,
        at the storage boundary: anything not funcpipe's becomes :class:`~funcpipe.StorageFailure`."""
        super().__init_subclass__(**kwargs)
        for name in PRIMITIVES:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "__funcpipe_translated__", False):
                setattr(cls, name, _translated(method))

    #: First and largest sleep between polls in :meth:`wait`, seconds.
    #: Cheap local stores poll fast; remote ones raise the floor (a GET costs money).
    poll_initial_s: float = 0.0005
    poll_max_s: float = 0.05

    #: The clock :meth:`wait` measures its timeout on (tests replace it).
    clock: Callable[[], float] = staticmethod(time.monotonic)

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there, atomically."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """Return the bytes under ``key``; raise :class:`ObjectNotFound` if absent."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete every key in ``keys``; keys that are absent are ignored."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix``, sorted."""

    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` unless the key holds an object: whether it did (a conditional create).

        Stores implement it atomically (of two creates of one key exactly one
        returns ``True``): files by a hard link, memory under a lock, S3 with
        ``If-None-Match: *``, OSS with ``x-oss-forbid-overwrite``. This default,
        for stores that do not, looks then writes: two drivers racing may both
        succeed; it warns once per class.

        On an object store whose SDK retries a PUT, a create whose first attempt
        was stored but whose answer was lost returns ``False`` on the retry: a
        caller that must tell compares the stored bytes with its own.
        """
        cls = type(self)
        if cls not in _WARNED_CREATE:
            _WARNED_CREATE.add(cls)
            log.warning("%s.%s has no atomic create(); funcpipe's job lease falls back to a check then a put, "
                        "which two drivers starting at the same moment can both pass", cls.__module__, cls.__qualname__)
        if self.exists(key):
            return False
        self.put(key, data)
        return True

    def put_parts(self, key: str, parts: Sequence[Buffer]) -> None:
        """:meth:`put` the object whose bytes are ``parts`` one after another (joined once, here).

        For objects made of pieces (a header, then tensor memory): a wrapper that adds
        bytes of its own (:class:`funcpipe.storage.authenticated.AuthenticatedStorage`'s
        tag) joins them in the same copy. ``parts`` are read before this returns, never after.
        """
        self.put(key, b"".join(parts))

    def wait_view(
        self,
        key: str,
        timeout: float,
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> Buffer:
        """:meth:`wait`, for a reader that takes a view: the bytes may come as a read-only
        ``memoryview`` of a larger buffer rather than a copy of their own (decoders of tensors)."""
        return self.wait(key, timeout, cancelled=cancelled)

    def get_if_exists(self, key: str) -> bytes | None:
        """The bytes under ``key``, or ``None`` if there is none yet.

        One request on stores where a missing key is an ordinary answer;
        :meth:`wait` polls with it.
        """
        try:
            return self.get(key)
        except ObjectNotFound:
            return None

    def wait(
        self,
        key: str,
        timeout: float,
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> bytes:
        """Poll ``key`` until it appears and return its bytes.

        Polls by key (never by listing) with exponential backoff from
        :attr:`poll_initial_s` to :attr:`poll_max_s`, for at most ``timeout``
        seconds (on :attr:`clock`). Between two looks it waits on
        :meth:`pause_for_wait` (a sleep, unless the store can wake it early).

        Raises:
            ObjectNotFound: the key did not appear within ``timeout`` seconds.
            WaitCancelled: ``cancelled()`` returned true between two polls.
        """
        pause = self.pause_for_wait()
        deadline = self.clock() + timeout
        delay = self.poll_initial_s
        while True:
            pause.arm()
            data = self.get_if_exists(key)
            if data is not None:
                return data
            now = self.clock()
            if now >= deadline:
                raise ObjectNotFound(key, f"object {key!r} did not appear within {timeout:g} s")
            if cancelled is not None and cancelled():
                raise WaitCancelled(key)
            pause.pause(min(delay, deadline - now))
            delay = min(delay * 2, self.poll_max_s)

    def pause_for_wait(self) -> Pause:
        """What :meth:`wait` pauses on between two looks, in the calling thread: :data:`SLEEP` here."""
        return SLEEP

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections or threads held by this storage."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
