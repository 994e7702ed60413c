"""A storage wrapper that emulates one serverless function's network link."""

from __future__ import annotations

import builtins
import math
import threading
import time
from collections.abc import Callable, Iterable
from urllib.parse import unquote_plus

from funcpipe.errors import ConfigError, ObjectNotFound
from funcpipe.storage.base import Storage

__all__ = ["SCHEME_PREFIX", "ThrottledStorage", "throttle"]

#: ``throttled+<inner url>?up_mb_s=..&down_mb_s=..&latency_ms=..``
SCHEME_PREFIX = "throttled+"

_PARAMS = ("up_mb_s", "down_mb_s", "latency_ms")

#: The slowest link a throttled storage emulates, bytes per second (1 kB/s), and its longest latency, seconds.
MIN_BANDWIDTH_BYTES_S = 1000.0
MAX_LATENCY_S = 3600.0
_MB = 1e6


class ThrottledStorage(Storage):
    """Wrap ``inner`` so that every request pays a function's latency and bandwidth.

    One instance is one client (one function). Every request (``put``,
    ``get``, ``get_if_exists``, ``exists``, ``delete``, ``list``) pays
    ``latency_s``; latencies of concurrent requests overlap. Bytes uploaded by
    ``put`` share one uplink and bytes downloaded by ``get`` share one downlink:
    a transfer starts when the link is free (``max(now, busy_until)``) and takes
    ``size / bandwidth``, so concurrent transfers in one direction queue behind
    each other, while uploads and downloads proceed independently (full duplex).

    Writes (``put``, ``delete``) reach ``inner`` when the call returns, after
    the emulated time; reads observe ``inner`` when called and then wait.

    Args:
        inner: the storage that holds the objects.
        uplink_bytes_per_s: upload bandwidth, or ``None`` for unlimited.
        downlink_bytes_per_s: download bandwidth, or ``None`` for unlimited.
        latency_s: time every request adds after its transfer.
        clock: a monotonic clock, seconds; injectable for tests and simulation.
        sleep: sleeps for the given seconds; injectable alongside ``clock``.
    """

    def __init__(
        self,
        inner: Storage,
        *,
        uplink_bytes_per_s: float | None = None,
        downlink_bytes_per_s: float | None = None,
        latency_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        for name, bandwidth in (
            ("uplink_bytes_per_s", uplink_bytes_per_s),
            ("downlink_bytes_per_s", downlink_bytes_per_s),
        ):
            if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth >= MIN_BANDWIDTH_BYTES_S):
                raise ConfigError(
                    f"{name} must be a finite number >= {MIN_BANDWIDTH_BYTES_S:g} (1 kB/s; up_mb_s / down_mb_s "
                    f">= {MIN_BANDWIDTH_BYTES_S / _MB:g}), got {bandwidth!r}; a slower link would make every "
                    "transfer outlast any timeout; pass None for unlimited bandwidth"
                )
        if not (math.isfinite(latency_s) and 0 <= latency_s <= MAX_LATENCY_S):
            raise ConfigError(
                f"latency_s must be a finite number from 0 to {MAX_LATENCY_S:g} (1 hour; latency_ms <= "
                f"{int(MAX_LATENCY_S * 1000)}), got {latency_s!r}"
            )
        self.inner = inner
        self.uplink_bytes_per_s = uplink_bytes_per_s
        self.downlink_bytes_per_s = downlink_bytes_per_s
        self.latency_s = latency_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._uplink_busy_until = -math.inf
        self._downlink_busy_until = -math.inf
        self.poll_initial_s = max(inner.poll_initial_s, latency_s / 2)
        self.poll_max_s = max(inner.poll_max_s, self.poll_initial_s)
        self.url = _compose_url(inner.url, uplink_bytes_per_s, downlink_bytes_per_s, latency_s)

    @classmethod
    def from_url(cls, url: str, open_inner: Callable[[str], Storage]) -> ThrottledStorage:
        """Open ``throttled+<inner url>?up_mb_s=70&down_mb_s=70&latency_ms=20``.

        MB is 10**6 bytes. Each parameter is optional (absent bandwidth means
        unlimited, absent latency means 0). They are removed before the inner
        URL is opened with ``open_inner`` (the registry's
        :func:`funcpipe.storage.open_storage`); any other query parameters are passed on to it.

        Raises:
            ConfigError: a parameter is malformed, repeated or unknown.
        """
        if not url.startswith(SCHEME_PREFIX):
            raise ConfigError(f"not a throttled URL: {url!r}; write {SCHEME_PREFIX}<url>")
        base, _, query = url[len(SCHEME_PREFIX) :].partition("?")
        values: dict[str, float] = {}
        passed_on: builtins.list[str] = []
        for piece in query.split("&") if query else ():
            raw_name, _, raw_value = piece.partition("=")
            name = unquote_plus(raw_name)
            if name not in _PARAMS:
                passed_on.append(piece)
                continue
            if name in values:
                raise ConfigError(f"parameter {name!r} given twice in {url!r}")
            values[name] = _parse_number(name, unquote_plus(raw_value), url)
        inner_url = base + ("?" + "&".join(passed_on) if passed_on else "")

        try:
            inner = open_inner(inner_url)
        except ConfigError as exc:
            if not passed_on:
                raise
            unknown = sorted({unquote_plus(piece.partition("=")[0]) for piece in passed_on})
            raise ConfigError(
                f"unknown parameter(s) {', '.join(unknown)} in {url!r}: throttled+ takes "
                f"{', '.join(_PARAMS)}, and the inner storage {inner_url!r} rejected the "
                f"rest ({exc})"
            ) from exc
        up = values.get("up_mb_s")
        down = values.get("down_mb_s")
        return cls(
            inner,
            uplink_bytes_per_s=None if up is None else up * _MB,
            downlink_bytes_per_s=None if down is None else down * _MB,
            latency_s=values.get("latency_ms", 0.0) / 1000,
        )

    def _finish(self, start: float, nbytes: int, *, upload: bool) -> None:
        """Sleep until the transfer that was requested at ``start`` completes, plus latency."""
        end = start
        bandwidth = self.uplink_bytes_per_s if upload else self.downlink_bytes_per_s
        if bandwidth is not None and nbytes:
            with self._lock:
                if upload:
                    end = max(start, self._uplink_busy_until) + nbytes / bandwidth
                    self._uplink_busy_until = end
                else:
                    end = max(start, self._downlink_busy_until) + nbytes / bandwidth
                    self._downlink_busy_until = end
        delay = end + self.latency_s - self._clock()
        if delay > 0:
            self._sleep(delay)

    def put(self, key: str, data: bytes) -> None:
        """Upload ``data`` over the uplink, then store it in ``inner``."""
        self._finish(self._clock(), len(data), upload=True)
        self.inner.put(key, data)

    def create(self, key: str, data: bytes) -> bool:
        """Upload ``data`` over the uplink, then create it in ``inner`` unless the key holds an object."""
        self._finish(self._clock(), len(data), upload=True)
        return self.inner.create(key, data)

    def get(self, key: str) -> bytes:
        """Read ``key`` from ``inner``, then pay for downloading it."""
        start = self._clock()
        try:
            data = self.inner.get(key)
        except ObjectNotFound:
            self._finish(start, 0, upload=False)
            raise
        self._finish(start, len(data), upload=False)
        return data

    def get_if_exists(self, key: str) -> bytes | None:
        """Like :meth:`get`, ``None`` when absent; one request."""
        start = self._clock()
        data = self.inner.get_if_exists(key)
        self._finish(start, 0 if data is None else len(data), upload=False)
        return data

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object; costs one latency."""
        start = self._clock()
        found = self.inner.exists(key)
        self._finish(start, 0, upload=False)
        return found

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` in ``inner`` after one latency (one batched request)."""
        if isinstance(keys, str):
            raise ConfigError(
                f"delete() takes an iterable of keys, got the string {keys!r}; write delete([{keys!r}])"
            )
        keys = builtins.list(keys)
        self._finish(self._clock(), 0, upload=True)
        self.inner.delete(keys)

    def list(self, prefix: str) -> builtins.list[str]:
        """The keys of ``inner`` starting with ``prefix``; costs one latency."""
        start = self._clock()
        keys = self.inner.list(prefix)
        self._finish(start, 0, upload=False)
        return keys

    def close(self) -> None:
        """Close ``inner``."""
        self.inner.close()


