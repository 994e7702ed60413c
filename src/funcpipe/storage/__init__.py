"""Object storage backends, and :func:`open_storage` to open one by URL.

Backends are found by URL scheme in a registry of ``"module:Class"`` targets
imported on first use (so cloud SDKs load only when their scheme is opened);
third-party packages add schemes through the ``funcpipe.storage`` entry-point
group::

    [project.entry-points."funcpipe.storage"]
    gcs = "funcpipe_gcs:GCSStorage"

Built in: ``file:///abs/path``, ``memory://name``, ``s3://bucket/prefix``
(needs ``funcpipe[aws]``), ``oss://bucket/prefix`` (needs ``funcpipe[alibaba]``).

``throttled+<url>?up_mb_s=..&down_mb_s=..&latency_ms=..`` wraps any of them
in a :class:`ThrottledStorage`, ``counted+<url>?counter=<name>`` in a
:class:`CountingStorage` (requests counted by operation).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re

from funcpipe.errors import ConfigError
from funcpipe.storage.base import Storage, WaitCancelled
from funcpipe.storage.counting import SCHEME_PREFIX as COUNTED_PREFIX
from funcpipe.storage.counting import CountingStorage
from funcpipe.storage.file import FileStorage
from funcpipe.storage.memory import MemoryStorage
from funcpipe.storage.throttled import SCHEME_PREFIX, ThrottledStorage, throttle

__all__ = [
    "CountingStorage",
    "FileStorage",
    "MemoryStorage",
    "Storage",
    "ThrottledStorage",
    "WaitCancelled",
    "open_storage",
    "register",
    "throttle",
]

ENTRY_POINT_GROUP = "funcpipe.storage"

#: scheme -> (``"module:Class"`` or the class itself, install hint); kept sorted.
_REGISTRY: dict[str, tuple[str | type[Storage], str]] = {
    "file": ("funcpipe.storage.file:FileStorage", ""),
    "memory": ("funcpipe.storage.memory:MemoryStorage", ""),
    "oss": ("funcpipe.storage.oss:OSSStorage", "pip install 'funcpipe[alibaba]'"),
    "s3": ("funcpipe.storage.s3:S3Storage", "pip install 'funcpipe[aws]'"),
}

#: Entry points of the ``funcpipe.storage`` group by name, read on first need.
_PLUGINS: dict[str, importlib.metadata.EntryPoint] | None = None

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def register(
    scheme: str,
    target: str | type[Storage],
    *,
    install_hint: str = "",
    clobber: bool = False,
) -> None:
    """Make ``open_storage("<scheme>://...")`` use ``target``.

    Args:
        scheme: lower-case URL scheme, e.g. ``"s3"``.
        target: ``"package.module:Class"`` (imported on first use) or a
            :class:`Storage` subclass. The class must have a classmethod
            ``from_url(url: str)`` returning an instance whose ``url`` is set.
        install_hint: shown when the module cannot be imported, e.g.
            ``"pip install 'funcpipe[aws]'"``.
        clobber: replace an existing, different registration instead of failing.

    Raises:
        ConfigError: the scheme or target is malformed, or the scheme is taken.
    """
    if not _SCHEME.fullmatch(scheme) or scheme.startswith(("throttled", "counted")):
        raise ConfigError(
            f"invalid storage scheme {scheme!r}: use lower-case letters, digits, '+', '.', "
            "'-', starting with a letter (and not 'throttled' or 'counted', which wrap other schemes)"
        )
    if isinstance(target, str):
        if not _TARGET.fullmatch(target):
            raise ConfigError(
                f"invalid storage target {target!r} for scheme {scheme!r}: write 'package.module:ClassName'"
            )
    elif not (isinstance(target, type) and issubclass(target, Storage)):
        raise ConfigError(
            f"storage target for scheme {scheme!r} must be a Storage subclass or "
            f"'module:Class', got {target!r}"
        )
    existing = _REGISTRY.get(scheme)
    if existing is not None and existing[0] != target and not clobber:
        raise ConfigError(
            f"storage scheme {scheme!r} is already registered to {existing[0]!r}; "
            "pass clobber=True to replace it"
        )
    _REGISTRY[scheme] = (target, install_hint)
    ordered = sorted(_REGISTRY.items())
    _REGISTRY.clear()
    _REGISTRY.update(ordered)


def open_storage(url: str) -> Storage:
    """Open the storage a URL names.

    ``file:///abs/path``, ``memory://name``, ``s3://bucket/prefix?endpoint_url=..``,
    ``oss://bucket/prefix?endpoint=..``,
    ``throttled+<url>?up_mb_s=..``, ``counted+<url>?counter=<name>``, or any
    registered or entry-point scheme.

    Raises:
        ConfigError: the scheme is unknown, its backend cannot be imported
            (the message carries the install hint), or the URL is malformed.
    """
    if url.startswith(SCHEME_PREFIX):
        return ThrottledStorage.from_url(url, open_storage)
    if url.startswith(COUNTED_PREFIX):
        return CountingStorage.from_url(url, open_storage)
    match = _URL_SCHEME.match(url)
    if match is None:
        raise ConfigError(
            f"storage URL {url!r} has no scheme; known schemes: {_known_schemes()} "
            "(e.g. file:///tmp/funcpipe or memory://name)"
        )
    scheme = match.group(1).lower()
    cls = _resolve(scheme, url)
    factory = getattr(cls, "from_url", None)
    if factory is None:
        raise ConfigError(
            f"storage backend {cls.__module__}.{cls.__qualname__} for {scheme}:// has no "
            "from_url(url) classmethod"
        )
    storage = factory(url)
    if not isinstance(storage, Storage):
        raise ConfigError(
            f"{cls.__qualname__}.from_url({url!r}) returned {type(storage).__name__}, not a Storage"
        )
    return storage


def _resolve(scheme: str, url: str) -> type[Storage]:
    if scheme in _REGISTRY:
        target, hint = _REGISTRY[scheme]
        if not isinstance(target, str):
            return target
        where = f"{target} (registered for {scheme}://)"
        try:
            module_name, _, attr = target.partition(":")
            loaded = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"cannot load the storage backend {where}: {exc}. "
                f"{hint or 'Install the package that provides it.'}"
            ) from exc
    else:
        entry_point = _plugins().get(scheme)
        if entry_point is None:
            raise ConfigError(
                f"unknown storage URL {url!r} (scheme {scheme!r}); known schemes: {_known_schemes()}"
            )
        where = f"{entry_point.value} (entry point {scheme!r} of group {ENTRY_POINT_GROUP!r})"
        try:
            loaded = entry_point.load()
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"cannot load the storage backend {where}: {exc}. "
                "Reinstall the package that declares the entry point."
            ) from exc
    if not (isinstance(loaded, type) and issubclass(loaded, Storage)):
        raise ConfigError(f"storage backend {where} is {loaded!r}, not a Storage subclass")
    return loaded


def _plugins() -> dict[str, importlib.metadata.EntryPoint]:
    global _PLUGINS
    if _PLUGINS is None:
        found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        _PLUGINS = {entry_point.name: entry_point for entry_point in found}
    return _PLUGINS


def _known_schemes() -> str:
    schemes = sorted(set(_REGISTRY) | set(_plugins()))
    return ", ".join([*schemes, f"{SCHEME_PREFIX}<url>", f"{COUNTED_PREFIX}<url>"])
