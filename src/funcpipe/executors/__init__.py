"""Executors: where stage workers run (local threads, Ray, AWS Lambda, Function Compute).

The public names are in :mod:`funcpipe.backends`; this package holds the implementations.
"""

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
BACKENDS = ("alibaba_fc", "aws_lambda", "ray", "thread")


def get_executor(backend: str | Executor) -> Executor:
    """Resolve a backend name (or pass an :class:`Executor` through)."""
    if isinstance(backend, Executor):
        return backend
    if backend == "ray":
        from funcpipe.executors.ray import Ray  # imported on use: starting Ray is slow

        return Ray()
    if backend == "thread":
        return ThreadExecutor()
    if backend == "aws_lambda":  # cloud SDKs are imported only when asked for
        from funcpipe.executors.aws_lambda import AWSLambda

        return AWSLambda()
    if backend == "alibaba_fc":
        from funcpipe.executors.alibaba_fc import AlibabaFC

        return AlibabaFC()
    raise ConfigError(
        f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or pass an Executor "
        "(e.g. funcpipe.backends.Ray(address=...), funcpipe.backends.AWSLambda(region=...))"
    )