def throttle(
    storage: Storage,
    *,
    up_mb_s: float | None = None,
    down_mb_s: float | None = None,
    latency_ms: float = 0.0,
) -> ThrottledStorage:
    """Wrap ``storage`` in a :class:`ThrottledStorage`, in URL units (MB = 10**6 bytes).

    Example::

        store = throttle(MemoryStorage("sim"), up_mb_s=70, down_mb_s=70, latency_ms=20)

    Raises:
        ConfigError: a parameter outside its range (the same as a ``throttled+`` URL's): ``latency_ms``
            from 0 to 3 600 000 (1 hour), ``up_mb_s`` / ``down_mb_s`` at least 0.001 (1 kB/s), all finite.
    """
    for name, value in (("up_mb_s", up_mb_s), ("down_mb_s", down_mb_s), ("latency_ms", latency_ms)):
        if value is not None:
            _check_range(name, value, f"throttle() parameter {name}={value!r}")
    return ThrottledStorage(
        storage,
        uplink_bytes_per_s=None if up_mb_s is None else up_mb_s * _MB,
        downlink_bytes_per_s=None if down_mb_s is None else down_mb_s * _MB,
        latency_s=latency_ms / 1000,
    )


def _parse_number(name: str, text: str, url: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"parameter {name}={text!r} in {url!r} is not a number; e.g. {name}=70") from None
    _check_range(name, value, f"parameter {name}={text!r} in {url!r}")
    return value


