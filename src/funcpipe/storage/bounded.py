"""A storage wrapper that bounds every request: one that does not finish in time raises :class:`StorageTimeout`.

The driver's own uploads and downloads (the stage definitions, the feeds, the
stop object, deletes of finished iterations, checkpoint gathers, manifests,
the lease) go through a :class:`BoundedStorage` with the trainer's
``timeout_s``, the same bound the workers' waits have: a hung store or a link
far slower than planned fails the run with a named error (retried like any
:class:`~funcpipe.StorageError`) instead of blocking the driver for ever.

Each primitive runs on a daemon thread of a small shared pool and the caller
waits for it at most ``timeout_s``. A request that does not return stays
blocked in its thread (Python cannot interrupt it), but that thread is a daemon:
it does not keep the interpreter from exiting, and the pool starts another for
the next request. Idle pool threads end after :data:`IDLE_S` seconds.
:meth:`Storage.wait` runs in the caller's thread, each of its polls bounded.
"""

from __future__ import annotations

import builtins
import itertools
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from funcpipe.errors import ConfigError, StorageTimeout
from funcpipe.storage.base import Pause, Storage

__all__ = ["IDLE_S", "BoundedStorage"]

T = TypeVar("T")

#: Seconds an idle pool thread waits for another request before it ends.
IDLE_S = 2.0


class _Call:
    """One request handed to the pool: what to run, and its outcome once ``done`` is set."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        """Run the function and keep its outcome (``done`` is set by the pool, once the thread is idle)."""
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the caller, who re-raises it
            self.error = exc
        finally:
            self.fn = _nothing


def _nothing() -> None:
    """What a finished :class:`_Call` holds instead of its function (drops the references it held)."""


class _Pool:
    """Daemon threads that run :class:`_Call` s; one more is started whenever none is idle.

    A thread stuck in a request that never returns is never counted idle again,
    so it never delays a later request.
    """

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a call, less calls queued for them
        self._names = itertools.count()

    def submit(self, call: _Call) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1  # an idle thread takes it
        self._calls.put(call)
        if start:
            threading.Thread(target=self._serve, name=f"funcpipe-storage-{next(self._names)}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                call = self._calls.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # more idle threads than queued calls: this one may go
                        self._idle -= 1
                        return
                continue  # a call was handed to this thread as it timed out: take it
            call.run()
            with self._lock:  # idle before the caller wakes, so its next request finds this thread
                self._idle += 1
            call.done.set()
            del call


_POOL = _Pool(IDLE_S)


class BoundedStorage(Storage):
    """``inner`` with every request bounded by ``timeout_s`` seconds.

    Args:
        inner: the storage that serves the requests.
        timeout_s: longest wait for one request (``put``, ``create``, ``get``,
            ``get_if_exists``, ``exists``, ``delete``, ``list``), seconds;
            may be changed later (:attr:`timeout_s`).

    Raises (from every request):
        StorageTimeout: the request did not finish within ``timeout_s``; it names
            the operation, the key, the bytes and the timeout.
    """

    def __init__(self, inner: Storage, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"a storage timeout must be > 0 seconds, got {timeout_s!r}")
        self.inner = inner
        self.timeout_s = timeout_s
        self.url = inner.url
        self.poll_initial_s = inner.poll_initial_s
        self.poll_max_s = inner.poll_max_s
        self.clock = inner.clock

    def put(self, key: str, data: bytes) -> None:
        self._bounded("put", repr(key), len(data), lambda: self.inner.put(key, data))

    def create(self, key: str, data: bytes) -> bool:
        create: Callable[[str, bytes], bool] | None = getattr(self.inner, "create", None)
        if create is None:  # an inner store from before Storage.create: the base's look-then-put
            return super().create(key, data)
        return self._bounded("create", repr(key), len(data), lambda: create(key, data))

    def get(self, key: str) -> bytes:
        return self._bounded("get", repr(key), None, lambda: self.inner.get(key))

    def get_if_exists(self, key: str) -> bytes | None:
        return self._bounded("get", repr(key), None, lambda: self.inner.get_if_exists(key))

    def exists(self, key: str) -> bool:
        return self._bounded("exists", repr(key), None, lambda: self.inner.exists(key))

    def delete(self, keys: Iterable[str]) -> None:
        keys = builtins.list(keys)
        if not keys:
            return
        what = repr(keys[0]) + (f" and {len(keys) - 1} more keys" if len(keys) > 1 else "")
        self._bounded("delete", what, None, lambda: self.inner.delete(keys))

    def list(self, prefix: str) -> builtins.list[str]:
        return self._bounded("list", f"the prefix {prefix!r}", None, lambda: self.inner.list(prefix))

    def pause_for_wait(self) -> Pause:
        return self.inner.pause_for_wait()

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"BoundedStorage({self.inner!r}, timeout_s={self.timeout_s:g})"

    def _bounded(self, op: str, what: str, nbytes: int | None, fn: Callable[[], T]) -> T:
        """``fn()`` on a pool thread, waited for at most :attr:`timeout_s`."""
        timeout_s = self.timeout_s
        call = _Call(fn)
        _POOL.submit(call)
        if not call.done.wait(timeout_s):
            size = f" of {nbytes:,} bytes" if nbytes is not None else ""
            raise StorageTimeout(
                f"storage {self.url or type(self.inner).__qualname__}: {op} of {what}{size} did not finish within "
                f"{timeout_s:g} s (the trainer's timeout_s); a slow link or a hung storage; hint: check the "
                "storage is reachable, or raise Trainer(timeout_s=...) if the link is only slow"
            )
        if call.error is not None:
            error, call.error = call.error, None
            raise error
        result: T = call.result
        return result
