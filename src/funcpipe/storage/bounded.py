"""A storage wrapper that bounds every operation of the driver by a timeout.

The driver's own uploads and downloads (the stage definitions, the fed
micro-batches, the stop and abort objects, the manifest, the gathered
checkpoints) must not hang a fit when a store or a link stalls: each runs on a
daemon thread of its own, and one that does not finish within ``timeout_s``
raises :class:`~funcpipe.StorageTimeout` (a :class:`~funcpipe.StorageError`,
retried by ``fit(max_retries=...)`` like any). The stuck operation's thread is
left behind; as a daemon it does not keep the interpreter from exiting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from funcpipe.errors import ConfigError, StorageTimeout
from funcpipe.storage.base import Pause, Storage

__all__ = ["BoundedStorage"]

T = TypeVar("T")


class BoundedStorage(Storage):
    """``inner`` with every primitive bounded by ``timeout_s`` seconds (:class:`~funcpipe.StorageTimeout`)."""

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
        self._bounded("put", key, len(data), lambda: self.inner.put(key, data))

    def create(self, key: str, data: bytes) -> bool:
        return self._bounded("create", key, len(data), lambda: self.inner.create(key, data))

    def get(self, key: str) -> bytes:
        return self._bounded("get", key, None, lambda: self.inner.get(key))

    def get_if_exists(self, key: str) -> bytes | None:
        return self._bounded("get", key, None, lambda: self.inner.get_if_exists(key))

    def exists(self, key: str) -> bool:
        return self._bounded("exists", key, None, lambda: self.inner.exists(key))

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._bounded("delete", keys[0] if keys else "", None, lambda: self.inner.delete(keys))

    def list(self, prefix: str) -> list[str]:
        return self._bounded("list", prefix, None, lambda: self.inner.list(prefix))

    def pause_for_wait(self) -> Pause:
        return self.inner.pause_for_wait()

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"BoundedStorage({self.inner!r}, timeout_s={self.timeout_s:g})"

    def _bounded(self, op: str, key: str, nbytes: int | None, call: Callable[[], T]) -> T:
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append((True, call()))
            except BaseException as exc:  # handed to the caller's thread
                outcome.append((False, exc))

        thread = threading.Thread(target=run, name=f"funcpipe-storage-{op}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if not outcome:
            size = f" of {nbytes:,} bytes" if nbytes is not None else ""
            raise StorageTimeout(
                f"storage {self.url or self.inner!r}: {op} of {key!r}{size} did not finish within "
                f"{self.timeout_s:g} s; the link is far slower than the plan assumes, or the store hangs; "
                "hint: check the storage, or raise Trainer(timeout_s=...)"
            )
        ok, value = outcome[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]
