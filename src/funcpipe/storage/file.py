"""Storage in a directory of a local or shared file system (``file:///abs/path``)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from funcpipe.errors import ConfigError, ObjectNotFound, StorageError
from funcpipe.storage.base import POLL_BACKOFF_S, Pause, Storage
from funcpipe.storage.doorbell import doorbell_for

__all__ = ["TEMP_MARKER", "FileStorage", "check_key", "check_prefix"]

#: Every in-flight ``put`` writes ``<final name><TEMP_MARKER><token>`` beside the
#: final file and renames it into place. Keys may not contain the marker, so
#: :meth:`FileStorage.list` can tell a (possibly leftover) temporary file from an object.
TEMP_MARKER = ".funcpipe-tmp-"

_KEY_RULE = (
    "keys are '/'-separated names with no leading or trailing '/', no empty, "
    "'.' or '..' segments and no NUL (e.g. 'job/0/act/1/0/3')"
)

# Temporary names must be unique across threads, forked processes and hosts that
# share one network file system: a per-import random part, the pid, a counter.
_TOKEN = os.urandom(4).hex()
_COUNTER = itertools.count()

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0)

# A concurrent delete may remove a parent directory between our makedirs and our
# open; retry that many times before giving up.
_CREATE_ATTEMPTS = 8


def check_key(key: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` is a well-formed storage key.

    Every backend accepts the same keys, so a key that works on ``memory://``
    also works on ``file://`` and object stores.
    """
    if (
        not key
        or key[0] == "/"
        or key[-1] == "/"
        or "//" in key
        or "\0" in key
        or ("." in key and any(part in (".", "..") for part in key.split("/")))
    ):
        raise ConfigError(f"invalid storage key {key!r}: {_KEY_RULE}")


def check_prefix(prefix: str) -> None:
    """Raise :class:`ConfigError` unless ``prefix`` can start a valid key.

    The empty prefix (everything) is valid; the last segment may be partial
    (``"a/b"`` matches ``"a/bc/d"``).
    """
    if not prefix:
        return
    directory, _, last = prefix.rpartition("/")
    if prefix[0] == "/" or "\0" in last or (directory and not _is_valid_key(directory)):
        raise ConfigError(f"invalid storage key prefix {prefix!r}: {_KEY_RULE}")


def _is_valid_key(key: str) -> bool:
    try:
        check_key(key)
    except ConfigError:
        return False
    return True


