"""A storage wrapper that authenticates every object a job writes: a MAC over its key and bytes.

Each object is stored as its bytes followed by a 32-byte tag, HMAC-SHA256 under
the job's key (:func:`funcpipe.secret.job_key`, which the invocation payloads
carry to the workers) of the object's key and bytes. A reader recomputes the
tag and refuses a mismatch with :class:`~funcpipe.IntegrityError` naming the
key: bytes altered in storage (a tensor's data with its header intact, a
forged metrics report, a damaged checkpoint), an object of another job, or one
moved from another key, is never decoded. The key in the tag makes a copy
under another key fail here already; the bindings inside the objects
(:mod:`funcpipe.binding`) remain as a second check.

What it does not cover: keys under :data:`EXEMPT_PREFIXES` — the job manifests
(which authenticate themselves, :mod:`funcpipe.manifest`) and the leases
(:mod:`funcpipe.lease`), which drivers of any job read — pass through as they are.
Deleting an object, or replacing it with an older object written for the same
key by the same job, is not detected by a MAC; run ids and attempts in the keys
(:class:`funcpipe.protocol.JobKeys`) make every key name one write.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence

from funcpipe.errors import IntegrityError
from funcpipe.storage.base import Buffer, Pause, Storage

__all__ = ["EXEMPT_PREFIXES", "TAG_BYTES", "AuthenticatedStorage", "tag"]

#: Bytes of the tag appended to every object.
TAG_BYTES = hashlib.sha256().digest_size

#: Keys that are stored as they are (read by drivers of other jobs, or authenticated by their own format).
EXEMPT_PREFIXES = ("jobs/",)

_DOMAIN = b"funcpipe-object-v1\0"


def tag(secret: bytes, key: str, *parts: Buffer) -> bytes:
    """The tag of the object stored under ``key`` whose bytes are ``parts`` (one after another):
    HMAC-SHA256 of the key and the bytes."""
    name = key.encode()
    mac = hmac.new(secret, _DOMAIN + len(name).to_bytes(4, "big") + name, hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


class AuthenticatedStorage(Storage):
    """``inner`` with every object (but :data:`EXEMPT_PREFIXES`' keys) tagged on write and checked on read.

    Args:
        inner: the storage the tagged objects go to.
        key: the job's key, as hex (:func:`funcpipe.secret.job_key`).
    """

    def __init__(self, inner: Storage, key: str) -> None:
        while isinstance(inner, AuthenticatedStorage):  # one tag per object, under the newest key
            inner = inner.inner
        self.inner: Storage = inner
        self._secret = bytes.fromhex(key)
        self.url = inner.url
        self.poll_initial_s = inner.poll_initial_s
        self.poll_max_s = inner.poll_max_s
        self.clock = inner.clock

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, self._seal(key, [data]))

    def put_parts(self, key: str, parts: Sequence[Buffer]) -> None:
        """The parts and their tag joined in one copy (the object's only one)."""
        self.inner.put(key, self._seal(key, parts))

    def create(self, key: str, data: bytes) -> bool:
        return self.inner.create(key, self._seal(key, [data]))

    def get(self, key: str) -> bytes:
        return self._open(key, self.inner.get(key))

    def get_if_exists(self, key: str) -> bytes | None:
        data = self.inner.get_if_exists(key)
        return None if data is None else self._open(key, data)

    def wait(self, key: str, timeout: float, *, cancelled: Callable[[], bool] | None = None) -> bytes:
        """The inner store's wait (it may be woken early), then the check.

        An object that fails its check is refused at once (:class:`IntegrityError`): a
        worker's failure, which the driver retries with a fresh attempt and fresh keys.
        """
        return self._open(key, self.inner.wait(key, timeout, cancelled=cancelled))

    def wait_view(self, key: str, timeout: float, *, cancelled: Callable[[], bool] | None = None) -> Buffer:
        """:meth:`wait`, the checked bytes returned as a view of the stored ones, without their tag (no copy)."""
        return self._check(key, self.inner.wait(key, timeout, cancelled=cancelled))

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, keys: Iterable[str]) -> None:
        self.inner.delete(keys)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def pause_for_wait(self) -> Pause:
        return self.inner.pause_for_wait()

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"AuthenticatedStorage({self.inner!r})"

    def _seal(self, key: str, parts: Sequence[Buffer]) -> bytes:
        """The object's bytes, ``parts`` joined, then their tag (none for an exempt key), in one copy."""
        if key.startswith(EXEMPT_PREFIXES):
            return b"".join(parts)
        return b"".join([*parts, tag(self._secret, key, *parts)])

    def _open(self, key: str, data: bytes) -> bytes:
        checked = self._check(key, data)
        return checked if isinstance(checked, bytes) else bytes(checked)

    def _check(self, key: str, data: bytes) -> Buffer:
        """``data``'s body (a view: not copied) once its tag is found to match, else :class:`IntegrityError`."""
        if key.startswith(EXEMPT_PREFIXES):
            return data
        view = memoryview(data)
        body = view[:-TAG_BYTES] if len(data) >= TAG_BYTES else view[:0]
        if len(data) < TAG_BYTES or not hmac.compare_digest(view[-TAG_BYTES:], tag(self._secret, key, body)):
            raise IntegrityError(
                f"object {key!r} failed its authentication ({len(data)} bytes; its MAC does not match its key "
                "and bytes under this job's key): altered in storage, moved from another key, or written by "
                "another job or by a driver with another secret; refusing it"
            )
        return body
