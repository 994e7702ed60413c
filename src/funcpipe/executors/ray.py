"""Actors as Ray actors: local Ray for development and tests, or an existing Ray cluster."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit

import ray
import ray.exceptions

from funcpipe.errors import BackendError, ConfigError, WorkerFailed
from funcpipe.executors.base import Actor, ActorHandle, Executor, Resources
from funcpipe.storage.throttled import SCHEME_PREFIX

__all__ = ["Ray", "RayActor", "match_priority", "other_hosts", "same_address"]

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

#: Default :attr:`Ray.start_timeout_s`: a worker process starting and importing torch on a
#: loaded node takes seconds to a minute; an autoscaler adding a node, minutes.
START_TIMEOUT_S = 300.0

#: The address this process's Ray was started with by a ``Ray`` executor (``None``: not by one).
_INIT_ADDRESS: str | None = None

_LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


def _host_port(address: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``"ray://host:port"`` or ``"host:port"`` (scheme ``""``)."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:  # not a number
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port


def _is_local(host: str, local: set[str]) -> bool:
    if host in _LOOPBACK_NAMES or host in local:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _resolved(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def local_addresses() -> set[str]:
    """The names and IP addresses of this host (Ray's node IP for it, the host name's, loopback)."""
    names = {"127.0.0.1", "::1", *_LOOPBACK_NAMES, socket.gethostname().lower()}
    with contextlib.suppress(Exception):  # Ray's own guess of the IP this host is reached at
        names.add(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    with contextlib.suppress(OSError):
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    return names


def same_address(requested: str, running: str, local: set[str]) -> bool:
    """Whether Ray address ``requested`` names ``running`` (both ``[ray://]host:port``).

    Hosts compare by IP; every address of this host (``local``, loopback) is one host.
    A ``ray://`` address (Ray Client's server) and a GCS address are never the same.
    """
    scheme_a, host_a, port_a = _host_port(requested)
    scheme_b, host_b, port_b = _host_port(running)
    if scheme_a != scheme_b or port_a != port_b or port_a is None:
        return False
    if _is_local(host_a, local) and _is_local(host_b, local):
        return True
    return host_a == host_b or _resolved(host_a) == _resolved(host_b)


def other_hosts(nodes: Iterable[Mapping[str, Any]], local: set[str]) -> list[str]:
    """The addresses of the live nodes (as :func:`ray.nodes` lists them) that are not on this host."""
    found: list[str] = []
    for node in nodes:
        address = str(node.get("NodeManagerAddress", ""))
        if node.get("Alive", True) and not _is_local(address.lower(), local) and address not in found:
            found.append(address)
    return found


def _ray_reason(exc: BaseException) -> str:
    """What Ray said, along the chain of causes: its connection errors keep the reason (a
    missing auth token, with Ray's hint) in a cause, as the last line of a traceback."""
    reasons: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        if "Traceback (most recent call last)" in text:
            head, _, rest = text.partition("Traceback (most recent call last)")
            lines = [line.strip() for line in rest.splitlines() if line.strip()]
            text = " ".join(part for part in (head.strip().rstrip(":").strip(), lines[-1] if lines else "") if part)
        if text and not any(text in earlier for earlier in reasons):
            reasons.append(text)
        current = current.__cause__ or current.__context__
    return ": ".join(reasons) or type(exc).__name__


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
        address: an existing Ray cluster (``"ray://host:10001"`` needs
            ``funcpipe[ray]``, ``"host:6379"`` from a node of the cluster,
            ``"auto"``); ``None`` starts a local Ray instance on first use,
            unless this process already has one. An address other than the Ray
            this process already runs is :class:`~funcpipe.ConfigError`.
        num_cpus: CPUs of the local instance (default: the machine's).
        oversubscribe: when a job asks for more CPUs than the cluster has,
            shrink every worker's request to fit (with a warning) instead of
            failing. A local Ray stands in for functions that would each have
            CPUs of their own, so this is on by default.
        shared_storage: accept ``file://`` storage on a cluster with nodes on
            other hosts, because the directory is mounted at the same path on
            every node (NFS, a cluster file system). Off: such storage is
            refused, since workers elsewhere would not see the driver's files.
        start_timeout_s: how much longer than ``Trainer(timeout_s=...)`` a worker
            may take to start (be placed, start its process, import torch); the
            first iteration's wait counts from when all started.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        oversubscribe: bool = True,
        shared_storage: bool = False,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ConfigError(
                f"Ray(address={address!r}) is not an address; hint: \"ray://head:10001\", \"head:6379\", "
                "\"auto\", or None for a local Ray"
            )
        if isinstance(start_timeout_s, bool) or not isinstance(start_timeout_s, int | float) or not (
            math.isfinite(start_timeout_s) and start_timeout_s >= 0
        ):
            raise ConfigError(
                f"Ray(start_timeout_s={start_timeout_s!r}) must be a finite number of seconds >= 0; "
                f"hint: the default {START_TIMEOUT_S:g}"
            )
        self.address = address
        self.num_cpus = num_cpus
        self.oversubscribe = oversubscribe
        self.shared_storage = shared_storage
        self.start_timeout_s = float(start_timeout_s)

    def _ensure_started(self) -> None:
        global _INIT_ADDRESS
        if ray.is_initialized():
            self._check_running()
            return
        try:
            with _ray_start_up_to_our_log():
                ray.init(
                    address=self.address,
                    num_cpus=self.num_cpus if self.address is None else None,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    log_to_driver=True,
                )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.address or "a local Ray instance"
            hint = ""
            if self.address is not None:
                hint = (
                    "; hint: a cluster with token authentication needs RAY_AUTH_MODE=token and its token here "
                    "(RAY_AUTH_TOKEN or ~/.ray/auth_token); a ray:// address needs `pip install funcpipe[ray]`"
                )
            raise BackendError(f"could not start or reach {where}: {_ray_reason(exc)}{hint}") from exc
        _INIT_ADDRESS = self.address

    def _running_addresses(self) -> list[str]:
        """The addresses that name the Ray this process runs: its GCS's, and the one it was started with."""
        found = [_INIT_ADDRESS] if _INIT_ADDRESS is not None else []
        with contextlib.suppress(Exception):  # a Ray Client connection has no GCS address here
            gcs = ray.get_runtime_context().gcs_address
            if gcs:
                found.append(str(gcs))
        return found

    def _check_running(self) -> None:
        """Refuse an ``address`` that is not the Ray this process already runs (Ray would ignore it)."""
        requested = self.address
        if requested is None:
            return
        if requested == "auto":
            requested = os.environ.get("RAY_ADDRESS") or None
            if requested is None or requested == "auto":
                return  # "auto": whichever cluster this process joined
        running = self._running_addresses()
        local = local_addresses()
        if requested in running or any(same_address(requested, address, local) for address in running):
            return
        raise ConfigError(
            f"Ray(address={self.address!r}) asks for another Ray than the one this process already runs "
            f"({', '.join(running) or 'unknown address'}), and Ray cannot run two; hint: Ray(address=None) "
            "uses the running one, or call ray.shutdown() before the Trainer connects"
        )

    def check_storage(self, url: str) -> None:
        inner = url[len(SCHEME_PREFIX):] if url.startswith(SCHEME_PREFIX) else url
        scheme = urlsplit(inner).scheme.lower()
        if scheme == "memory":
            raise ConfigError(
                f"storage {url!r} lives inside one process, but Ray workers run in processes "
                "of their own; hint: use file:///some/dir (the default) or backend='thread'"
            )
        if scheme == "file" and not self.shared_storage and (self.address is not None or ray.is_initialized()):
            # (No address and no Ray yet: the local Ray started on first use is all on this host.)
            self._ensure_started()
            remote = other_hosts(ray.nodes(), local_addresses())  # type: ignore[no-untyped-call]
            if remote:
                raise ConfigError(
                    f"storage {url!r} is a directory on this machine, but the Ray cluster has nodes on other "
                    f"hosts ({', '.join(remote)}), whose workers cannot read it; hint: use object storage "
                    "(s3://bucket/prefix, oss://bucket/prefix), or, for a directory mounted at this path on "
                    "every node, Ray(..., shared_storage=True)"
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
            # As asked (oversubscribe, the default): a note in the log, not a warning through the bar.
            log.info(
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


class _ToOurLog(logging.Filter):
    """On Ray's own stderr handlers: a record below ERROR goes to funcpipe's log (INFO) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.name.partition(".")[0] != "ray":
            return True  # an error, or not Ray's (a handler Ray's logger shares with the root)
        if not getattr(record, "funcpipe_forwarded", False):  # once, whichever of Ray's handlers asks first
            record.funcpipe_forwarded = True
            log.info("ray: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _ray_start_up_to_our_log() -> Iterator[None]:
    """While Ray starts, its notes and warnings (``Token authentication is enabled ...``) go to funcpipe's
    log rather than through the progress bar on stderr; its errors still show."""
    ray_logger = logging.getLogger("ray")
    diverted = _ToOurLog()
    handlers = list(ray_logger.handlers)
    for handler in handlers:
        handler.addFilter(diverted)
    try:
        yield
    finally:
        for handler in {*handlers, *ray_logger.handlers}:
            handler.removeFilter(diverted)