class FileStorage(Storage):
    """Objects as files under a root directory; key ``a/b/c`` is file ``root/a/b/c``.

    ``put`` writes a temporary file in the target's directory and renames it
    into place with :func:`os.replace`, so a reader in any process sees either
    the old object or the new one, never a partial one. Nothing is fsync'ed:
    objects are visible to other processes at once but may not survive a
    power loss, which is fine for training traffic.

    A wait polls by key with backoff, and on one host it need not sleep out
    its poll interval: every ``put`` rings the threads of this host that wait
    on the same root (:mod:`funcpipe.storage.doorbell`), which look again at
    once. A writer on another host (a network file system) is seen at the
    next poll, within ``poll_max_s``.

    A key cannot be both an object and the directory of other keys (``a`` and
    ``a/b``); object stores allow that, this backend raises
    :class:`StorageError`. Use it for tests, single-machine runs and shared
    (NFS) file systems.

    Args:
        root: the directory holding the objects; created if missing. A relative
            path is made absolute against the current directory.
    """

    # A failed open() costs microseconds, so poll often: without a ring (a writer
    # on another host), a wait's latency is up to one poll interval on every hop.
    poll_initial_s, poll_max_s = POLL_BACKOFF_S["file"]

    def __init__(self, root: str | Path) -> None:
        self._root = os.path.abspath(os.fspath(root))
        try:
            os.makedirs(self._root, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot use {self._root!r} as a storage root: {exc}; pass a directory you can write to"
            ) from exc
        self._prefix = self._root if self._root.endswith(os.sep) else self._root + os.sep
        self.url = Path(self._root).as_uri()
        self._doorbell = doorbell_for(self._root)

    @property
    def root(self) -> Path:
        """The absolute root directory."""
        return Path(self._root)

    @classmethod
    def from_url(cls, url: str) -> FileStorage:
        """Open ``file:///abs/path`` (percent-encoded, as :meth:`Path.as_uri` writes it).

        Raises:
            ConfigError: the URL is not a ``file`` URL, names no absolute path,
                or has a query or fragment.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() != "file":
            raise ConfigError(f"not a file URL: {url!r}; write file:///absolute/path")
        if parts.query or parts.fragment:
            raise ConfigError(
                f"file URLs take no query or fragment, got {url!r}; write file:///absolute/path"
            )
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"file URL {url!r} must name an absolute path, but {parts.netloc!r} "
                f"parses as a host; write file:///{parts.netloc}{parts.path} "
                "(three slashes) with the absolute path"
            )
        if os.name == "nt":  # pragma: no cover - exercised on Windows only
            from urllib.request import url2pathname

            path = url2pathname(parts.path)
        else:
            path = unquote(parts.path)
        if not path or not os.path.isabs(path):
            raise ConfigError(f"file URL {url!r} must name an absolute path; write file:///absolute/path")
        return cls(path)

    def _path(self, key: str) -> str:
        check_key(key)
        if TEMP_MARKER in key:
            raise ConfigError(
                f"invalid storage key {key!r}: keys may not contain {TEMP_MARKER!r}, "
                "which marks FileStorage's temporary files"
            )
        return self._prefix + key

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (temporary file + rename)."""
        self._store(key, data, exclusive=False)

    def create(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` unless it holds an object: a temporary file hard-linked into place,
        which fails (``EEXIST``) when another process linked one first."""
        return self._store(key, data, exclusive=True)

    def _store(self, key: str, data: bytes, *, exclusive: bool) -> bool:
        path = self._path(key)
        tmp = f"{path}{TEMP_MARKER}{_TOKEN}-{os.getpid()}-{next(_COUNTER)}"
        fd = self._create(tmp, key)
        try:
            try:
                view = memoryview(data)
                written = os.write(fd, view)
                while written < len(view):  # regular files rarely write short
                    written += os.write(fd, view[written:])
            finally:
                os.close(fd)
            if exclusive:
                try:
                    os.link(tmp, path)  # atomic: the whole object under its name, or EEXIST
                except FileExistsError:
                    if os.path.isdir(path):  # a directory of keys, not an object: refused as put refuses it
                        raise IsADirectoryError(errno.EISDIR, "Is a directory", path) from None
                    return False
                finally:  # the object (if linked) keeps its own name; a leftover temporary is skipped by list()
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # best effort; list() skips temporary files
                os.unlink(tmp)
            if isinstance(exc, IsADirectoryError):
                raise StorageError(
                    f"cannot store key {key!r}: {path!r} is a directory holding other "
                    "keys; FileStorage cannot hold both 'a' and 'a/...'"
                ) from exc
            if isinstance(exc, OSError):
                raise StorageError(f"cannot store key {key!r} at {path!r}: {exc}") from exc
            raise
        self._doorbell.ring()
        return True

    def pause_for_wait(self) -> Pause:
        """The calling thread's pause, which a ``put`` on this host ends early (:mod:`funcpipe.storage.doorbell`)."""
        return self._doorbell.pause()

    def _create(self, tmp: str, key: str) -> int:
        for _ in range(_CREATE_ATTEMPTS):
            try:
                return os.open(tmp, _CREATE_FLAGS, 0o666)
            except FileNotFoundError:
                pass  # the first object in a new directory: create it and retry
            except NotADirectoryError as exc:
                raise self._parent_is_object(key) from exc
            except OSError as exc:
                raise StorageError(f"cannot store key {key!r} at {tmp!r}: {exc}") from exc
            try:
                os.makedirs(os.path.dirname(tmp), exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                raise self._parent_is_object(key) from exc
            except OSError as exc:
                raise StorageError(f"cannot create the directory of key {key!r}: {exc}") from exc
        raise StorageError(
            f"cannot store key {key!r}: its directory under {self._root!r} vanished "
            f"{_CREATE_ATTEMPTS} times in a row (a concurrent delete of its last sibling?)"
        )

    def _parent_is_object(self, key: str) -> StorageError:
        return StorageError(
            f"cannot store key {key!r}: one of its parents is an object, not a "
            "directory; FileStorage cannot hold both 'a' and 'a/...'"
        )

    def get(self, key: str) -> bytes:
        """Return the bytes under ``key``; raise :class:`ObjectNotFound` if absent."""
        data = self._read(key)
        if data is None:
            raise ObjectNotFound(key)
        return data

    def get_if_exists(self, key: str) -> bytes | None:
        """The bytes under ``key``, or ``None``; a single open attempt."""
        return self._read(key)

    def _read(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            fd = os.open(path, _READ_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"cannot read key {key!r} at {path!r}: {exc}") from exc
        try:
            # Files are only ever replaced, never written in place, so the size
            # of the file this descriptor refers to cannot change under us.
            size = os.fstat(fd).st_size
            data = os.read(fd, size)
            if len(data) < size:  # reads are capped near 2 GiB per call
                chunks = [data]
                remaining = size - len(data)
                while remaining > 0:
                    chunk = os.read(fd, remaining)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    remaining -= len(chunk)
                data = b"".join(chunks)
            return data
        except IsADirectoryError:
            return None  # a directory of other keys, not an object
        except OSError as exc:
            raise StorageError(f"cannot read key {key!r} at {path!r}: {exc}") from exc
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""
        return os.path.isfile(self._path(key))

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` (absent ones are ignored), then prune emptied directories.

        Raises:
            ConfigError: ``keys`` is a single string, or holds an invalid key.
        """
        if isinstance(keys, str):
            raise ConfigError(
                f"delete() takes an iterable of keys, got the string {keys!r}; write delete([{keys!r}])"
            )
        parents: set[str] = set()
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
            except OSError as exc:
                raise StorageError(f"cannot delete key {key!r} at {path!r}: {exc}") from exc
            parent = key.rpartition("/")[0]
            if parent:
                parents.add(parent)
        self._prune(parents)

    def _prune(self, directories: set[str]) -> None:
        """Remove now-empty directories, deepest first, never the root (best effort)."""
        levels: dict[int, set[str]] = {}
        for directory in directories:
            levels.setdefault(directory.count("/"), set()).add(directory)
        for depth in range(max(levels, default=-1), -1, -1):
            for directory in levels.get(depth, ()):
                try:
                    os.rmdir(self._prefix + directory)
                except OSError:
                    continue  # not empty (or already gone): leave it
                parent = directory.rpartition("/")[0]
                if parent:
                    levels.setdefault(depth - 1, set()).add(parent)

    def list(self, prefix: str) -> builtins.list[str]:
        """Every key starting with ``prefix`` (a string prefix), sorted.

        Only the deepest directory the prefix implies is walked: ``"a/b/c"``
        scans ``root/a/b`` for names starting with ``c``.
        """
        check_prefix(prefix)
        directory, slash, partial = prefix.rpartition("/")
        keys: builtins.list[str] = []
        self._walk(self._prefix + directory if directory else self._root, directory + slash, partial, keys)
        keys.sort()
        return keys

    def _walk(self, path: str, key_prefix: str, name_prefix: str, keys: builtins.list[str]) -> None:
        try:
            entries = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing there, or removed by a concurrent delete
        except OSError as exc:
            raise StorageError(f"cannot list {path!r}: {exc}") from exc
        with entries:
            for entry in entries:
                name = entry.name
                if not name.startswith(name_prefix) or TEMP_MARKER in name:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    self._walk(entry.path, f"{key_prefix}{name}/", "", keys)
                elif entry.is_file():
                    keys.append(key_prefix + name)
