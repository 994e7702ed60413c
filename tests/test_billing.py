"""funcpipe.billing: measured calls, requests and invocations priced at a platform, beside the prediction."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from funcpipe import ConfigError, History, Plan
from funcpipe.billing import explain, measure, predicted
from funcpipe.platforms import get

#: AWS Lambda x86 us-east-1 and S3 Standard, from their pricing pages (PLATFORMS.md), typed here anew.
GB_S_USD = 0.0000166667
INVOCATION_USD = 0.20 / 1e6
PUT_USD, GET_USD = 0.005 / 1000, 0.0004 / 1000


def counts(put: int = 0, get: int = 0, head: int = 0, lst: int = 0, delete: int = 0, get_miss: int = 0,
           head_miss: int = 0) -> dict[str, int]:
    return {"PUT": put, "GET": get, "HEAD": head, "LIST": lst, "DELETE": delete, "GET_miss": get_miss,
            "HEAD_miss": head_miss}


def call(run: int, stage: int, seconds: float, memory_mb: int | None, requests: dict[str, int],
         status: dict[str, int], *, billed: bool = True, cold: bool | None = False) -> dict[str, object]:
    return {"stage": stage, "replica": 0, "iterations": 2, "run": run, "first": 2 * run, "billed": billed,
            "call_s": seconds, "iterations_s": seconds - 0.5, "memory_mb": memory_mb, "cold": cold,
            "requests": requests, "status_requests": status, "compute_s": 0.0, "wait_s": 0.0, "sync_s": 0.0,
            "update_s": 0.0, "total_s": seconds - 0.5}


def lifetime_history() -> History:
    """Two runs of two functions (a lifetime stop between them), four iterations."""
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2, memory_mb=[1024, 2048])
    history = History(losses=[1.0] * 4, seconds=[1.0] * 4, plan=dataclasses.replace(plan, platform="aws_lambda"))
    history.workers = [
        call(0, 0, 2.0004, 1024, counts(put=3, get=5, get_miss=2), counts(put=4, head=3, head_miss=3), cold=True),
        call(0, 1, 2.5, 2048, counts(put=2, get=4), counts(put=5, head=4, head_miss=4)),
        call(1, 0, 1.0000001, 1024, counts(put=1, get=2, get_miss=1), counts(put=2)),
        call(1, 1, 0.0101, 2048, counts(get=1), counts(put=2)),
    ]
    history.runs = [
        {"first": 0, "iterations": 2, "invocations": 2, "completed": True,
         "driver_requests": counts(put=4, get=3, get_miss=1, delete=1), "watcher_requests": counts(get=6, delete=2)},
        {"first": 2, "iterations": 2, "invocations": 2, "completed": True,
         "driver_requests": counts(put=4, get=2, delete=1), "watcher_requests": counts(get=3, get_miss=1, delete=2)},
    ]
    history.driver_requests = counts(put=10, get=5, get_miss=1, delete=2, lst=1)  # the runs' and the lease's
    return history


def test_billed_seconds_are_rounded_up_to_the_platforms_unit() -> None:
    lam = get("aws_lambda")
    assert lam.billing_granularity_s == 0.001 and get("alibaba_fc").billing_granularity_s == 0.001
    for seconds in (0.0101, 0.010, 1.0000001, 2.5, 0.0004, 899.9995):
        assert lam.billed_s(seconds) == pytest.approx(math.ceil(round(seconds * 1000, 6)) / 1000, abs=1e-12)
    assert lam.billed_s(0.010) == pytest.approx(0.010) and lam.billed_s(0.0101) == pytest.approx(0.011)
    coarse = lam.replace(billing_granularity_s=0.1)
    assert coarse.billed_s(0.25) == pytest.approx(0.3) and coarse.billed_s(0.3) == pytest.approx(0.3)
    with pytest.raises(ConfigError, match=r"billing_granularity_s.*0\.001"):
        lam.replace(billing_granularity_s=0)


def test_measure_prices_every_call_request_and_invocation() -> None:
    history = lifetime_history()
    cost = measure(history)
    assert cost is not None and cost.platform == "aws_lambda" and cost.billed
    billed = [2.001, 2.5, 1.001, 0.011]  # each call rounded up to the millisecond
    gb = [1, 2, 1, 2]
    assert cost.billed_s == pytest.approx(sum(billed))
    assert cost.gb_s == pytest.approx(sum(b * g for b, g in zip(billed, gb, strict=True)))
    assert cost.compute_usd == pytest.approx(cost.gb_s * GB_S_USD)
    # Workers + status objects + the driver's whole fit + the watcher's polls.
    puts = (3 + 2 + 1) + (4 + 5 + 2 + 2) + 10
    found = (5 - 2 + 4 + 2 - 1 + 1) + (3 - 3 + 4 - 4) + (5 - 1) + (6 + 3 - 1)
    misses = (2 + 1) + (3 + 4) + 1 + 1
    assert cost.requests["PUT"] == puts and cost.requests["LIST"] == 1 and cost.requests["DELETE"] == 2 + 4
    assert cost.requests_usd == pytest.approx(puts * PUT_USD + 1 * PUT_USD + (found + misses) * GET_USD)
    assert cost.invocations == 4 and cost.invocations_usd == pytest.approx(4 * INVOCATION_USD)
    assert cost.cold_starts == 1 and cost.runs == 2 and cost.iterations == 4
    assert cost.per_iteration()["total"] == pytest.approx(
        (cost.compute_usd + cost.requests_usd + cost.invocations_usd) / 4)
    # JSON-able, in History.to_dict too.
    data = json.loads(json.dumps(history.to_dict()))
    assert data["measured_cost"]["total_usd"] == pytest.approx(cost.total_usd)
    assert len(data["calls"]) == 4 and len(data["runs"]) == 2


def test_calls_off_a_function_platform_are_priced_as_if_on_the_plans() -> None:
    history = lifetime_history()
    history.workers = [dict(w, billed=False, cold=None) for w in history.workers]
    history.workers[3]["memory_mb"] = 3000  # no Lambda tier of that size
    cost = measure(history)
    assert cost is not None and not cost.billed and cost.unpriced_calls == 1 and cost.cold_starts == 0
    assert cost.compute_usd == pytest.approx((2.001 * 1 + 2.5 * 2 + 1.001 * 1) * GB_S_USD)
    prediction = predicted(1.0, 0.0001, [0.00003, 0.00004], 2, get("aws_lambda"))
    lines = explain(cost, prediction)
    assert "not billed (Ray or threads): priced as if on aws_lambda" in lines[0]
    assert "1 call(s) without a aws_lambda tier not priced" in lines[0]


def test_explain_names_the_differences() -> None:
    cost = measure(lifetime_history())
    assert cost is not None
    lam = get("aws_lambda")
    prediction = predicted(1.0, 0.0001, [0.00003, 0.00004], 2, lam,
                           {"put": 2.0, "get": 3.0, "miss": 0.0, "list": 0.0, "delete": 0.5})
    # Invocations spread over the iterations one lives, the rest of the prediction is requests.
    assert prediction.invocations == pytest.approx(2 * INVOCATION_USD / 900)
    assert prediction.requests == pytest.approx(0.0001 - 0.00007 - prediction.invocations)
    compute, requests, invocations = explain(cost, prediction)
    assert compute.startswith(f"compute -${0.00007 - cost.compute_usd / 4:.6f}: {cost.billed_s / 4:.3f} function-s")
    assert "1 cold start(s)" in compute and f"{(cost.seconds - cost.iterations_s) / 4:.3f} s outside" in compute
    misses = (cost.requests["GET_miss"] + cost.requests["HEAD_miss"]) / 4
    assert f"+{misses:.0f} polls (GET/HEAD found nothing)" in requests
    assert f"+{cost.requests['PUT'] / 4 - 2:.0f} PUT" in requests
    assert "4 over 4 iteration(s) in 2 run(s) (1 re-launch(es)" in invocations


def test_no_measure_without_a_priced_platform() -> None:
    history = lifetime_history()
    assert measure(history, "local") is not None  # asked for by name, it is priced
    history.plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2)
    assert measure(history) is None and history.measured_cost() is None
    assert History().measured_cost("aws_lambda") is None  # nothing ran
    with pytest.raises(ConfigError, match="nowhere"):
        measure(lifetime_history(), "nowhere")
