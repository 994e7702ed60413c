"""Wake-ups between the processes of one host that share a :class:`~funcpipe.storage.file.FileStorage` root.

A wait on storage polls by key with backoff (:meth:`Storage.wait`); between two
looks it used to sleep, so an object written just after a look was seen up to
one poll interval later (up to ``poll_max_s``, 2 ms on files), on every hop of
the pipeline. On one host the writer can say so instead: each thread that
waits binds a Unix datagram socket in a directory of this host's shared by
every process using the same root (:func:`directory_for`), and every ``put``
sends one byte to each socket there (:meth:`Doorbell.ring`). A waiter's pause
is a receive with the poll interval as its timeout, so it looks again at once
after any put, and still at the poll interval when nobody rings: a writer on
another host (a shared network file system), or one that cannot ring, is seen
as before.

Nothing here decides what a waiter sees: a wake-up only makes it look again.
A lost ring (a full socket queue, a socket not yet scanned) costs latency, never
correctness. Where Unix datagram sockets are missing (Windows) or the socket
path would be too long, :meth:`Doorbell.pause` is a plain sleep.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import tempfile
import threading
import time
import weakref

from funcpipe.storage.base import SLEEP, Pause

__all__ = ["RESCAN_S", "Doorbell", "directory_for", "doorbell_for"]

#: Longest a ringer trusts its list of waiters without looking at the directory again, seconds.
#: (It looks again at once when the directory changed, but directory times may be coarse.)
RESCAN_S = 0.5

#: ``sun_path`` holds 108 bytes on Linux and 104 on macOS, its NUL included.
_MAX_SOCKET_PATH = 100
#: Room for the socket names :meth:`Doorbell._bind` makes: ``<pid>-<thread>-<n>-<token>``.
_NAME_ROOM = 32
_TOKEN = os.urandom(4).hex()
_COUNTER = itertools.count()

_BELLS: dict[str, Doorbell] = {}
_BELLS_LOCK = threading.Lock()


def directory_for(root: str) -> str:
    """The directory of this host where the waiters on storage ``root`` bind their sockets.

    Every process that opens the same root (by its real path) on this host
    finds the same directory, under the temporary directory (``/tmp`` when
    that is too long a path for a socket) and per user.
    """
    digest = hashlib.sha256(os.path.realpath(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    name = f"funcpipe-wake-{uid}"
    base = tempfile.gettempdir()
    if len(os.path.join(base, name, digest)) + 1 + _NAME_ROOM > _MAX_SOCKET_PATH and os.path.isdir("/tmp"):
        base = "/tmp"
    return os.path.join(base, name, digest)


def doorbell_for(root: str) -> Doorbell:
    """This process's :class:`Doorbell` for storage ``root`` (one per root, shared by its FileStorages)."""
    directory = directory_for(root)
    with _BELLS_LOCK:
        bell = _BELLS.get(directory)
        if bell is None:
            bell = _BELLS[directory] = Doorbell(directory)
        return bell


class Doorbell:
    """Ring every waiter of one directory; give each waiting thread its :class:`Pause`.

    Args:
        directory: where waiters bind their sockets (:func:`directory_for`).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.enabled = (
            hasattr(socket, "AF_UNIX") and len(directory) + 1 + _NAME_ROOM <= _MAX_SOCKET_PATH
        )
        self._local = threading.local()
        self._peers: tuple[str, ...] = ()
        self._seen: tuple[int, int, int] | None = None  # the directory's (inode, mtime, size) when scanned
        self._scanned = -float("inf")
        self._sender: socket.socket | None = None
        self._sender_pid = 0

    # -- the writer's side -----------------------------------------------------------

    def ring(self) -> None:
        """Wake every thread of this host that waits on this directory (one datagram each, never blocking)."""
        if not self.enabled:
            return
        peers = self._current_peers()
        if not peers:
            return
        sender = self._socket()
        if sender is None:
            return
        for path in peers:
            try:
                sender.sendto(b"\0", path)
            except BlockingIOError:
                pass  # its queue is full: it has wake-ups pending already
            except ConnectionRefusedError:
                # No socket is bound there (its process died without unbinding): nobody can
                # bind that name again (it holds a process id and a random token), so remove it.
                with contextlib.suppress(OSError):
                    os.unlink(path)
                self._seen = None
            except OSError:
                self._seen = None  # gone, or not a socket: scan again next time

    def _current_peers(self) -> tuple[str, ...]:
        try:
            stat = os.stat(self.directory)
        except OSError:
            return ()  # nobody ever waited here
        seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        now = time.monotonic()
        if seen != self._seen or now - self._scanned > RESCAN_S:
            try:
                names = os.listdir(self.directory)
            except OSError:
                names = []
            self._peers = tuple(os.path.join(self.directory, name) for name in names)
            self._seen, self._scanned = seen, now
        return self._peers

    def _socket(self) -> socket.socket | None:
        pid = os.getpid()
        if self._sender is None or self._sender_pid != pid:  # a forked child makes its own
            try:
                sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            except OSError:
                self.enabled = False
                return None
            sender.setblocking(False)
            self._sender, self._sender_pid = sender, pid
        return self._sender

    # -- the waiter's side -----------------------------------------------------------

    def pause(self) -> Pause:
        """The calling thread's pause: a receive on its own socket, bound on first use (or :data:`SLEEP`)."""
        if not self.enabled:
            return SLEEP
        pid = os.getpid()
        mine: tuple[int, Pause] | None = getattr(self._local, "pause", None)
        if mine is None or mine[0] != pid:  # a forked child binds its own
            mine = (pid, self._bind() or SLEEP)
            self._local.pause = mine
        return mine[1]

    def _bind(self) -> _Listener | None:
        name = f"{os.getpid()}-{threading.get_ident() % 10**8}-{next(_COUNTER)}-{_TOKEN}"
        path = os.path.join(self.directory, name)
        if len(path) > _MAX_SOCKET_PATH:
            return None
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError:
            return None
        try:
            sock.bind(path)
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        return _Listener(sock, path)


class _Listener(Pause):
    """One thread's socket: :meth:`pause` receives on it, :meth:`arm` drops what came before."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self.path = path
        # Unbound when the thread ends (its thread-local goes) or the process exits.
        self._finalizer = weakref.finalize(self, _unbind, sock, path)

    def arm(self) -> None:
        sock = self._sock
        try:
            while True:
                sock.recv(64)
        except OSError:  # BlockingIOError: drained
            pass

    def pause(self, seconds: float) -> bool:
        sock = self._sock
        try:
            sock.settimeout(seconds)
            sock.recv(64)
        except OSError:  # TimeoutError (BlockingIOError for 0 s): nobody rang
            return False
        finally:
            sock.setblocking(False)
        return True

    def close(self) -> None:
        self._finalizer()


def _unbind(sock: socket.socket, path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    sock.close()