def _check_range(name: str, value: float, what: str) -> None:
    """Refuse ``value`` of throttle parameter ``name`` (URL units) outside its sane range; ``what`` names it."""
    if name == "latency_ms":
        if not (math.isfinite(value) and 0 <= value <= MAX_LATENCY_S * 1000):
            raise ConfigError(
                f"{what} must be from 0 to {int(MAX_LATENCY_S * 1000)} (1 hour), a finite number of "
                "milliseconds; e.g. latency_ms=20"
            )
    elif not (math.isfinite(value) and value >= MIN_BANDWIDTH_BYTES_S / _MB):
        raise ConfigError(
            f"{what} must be a number >= {MIN_BANDWIDTH_BYTES_S / _MB:g} (1 kB/s), finite; a slower link would "
            "make every transfer outlast any timeout; leave it out for unlimited bandwidth"
        )


def _format_number(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _compose_url(
    inner_url: str,
    uplink_bytes_per_s: float | None,
    downlink_bytes_per_s: float | None,
    latency_s: float,
) -> str:
    if not inner_url:
        return ""  # the inner storage cannot be re-opened by URL, so neither can this
    params = []
    if uplink_bytes_per_s is not None:
        params.append(f"up_mb_s={_format_number(uplink_bytes_per_s / _MB)}")
    if downlink_bytes_per_s is not None:
        params.append(f"down_mb_s={_format_number(downlink_bytes_per_s / _MB)}")
    if latency_s:
        params.append(f"latency_ms={_format_number(latency_s * 1000)}")
    if not params:
        return SCHEME_PREFIX + inner_url
    separator = "&" if "?" in inner_url else "?"
    return SCHEME_PREFIX + inner_url + separator + "&".join(params)
