"""Actors as Ray actors: local Ray for development and tests, or an existing Ray cluster."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import ray
import ray.exceptions

from funcpipe.errors import BackendError, ConfigError, WorkerFailed
from funcpipe.executors.base import Actor, ActorHandle, Executor, Resources

__all__ = ["Ray", "RayActor", "match_priority"]

log = logging.getLogger(__name__)


def match_priority(niceness: int | None) -> bool:
    """Run the calling thread (and the threads it starts later) at ``niceness`` if it is nicer; whether it now is.

    A local Ray starts its worker processes at niceness 15, so the driver and
    anything else on the machine take the CPU from them first; but a funcpipe
    worker *is* the training (it stands in for a function with CPUs of its
    own), while the driver mostly waits for it. A host therefore runs at the
    driver's niceness. Lowering niceness needs the privilege to (Linux:
    ``CAP_SYS_NICE`` or ``RLIMIT_NICE``); without it, or off POSIX, nothing
    changes. (On Linux niceness is per thread: call it from the thread that
    will start the worker's threads.)
    """
    if niceness is None:
        return False
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > niceness:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
        return os.getpriority(os.PRIO_PROCESS, 0) <= niceness
    except (OSError, AttributeError):  # not permitted, or not POSIX
        return False


def _own_niceness() -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, AttributeError):  # not POSIX
        return None


class _Host:
    """A Ray actor process that hosts one funcpipe actor at a time.

    Starting a Ray actor means starting a Python process and importing torch
    (seconds each); hosts outlive a job, so the next ``fit`` reuses them.
    """

    def __init__(self, niceness: int | None = None) -> None:
        from funcpipe.worker import limit_allocator_retention

        limit_allocator_retention()  # this process's allocator: see the function
        # Ray runs actor methods on the process's main thread, which starts the worker's threads.
        match_priority(niceness)  # the driver's: see the function
        self.instance: Actor | None = None

    def niceness(self) -> int | None:
        """The niceness the actor's methods run at."""
        return _own_niceness()

    def start(self, actor_cls: type[Actor], args: tuple[Any, ...]) -> None:
        self.instance = actor_cls(*args)

    def call(self, method: str, args: tuple[Any, ...], started: None = None) -> Any:
        # ``started`` is the reference returned by ``start``: Ray resolves it first, so
        # an actor whose constructor raised fails every call with that error.
        return getattr(self.instance, method)(*args)

    def stop(self) -> None:
        if self.instance is not None:
            self.instance.cancel()  # releases the threads it holds: this process lives on
        self.instance = None


_ResourceKey = tuple[str, float, "int | None"]  # (Ray job, CPUs, memory MB)

#: Longest :meth:`RayActor.release` waits for a host to drop its actor before killing it.
RELEASE_TIMEOUT_S = 60.0

#: Idle hosts of this process's Ray session, by resources, shared by every ``Ray`` executor.
_IDLE: dict[_ResourceKey, list[Any]] = {}


class RayActor(ActorHandle):
    def __init__(self, host: Any, started: Any, key: _ResourceKey, name: str) -> None:
        self.name = name
        self.host = host
        self._started = started
        self._key = key
        self._gone = False

    def call(self, method: str, *args: Any) -> Future[Any]:
        future: Future[Any] = self.host.call.remote(method, args, self._started).future()
        return future

    def started(self) -> bool:
        """Whether the host was placed and built the actor (or failed to: a call then reports why)."""
        ready, _ = ray.wait([self._started], timeout=0)
        return bool(ready)

    def kill(self) -> None:
        if self._gone:
            return
        self._gone = True
        with contextlib.suppress(ValueError):  # already dead, or never placed
            ray.kill(self.host, no_restart=True)

    def release(self) -> None:
        if self._gone:
            return
        try:
            ray.get(self.host.stop.remote(), timeout=RELEASE_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            log.warning("%s: the Ray actor did not stop within %g s; killing it", self.name, RELEASE_TIMEOUT_S)
            self.kill()
            return
        except ray.exceptions.RayError:
            self._gone = True
            return  # the process died: nothing to keep
        self._gone = True
        _IDLE.setdefault(self._key, []).append(self.host)

    def failure(self, exc: BaseException) -> WorkerFailed:
        if isinstance(exc, ray.exceptions.RayTaskError):
            cause = exc.cause
            if isinstance(cause, WorkerFailed):
                return cause
            return WorkerFailed(self.name, f"{type(cause).__name__}: {cause}", str(exc))
        if isinstance(exc, ray.exceptions.RayActorError):
            return WorkerFailed(self.name, f"worker process died ({type(exc).__name__}): {exc}")
        return super().failure(exc)


class Ray(Executor):
    """Run workers as Ray actors.

    Args:
        address: an existing Ray cluster (``"ray://host:10001"``, ``"auto"``);
            ``None`` starts a local Ray instance on first use, unless this
            process already has one.
        num_cpus: CPUs of the local instance (default: the machine's).
        oversubscribe: when a job asks for more CPUs than the cluster has,
            shrink every worker's request to fit (with a warning) instead of
            failing. A local Ray stands in for functions that would each have
            CPUs of their own, so this is on by default.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        oversubscribe: bool = True,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.oversubscribe = oversubscribe

    def _ensure_started(self) -> None:
        if ray.is_initialized():
            return
        try:
            ray.init(
                address=self.address,
                num_cpus=self.num_cpus if self.address is None else None,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=True,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or "a local Ray instance"
            raise BackendError(f"could not start or reach {where}: {exc}") from exc

    def check_storage(self, url: str) -> None:
        if url.startswith("memory://"):
            raise ConfigError(
                f"storage {url!r} lives inside one process, but Ray workers run in processes "
                "of their own; hint: use file:///some/dir (the default) or backend='thread'"
            )

    def fit_resources(self, requested: Sequence[Resources]) -> list[Resources]:
        """Shrink (or refuse) requests the cluster cannot hold at once.

        An actor whose request does not fit would wait unplaced forever, so a
        job that asks for more than the cluster has is adjusted here, before
        anything is launched.
        """
        self._ensure_started()
        cluster = ray.cluster_resources()  # type: ignore[no-untyped-call]
        fitted = list(requested)
        have_cpus = float(cluster.get("CPU", os.cpu_count() or 1))
        need_cpus = sum(r.num_cpus for r in fitted)
        have_mb = float(cluster.get("memory", 0.0)) / 2**20
        need_mb = sum(r.memory_mb or 0 for r in fitted)
        if (need_cpus > have_cpus or need_mb > have_mb) and not self.oversubscribe:
            raise ConfigError(
                f"the job asks for {need_cpus:g} CPUs and {need_mb:.0f} MB, but the Ray cluster has "
                f"{have_cpus:g} CPUs and {have_mb:.0f} MB; hint: fewer replicas or less memory_mb, "
                "or Ray(oversubscribe=True) to share them"
            )
        if need_cpus > have_cpus:
            scale = have_cpus / need_cpus
            log.warning(
                "job asks for %g CPUs, Ray cluster has %g: workers share CPUs (each asks for %.0f%%)",
                need_cpus, have_cpus, 100 * scale,
            )
            fitted = [Resources(r.num_cpus * scale, r.memory_mb) for r in fitted]
        if need_mb > have_mb:
            # Ray's memory resource only schedules, it limits nothing: drop it rather than hang.
            log.warning(
                "job asks for %.0f MB, Ray cluster has %.0f MB: memory requests are not placed",
                need_mb, have_mb,
            )
            fitted = [Resources(r.num_cpus, None) for r in fitted]
        return fitted

    def launch(self, actor_cls: type[Actor], *args: Any, name: str, resources: Resources) -> RayActor:
        self._ensure_started()
        key: _ResourceKey = (ray.get_runtime_context().get_job_id(), resources.num_cpus, resources.memory_mb)
        idle = _IDLE.get(key)
        if idle:
            host = idle.pop()
        else:
            # Idle hosts of another size hold CPUs the new one may need: free them.
            for other in [k for k in _IDLE if k != key]:
                for stale in _IDLE.pop(other):
                    ray.kill(stale, no_restart=True)
            options: dict[str, Any] = {
                "num_cpus": resources.num_cpus,
                "max_restarts": 0,
                "max_task_retries": 0,
            }
            if resources.memory_mb is not None:
                options["memory"] = resources.memory_mb * 2**20
            try:
                host = ray.remote(_Host).options(**options).remote(_own_niceness())
            except (ValueError, TypeError) as exc:
                raise BackendError(f"Ray could not launch {name}: {exc}") from exc
        return RayActor(host, host.start.remote(actor_cls, args), key, name)

    def shutdown(self) -> None:
        """Kill the idle hosts kept for later jobs (Ray itself keeps running)."""
        for hosts in _IDLE.values():
            for host in hosts:
                ray.kill(host, no_restart=True)
        _IDLE.clear()
