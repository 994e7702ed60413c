"""Executors: where stage workers run (local threads, Ray, AWS Lambda, Function Compute).

The public names are in :mod:`funcpipe.backends`; this package holds the implementations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    "cloud_sdk",
    "get_executor",
]

#: Backend names ``Trainer(backend=...)`` accepts.
BACKENDS = ("alibaba_fc", "aws_lambda", "ray", "thread")

#: The extra (setup.cfg's ``extras_require``) that installs each cloud backend's SDK.
EXTRAS = {"alibaba_fc": "alibaba", "aws_lambda": "aws"}


@contextlib.contextmanager
def cloud_sdk(backend: str) -> Iterator[None]:
    """Wrap the import of a cloud backend: a missing SDK becomes a :class:`ConfigError` naming its extra.

    ::

        with cloud_sdk("aws_lambda"):
            from funcpipe.executors.aws_lambda import AWSLambda

    :func:`get_executor`, :mod:`funcpipe.backends` and ``funcpipe deploy`` import
    the cloud backends through it, so ``Trainer(backend="aws_lambda")`` without
    boto3 says what to install, as ``open_storage("s3://...")`` does.

    Raises:
        ConfigError: the import failed on a module outside funcpipe (the SDK or
            one of its dependencies); the message names that module and
            ``pip install 'funcpipe[<extra>]'``. A funcpipe module that fails
            to import is a bug, and its ImportError passes through.
    """
    try:
        yield
    except ImportError as exc:
        module = exc.name or ""
        if module.partition(".")[0] == "funcpipe":
            raise
        extra = f"'funcpipe[{EXTRAS[backend]}]'"
        if isinstance(exc, ModuleNotFoundError):
            raise ConfigError(
                f"backend {backend!r} needs {module or 'a package'}, which is not installed; hint: pip install {extra}"
            ) from exc
        # The module is there but lacks a name the backend imports: an SDK too old, or a broken install.
        raise ConfigError(
            f"backend {backend!r} cannot import {module or 'its SDK'} ({exc}); hint: pip install --upgrade {extra}"
        ) from exc


def get_executor(backend: str | Executor) -> Executor:
    """Resolve a backend name (or pass an :class:`Executor` through).

    Raises:
        ConfigError: the name is unknown, or a cloud backend's SDK is not
            installed (the message names the module and the pip command).
    """
    if isinstance(backend, Executor):
        return backend
    if backend == "ray":
        from funcpipe.executors.ray import Ray  # imported on use: starting Ray is slow

        return Ray()
    if backend == "thread":
        return ThreadExecutor()
    if backend == "aws_lambda":  # cloud SDKs are imported only when asked for
        with cloud_sdk(backend):
            from funcpipe.executors.aws_lambda import AWSLambda
        return AWSLambda()
    if backend == "alibaba_fc":
        with cloud_sdk(backend):
            from funcpipe.executors.alibaba_fc import AlibabaFC
        return AlibabaFC()
    raise ConfigError(
        f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or pass an Executor "
        "(e.g. funcpipe.backends.Ray(address=...), funcpipe.backends.AWSLambda(region=...))"
    )
