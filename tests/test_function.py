"""function: one invocation on the function side — build the actor, run the call, report through storage."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from funcpipe import protocol
from funcpipe.errors import ConfigError
from funcpipe.function import handle
from funcpipe.storage import MemoryStorage, counting
from funcpipe.storage.authenticated import AuthenticatedStorage
from tests.fakes.actors import Counted


@pytest.fixture
def memory() -> Iterator[MemoryStorage]:
    storage = MemoryStorage(f"test-function-{uuid.uuid4().hex}")
    yield storage
    storage.clear()


def payload(storage: MemoryStorage, *, actor: str = "tests.fakes.actors:Counted", method: str = "sleep",
            call_args: list[Any] | None = None, **changes: Any) -> dict[str, Any]:
    """An invocation payload as ServerlessActor.payload writes it (its fields, decoded)."""
    event = {
        "funcpipe": protocol.PAYLOAD_FORMAT, "name": "stage 0 replica 0", "actor": actor, "args": ["built"],
        "method": method, "call_args": [0.0] if call_args is None else call_args, "storage_url": storage.url,
        "status_key": f"{protocol.STATUS_PREFIX}{uuid.uuid4().hex}", "status_secret": "5e" * 32, "heartbeat_s": 30.0,
        "versions": protocol.versions(),
    }
    event.update(changes)
    return event


def status(storage: MemoryStorage, event: dict[str, Any]) -> dict[str, Any]:
    """The call's status object, its MAC checked under the call's secret."""
    key = event["status_key"]
    return protocol.decode_status(AuthenticatedStorage(storage, event["status_secret"]).get(key), key)


def test_a_call_reports_its_result(memory: MemoryStorage) -> None:
    event = payload(memory)
    assert handle(event) == {"state": "done"}
    reported = status(memory, event)
    assert reported["result"].pop("function")["requests"]["PUT"] == 2  # started, done
    assert reported == {"state": "done", "result": {"label": "built", "cancelled": False}}


def test_a_call_measures_its_seconds_and_its_status_objects_requests(
    memory: MemoryStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The storage URL also counts every request into a counter of its own, apart from the function's.
    name = f"fn-{uuid.uuid4().hex[:8]}"
    url = f"counted+{memory.url}?counter={name}"
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "3008")
    handle(payload(memory, storage_url=url))  # this process has served a call now: the next is warm
    counting.counter(name).reset()
    event = payload(memory, storage_url=url, heartbeat_s=0.05, call_args=[0.3])
    started = time.perf_counter()
    handle(event)
    wall = time.perf_counter() - started
    measure = status(memory, event)["result"]["function"]
    assert measure["cold"] is False and measure["memory_mb"] == 3008
    assert 0.3 <= measure["seconds"] <= wall
    outer = counting.counter(name).counts()
    assert measure["requests"] == outer  # every beat (a cancel check, a PUT), the last write included
    assert outer["HEAD"] >= 3 and outer["HEAD_miss"] == outer["HEAD"] and outer["PUT"] == 2 + outer["HEAD"]


def test_a_failing_call_reports_cause_and_traceback(memory: MemoryStorage) -> None:
    event = payload(memory, method="fail", call_args=["boom"])
    assert handle(event) == {"state": "failed", "cause": "ValueError: boom"}
    reported = status(memory, event)
    assert reported["cause"] == "ValueError: boom"
    assert "tests/fakes/actors.py" in reported["traceback"]


@pytest.mark.parametrize("name", ["torch", "funcpipe"])
def test_a_function_on_other_versions_refuses_before_it_builds_the_actor(memory: MemoryStorage, name: str) -> None:
    driver = {**protocol.versions(), name: "0.0.1"}
    before = Counted.built
    event = payload(memory, versions=driver)
    outcome = handle(event)
    assert outcome["state"] == "failed"
    cause = status(memory, event)["cause"]
    assert cause.startswith("VersionMismatch: ")
    assert f"this function runs {name} {protocol.versions()[name]}" in cause
    assert f"the driver runs {name} 0.0.1" in cause
    assert "TORCH_VERSION" in cause  # the hint: how to rebuild the image
    assert Counted.built == before


def test_the_versions_compared_leave_out_torch_s_build_tag() -> None:
    import torch

    assert protocol.versions()["torch"] == torch.__version__.partition("+")[0]
    assert "+" not in protocol.versions()["torch"]


def test_a_class_without_cancel_is_refused(memory: MemoryStorage) -> None:
    event = payload(memory, actor="tests.fakes.actors:NoCancel")
    assert handle(event)["state"] == "failed"
    assert status(memory, event)["cause"].startswith("ConfigError: 'tests.fakes.actors:NoCancel' is not an actor class")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"funcpipe": 1}, "format 1, expected 3"),
        ({"versions": None}, "lacks ['versions']"),
        ({"versions": "2.13.0"}, "has versions '2.13.0', not an object"),
        ({"status_key": "elsewhere/k"}, "malformed status key"),
        ({"status_secret": "not hex"}, "malformed status secret"),
        ({"method": "_private"}, "malformed status key or method"),
    ],
)
def test_a_payload_that_is_not_a_funcpipe_call_raises(
    memory: MemoryStorage, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        handle(payload(memory, **changes))
    assert memory.list("") == []  # nothing to report to: nothing written
