"""Where stage workers run: pass one of these as ``Trainer(backend=...)``.

::

    Trainer(..., backend=AWSLambda(region="us-east-1"), storage="s3://bucket/prefix")
    Trainer(..., backend=AlibabaFC(region="cn-hangzhou", account_id="..."), storage="oss://bucket/prefix")
    Trainer(..., backend=Ray(address="ray://head:10001"), storage="s3://bucket/prefix")

or by name: ``backend="aws_lambda" | "alibaba_fc" | "ray" | "thread"`` (the
cloud ones configured from the environment). Each class is imported on first
use, so cloud SDKs and Ray load only for the backend you pick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from funcpipe.executors.alibaba_fc import AlibabaFC
    from funcpipe.executors.aws_lambda import AWSLambda
    from funcpipe.executors.base import Executor
    from funcpipe.executors.ray import Ray
    from funcpipe.executors.serverless import Timing
    from funcpipe.executors.thread import ThreadExecutor as Thread

__all__ = ["AWSLambda", "AlibabaFC", "Executor", "Ray", "Thread", "Timing"]

#: name -> (module, attribute, the backend whose cloud SDK the module imports, or None).
_WHERE = {
    "AWSLambda": ("funcpipe.executors.aws_lambda", "AWSLambda", "aws_lambda"),
    "AlibabaFC": ("funcpipe.executors.alibaba_fc", "AlibabaFC", "alibaba_fc"),
    "Executor": ("funcpipe.executors.base", "Executor", None),
    "Ray": ("funcpipe.executors.ray", "Ray", None),
    "Thread": ("funcpipe.executors.thread", "ThreadExecutor", None),
    "Timing": ("funcpipe.executors.serverless", "Timing", None),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr, backend = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'funcpipe.backends' has no attribute {name!r}") from None
    if backend is None:
        return getattr(importlib.import_module(module), attr)
    from funcpipe.executors import cloud_sdk

    with cloud_sdk(backend):  # a missing SDK: ConfigError naming funcpipe[aws] / funcpipe[alibaba]
        loaded = importlib.import_module(module)
    return getattr(loaded, attr)
