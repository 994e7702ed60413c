"""One live run per job: a lease in storage, taken with a conditional create and kept fresh.

A fit holds its job's lease from its start to its end. The lease is a chain of
*generations*, ``jobs/<job>.lease.<n>``, each created with
:meth:`Storage.create <funcpipe.storage.Storage.create>` (S3 ``If-None-Match: *``,
OSS ``x-oss-forbid-overwrite``, a hard link for files, a lock in memory), so of
two drivers that try to take the same generation exactly one succeeds. The
holder rewrites its own generation every ``ttl_s / 4`` seconds (the renewal
also looks for a newer generation: if another driver took the job over, the
holder's run fails with :class:`~funcpipe.LeaseLost`) and deletes it when the
fit ends.

A lease is *stale* when its holder stopped renewing it for ``ttl_s`` seconds,
or at once when it was taken on this host by a process that is gone (a killed
kernel). A stale lease is taken over by creating the next generation; a live
one refuses the fit with :class:`~funcpipe.JobBusy`, naming the holder and how
to take over. Stale judgement compares the holder's renewal time with this
machine's clock: clocks of different machines must agree to well within
``ttl_s``.

Leases are plain JSON (not authenticated): a forged lease can only refuse or
allow a fit, never make one consume another's objects (run ids and MACs see
to that, :mod:`funcpipe.protocol`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from funcpipe.errors import FuncpipeError, JobBusy, LeaseLost, StorageError
from funcpipe.storage import Storage

__all__ = ["LEASE_TTL_S", "Holder", "Lease", "lease_key"]

log = logging.getLogger(__name__)

#: Seconds without a renewal after which a lease is stale (its holder is taken to be gone).
LEASE_TTL_S = 60.0

_FORMAT = "funcpipe-lease-v1"


def lease_key(job: str, generation: int) -> str:
    """The key of generation ``generation`` of ``job``'s lease."""
    return f"jobs/{job}.lease.{generation:08d}"


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lease generation, as its object says."""

    generation: int
    run: str
    host: str
    pid: int
    since: float
    renewed: float
    ttl_s: float

    def stale(self, now: float) -> bool:
        """Not renewed for ``ttl_s`` seconds, or taken on this host by a process that is gone."""
        if now - self.renewed > self.ttl_s:
            return True
        return self.host == socket.gethostname() and self.pid != os.getpid() and not _alive(self.pid)

    def describe(self, now: float) -> str:
        since = datetime.datetime.fromtimestamp(self.since, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (f"run {self.run} on {self.host} (pid {self.pid}), since {since}, last renewed "
                f"{max(0.0, now - self.renewed):.0f} s ago")


class Lease:
    """The lease of ``job`` for run ``run`` in ``storage``.

    Args:
        storage: the job's storage.
        job: the job's name.
        run: the run id of the fit that takes it.
        ttl_s: seconds without a renewal after which the lease is stale.
        clock: wall-clock time, seconds (tests replace it).
    """

    def __init__(
        self, storage: Storage, job: str, run: str, *, ttl_s: float = LEASE_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.job = job
        self.run = run
        self.ttl_s = ttl_s
        self.clock = clock
        self.generation: int | None = None  # held, while not None
        self._since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: Holder | None = None

    # -- reading -----------------------------------------------------------------------------

    def holder(self) -> Holder | None:
        """The newest generation's holder, or ``None``: nobody holds the job."""
        generations = self._generations()
        if not generations:
            return None
        newest = generations[-1]
        data = self.storage.get_if_exists(lease_key(self.job, newest))
        if data is None:  # released just now
            return None
        return _decode(data, newest)

    def busy(self) -> Holder | None:
        """The holder of a live lease that is not this run's, if any."""
        holder = self.holder()
        if holder is None or holder.run == self.run or holder.stale(self.clock()):
            return None
        return holder

    def refuse_if_busy(self) -> None:
        """Raise :class:`~funcpipe.JobBusy` if another run holds a live lease on the job."""
        holder = self.busy()
        if holder is not None:
            raise self.busy_error(holder, self.clock())

    # -- holding -----------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease (the next generation) and keep it fresh until :meth:`release`.

        Raises:
            JobBusy: another run holds a live lease, or took the generation first.
        """
        holder = self.holder()
        now = self.clock()
        if holder is not None and holder.run != self.run and not holder.stale(now):
            raise self.busy_error(holder, now)
        generation = 0 if holder is None else holder.generation + 1
        if holder is not None and holder.run != self.run:
            log.warning("job %s: taking over the stale lease of %s", self.job, holder.describe(now))
        self._since = now
        if not self.storage.create(lease_key(self.job, generation), self._encode(now)):
            winner = self.holder()
            ours = winner is not None and winner.generation == generation and winner.run == self.run
            if not ours:  # (ours: the SDK retried a create whose first answer was lost)
                if winner is not None:
                    raise self.busy_error(winner, self.clock())
                raise JobBusy(f"job {self.job!r}: another fit took its lease at the same moment; hint: one fit "
                              "per job at a time")
        self.generation = generation
        self._lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"funcpipe-lease-{self.job}", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`~funcpipe.LeaseLost` if another run took the job over while this one held it."""
        if self._lost is not None:
            now = self.clock()
            raise LeaseLost(
                f"job {self.job!r} was taken over by {self._lost.describe(now)} while this fit (run {self.run}) "
                "ran; this fit stops so that one run trains the job; hint: do not run two fits of one job, or "
                "give each its own Trainer(job=...)"
            )

    def release(self) -> None:
        """Stop renewing and delete this run's generation and the stale ones before it (unless another run
        took the job over: its release deletes them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.generation is None:
            return
        own, self.generation = self.generation, None
        try:
            if not self.storage.exists(lease_key(self.job, own + 1)):
                for g in range(own, -1, -1):  # newest first, so the chain stays contiguous
                    self.storage.delete([lease_key(self.job, g)])
        except FuncpipeError as exc:
            log.warning("job %s: could not release its lease: %s", self.job, exc)

    def delete_all(self) -> None:
        """Delete every generation (:meth:`Trainer.clean`, when no live run holds the job)."""
        for g in reversed(self._generations()):
            self.storage.delete([lease_key(self.job, g)])

    def renew(self) -> None:
        """Rewrite this run's generation with the time now; note a newer generation (a takeover)."""
        if self.generation is None:
            return
        newer = self.storage.get_if_exists(lease_key(self.job, self.generation + 1))
        if newer is not None:
            self._lost = _decode(newer, self.generation + 1)
            self._stop.set()
            return
        self.storage.put(lease_key(self.job, self.generation), self._encode(self.clock()))

    # -- internals -----------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except StorageError as exc:  # the next renewal tries again
                log.warning("job %s: could not renew its lease: %s", self.job, exc)

    def _generations(self) -> list[int]:
        """The generations in storage, found by key from 0 up (no listing: some stores list slowly or not at
        all). They stay contiguous: a holder deletes its generation only when no newer one exists, and the
        newest holder deletes all of them, newest first."""
        found: list[int] = []
        while self.storage.exists(lease_key(self.job, len(found))):
            found.append(len(found))
        return found

    def _encode(self, now: float) -> bytes:
        return json.dumps({
            "format": _FORMAT, "job": self.job, "run": self.run, "host": socket.gethostname(),
            "pid": os.getpid(), "since": self._since, "renewed": now, "ttl_s": self.ttl_s,
        }, sort_keys=True).encode()

    def busy_error(self, holder: Holder, now: float) -> JobBusy:
        """The :class:`~funcpipe.JobBusy` naming ``holder`` and how to take over."""
        return JobBusy(
            f"job {self.job!r} is being trained by another fit: {holder.describe(now)}; one live run per job; "
            f"hint: wait for it to finish, or give this trainer another Trainer(job=...); once its holder stops "
            f"renewing the lease ({holder.ttl_s:g} s without a renewal, or at once if its process on this host is "
            "gone) fit(resume=True) takes the job over, or trainer.clean() deletes it"
        )


def _decode(data: bytes, generation: int) -> Holder:
    """A lease object's holder; a malformed one reads as a holder that renewed at time 0 (stale)."""
    try:
        raw = json.loads(data)
        return Holder(generation, str(raw["run"]), str(raw["host"]), int(raw["pid"]), float(raw["since"]),
                      float(raw["renewed"]), float(raw["ttl_s"]))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return Holder(generation, "?", "?", 0, 0.0, 0.0, 0.0)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one we may not signal counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped) is gone too.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    return True
