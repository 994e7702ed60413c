"""Executors: where stage workers run (local threads, Ray; serverless backends later)."""

from __future__ import annotations

from funcpipe.errors import ConfigError
from funcpipe.executors.base import Actor, ActorHandle, CallGroup, Executor, Resources
from funcpipe.executors.thread import ThreadExecutor

__all__ = [
    "Actor",
    "ActorHandle",
    "CallGroup",
    "Executor",
    "Resources",
    "ThreadExecutor",
    "get_executor",
]

#: Backend names ``Trainer(backend=...)`` accepts.
BACKENDS = ("ray", "thread")


def get_executor(backend: str | Executor) -> Executor:
    """Resolve a backend name (or pass an :class:`Executor` through)."""
    if isinstance(backend, Executor):
        return backend
    if backend == "ray":
        from funcpipe.executors.ray import Ray  # imported on use: starting Ray is slow

        return Ray()
    if backend == "thread":
        return ThreadExecutor()
    raise ConfigError(
        f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or pass an Executor "
        "(e.g. funcpipe.executors.ray.Ray(address=...))"
    )
