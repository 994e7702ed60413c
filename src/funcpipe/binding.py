"""Objects bound to the key they were written for, and readers that refuse any other.

Keys are deterministic (:mod:`funcpipe.protocol`), so an object copied or left
under a key — by another job, an earlier attempt, another iteration or
micro-batch — would otherwise be read as the object that key names. So every
object a worker or the driver writes carries the key it was written for: a
tensor or a checkpoint in its safetensors header metadata (``{"key": ...}``),
a JSON object as its ``"key"`` field. The binding travels in the bytes a
reader fetches anyway: checking it costs no request.

A reader that *waits* for a key (a message, a share of the all-reduce, a
metrics report) does not consume a foreign object: it logs a warning and
keeps polling until the writer replaces it (:func:`wait`), and raises
:class:`~funcpipe.ForeignObject` naming both keys if the wait times out
first. A reader that does not wait (a checkpoint) raises it at once.
(The signed model blob binds its key into its HMAC instead: :mod:`funcpipe.signed`.)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from funcpipe.errors import ForeignObject, IntegrityError, ObjectNotFound
from funcpipe.storage.base import Buffer, Storage, WaitCancelled

__all__ = ["FIELD", "check", "decode_json", "encode_json", "wait"]

log = logging.getLogger(__name__)

#: The metadata entry or JSON field that holds the key an object was written for.
FIELD = "key"

T = TypeVar("T")


def check(key: str, written_for: object) -> None:
    """Refuse an object read from ``key`` that says it was written for ``written_for``.

    Raises:
        ForeignObject: ``written_for`` is not ``key`` (``None`` or a non-string: it names no key).
    """
    if written_for != key:
        raise ForeignObject(key, written_for if isinstance(written_for, str) else None)


def wait(
    storage: Storage,
    key: str,
    timeout: float,
    read: Callable[[Buffer], T],
    *,
    cancelled: Callable[[], bool] | None = None,
) -> T:
    """Wait for the object written for ``key`` and return ``read(its bytes)``.

    ``read`` may get the bytes as a view of the stored ones (:meth:`Storage.wait_view`), valid
    while it runs: what it returns must not be a view of them unless it keeps them (a
    :class:`~funcpipe.codec.TensorBytes` does).

    ``read`` decodes the bytes and checks their binding (:func:`check`). An
    object it refuses with :class:`~funcpipe.ForeignObject` is not consumed:
    a warning names it (once per binding), and polling goes on, with the
    storage's backoff, until the writer overwrites it.

    Raises:
        ForeignObject: only a foreign object was there when ``timeout`` seconds passed.
        ObjectNotFound: nothing was there when ``timeout`` seconds passed.
        IntegrityError: ``read`` found the bytes malformed.
        WaitCancelled: ``cancelled()`` returned true between two polls.
    """
    deadline = time.monotonic() + timeout
    delay = storage.poll_initial_s
    refused: ForeignObject | None = None
    warned: set[str | None] = set()
    while True:
        try:
            data = storage.wait_view(key, max(0.0, deadline - time.monotonic()), cancelled=cancelled)
        except ObjectNotFound:
            if refused is None:
                raise
            raise _timed_out(refused, timeout) from None
        try:
            return read(data)
        except ForeignObject as exc:
            refused = exc
        if refused.written_for not in warned:
            warned.add(refused.written_for)
            log.warning("%s; waiting for its writer to replace it", refused)
        now = time.monotonic()
        if now >= deadline:
            raise _timed_out(refused, timeout)
        if cancelled is not None and cancelled():
            raise WaitCancelled(key)
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, storage.poll_max_s)


def _timed_out(refused: ForeignObject, timeout: float) -> ForeignObject:
    bound = "no key" if refused.written_for is None else repr(refused.written_for)
    return ForeignObject(
        refused.key,
        refused.written_for,
        f"object {refused.key!r} was written for {bound}, and no object written for {refused.key!r} "
        f"replaced it within {timeout:g} s; refusing a stale or misplaced object; hint: another job "
        "or attempt may be writing under this job's keys, or the writer of this one failed",
    )


def encode_json(key: str, fields: Mapping[str, Any]) -> bytes:
    """A JSON object of ``fields`` bound to ``key`` (its :data:`FIELD` field)."""
    return json.dumps({**fields, FIELD: key}).encode()


def decode_json(data: Buffer, key: str) -> dict[str, Any]:
    """The fields of :func:`encode_json`'s object read from ``key``, its binding checked and removed.

    Raises:
        IntegrityError: ``data`` is not a JSON object.
        ForeignObject: the object was written for another key.
    """
    if isinstance(data, memoryview):
        data = data.tobytes()
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise IntegrityError(f"object {key!r} is not JSON ({exc}): {data[:80]!r}") from exc
    if not isinstance(value, dict):
        raise IntegrityError(f"object {key!r} is a JSON {type(value).__name__}, not an object: {data[:80]!r}")
    check(key, value.pop(FIELD, None))
    return value
