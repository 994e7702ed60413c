"""funcpipe.backends: the public names of the executors, imported on use."""

from __future__ import annotations

import sys

import pytest

import funcpipe.backends
from funcpipe.errors import ConfigError
from funcpipe.executors import get_executor
from funcpipe.executors.aws_lambda import AWSLambda
from funcpipe.executors.base import Executor
from funcpipe.executors.thread import ThreadExecutor


def test_all_is_sorted_and_resolves() -> None:
    assert funcpipe.backends.__all__ == sorted(funcpipe.backends.__all__)
    for name in funcpipe.backends.__all__:
        assert getattr(funcpipe.backends, name) is not None


def test_names_are_the_implementations() -> None:
    assert funcpipe.backends.AWSLambda is AWSLambda
    assert funcpipe.backends.Thread is ThreadExecutor
    assert funcpipe.backends.Executor is Executor


def test_unknown_name() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Lambda'"):
        funcpipe.backends.Lambda  # noqa: B018


def test_backend_names(aws_env: dict[str, str]) -> None:
    assert isinstance(get_executor("aws_lambda"), AWSLambda)
    assert isinstance(get_executor("thread"), ThreadExecutor)
    with pytest.raises(ValueError, match="alibaba_fc, aws_lambda, ray, thread"):
        get_executor("lambda")


def test_a_cloud_backend_without_its_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if boto3 were not installed
    monkeypatch.delitem(sys.modules, "funcpipe.executors.aws_lambda")
    with pytest.raises(ConfigError, match=r"^backend 'aws_lambda' needs boto3, which is not installed; "
                                          r"hint: pip install 'funcpipe\[aws\]'$"):
        funcpipe.backends.AWSLambda  # noqa: B018
