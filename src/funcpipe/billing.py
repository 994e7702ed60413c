"""Measured cost: what a training run's calls, requests and invocations cost, next to the prediction.

Every call of a worker reports its seconds and its storage requests by kind
(:meth:`funcpipe.worker.StageWorker.run`; on a function platform also the
function's own, from the start of the invocation, with its status object's
heartbeats, :func:`funcpipe.function.handle`), and the driver counts its own
requests per run (feeds, report polls, deletes, lease renewals, the manifest;
a serverless executor's status polls and cancels) and the invocations it made
(:class:`funcpipe.run.Run`). :func:`measure` prices them at a platform:

* **compute**: each call's seconds rounded up as the platform bills them
  (:meth:`Platform.billed_s`), times the price per second of its memory tier;
* **requests**: every request by kind (PUT, GET, HEAD, LIST, DELETE; a GET or
  HEAD that found nothing at the price of a miss), the workers', the
  functions' status objects' and the driver's;
* **invocations**: every call made, a lifetime stop's re-invocations and a
  retried run's included.

A call on Ray or on threads is not billed by anyone: its seconds are priced
as if the plan's platform had run it (:attr:`MeasuredCost.billed` says which).
Per iteration is the whole over the iterations the fit trained, so it includes
start-up, the last checkpoint and the runs a retry threw away.
:func:`explain` names what makes the measure differ from the prediction.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from funcpipe.errors import ConfigError
from funcpipe.platforms import Platform, resolve
from funcpipe.storage.counting import OPERATIONS

if TYPE_CHECKING:
    from funcpipe.trainer import History

__all__ = ["SOURCES", "MeasuredCost", "Predicted", "explain", "measure", "predicted", "request_usd"]

#: Who made the requests :attr:`MeasuredCost.requests_by` counts: the workers, the functions'
#: status objects (heartbeats, cancel checks), the driver's storage, a serverless executor's watcher.
SOURCES = ("workers", "status", "driver", "watcher")


def request_usd(counts: Mapping[str, float], platform: Platform) -> float:
    """Dollars of requests counted by kind (:meth:`funcpipe.storage.RequestCounter.counts`): a GET or
    HEAD that found nothing (``GET_miss``, ``HEAD_miss``) at ``price_per_miss``, one that found the
    object at ``price_per_get``."""
    found = counts.get("GET", 0) - counts.get("GET_miss", 0) + counts.get("HEAD", 0) - counts.get("HEAD_miss", 0)
    misses = counts.get("GET_miss", 0) + counts.get("HEAD_miss", 0)
    return (counts.get("PUT", 0) * platform.price_per_put + found * platform.price_per_get
            + misses * platform.price_per_miss + counts.get("LIST", 0) * platform.price_per_list
            + counts.get("DELETE", 0) * platform.price_per_delete)


def _kinds(counts: Mapping[str, float]) -> dict[str, float]:
    """Requests by the simulator's kinds (``put, get, miss, list, delete``) from a counter's."""
    return {
        "put": counts.get("PUT", 0),
        "get": counts.get("GET", 0) - counts.get("GET_miss", 0) + counts.get("HEAD", 0) - counts.get("HEAD_miss", 0),
        "miss": counts.get("GET_miss", 0) + counts.get("HEAD_miss", 0),
        "list": counts.get("LIST", 0),
        "delete": counts.get("DELETE", 0),
    }


def _add(total: collections.Counter[str], counts: Mapping[str, int]) -> None:
    for name, value in counts.items():
        total[name] += int(value)


@dataclasses.dataclass(frozen=True)
class MeasuredCost:
    """A training run's cost as measured, priced at one platform.

    Attributes:
        platform: the platform whose prices and billing rule were applied.
        iterations: iterations the fit trained (the per-iteration figures divide by it).
        runs: runs launched (a lifetime stop or a retry starts another).
        invocations: calls made (re-invocations of a lifetime stop and of a retry included).
        calls: calls that reported (a failed or killed call does not).
        billed: whether a function platform ran the calls (``False``: Ray or threads, priced as if).
        seconds: the calls' seconds as measured, summed.
        billed_s: the same, each call rounded up as the platform bills it.
        gb_s: GB-seconds billed (memory of each call's tier times its billed seconds).
        iterations_s: of ``seconds``, the calls' iterations' (the rest: start-up, the last checkpoint).
        cold_starts: calls that were their function instance's first.
        unpriced_calls: calls without a known memory tier (their compute is not in ``compute_usd``).
        requests: every request by kind (:meth:`RequestCounter.counts`).
        requests_by: the same per source (:data:`SOURCES`).
        compute_usd, requests_usd, invocations_usd: the dollars of each component.
    """

    platform: str
    iterations: int
    runs: int
    invocations: int
    calls: int
    billed: bool
    seconds: float
    billed_s: float
    gb_s: float
    iterations_s: float
    cold_starts: int
    unpriced_calls: int
    requests: dict[str, int]
    requests_by: dict[str, dict[str, int]]
    compute_usd: float
    requests_usd: float
    invocations_usd: float
    spec: Platform | None = dataclasses.field(default=None, repr=False, compare=False)  # the platform itself

    @property
    def total_usd(self) -> float:
        return self.compute_usd + self.requests_usd + self.invocations_usd

    def per_iteration(self) -> dict[str, float]:
        """Dollars per iteration trained, by component and in total."""
        n = max(1, self.iterations)
        return {"compute": self.compute_usd / n, "requests": self.requests_usd / n,
                "invocations": self.invocations_usd / n, "total": self.total_usd / n}

    def compare(self, iteration_s: float, cost_usd: float, stage_costs: Iterable[float], workers: int,
                request_counts: Mapping[str, float] | None = None) -> tuple[Predicted, list[str]]:
        """A prediction per iteration split into components (:func:`predicted`) at this measure's platform,
        and the lines that explain the difference (:func:`explain`)."""
        spec = self.spec if self.spec is not None else resolve(self.platform)
        prediction = predicted(iteration_s, cost_usd, stage_costs, workers, spec, request_counts)
        return prediction, explain(self, prediction)

    def to_dict(self) -> dict[str, Any]:
        """As JSON-able data, with :meth:`per_iteration` and the total."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"}
        out["total_usd"] = self.total_usd
        out["per_iteration"] = self.per_iteration()
        return out


def measure(history: History, platform: Platform | str | None = None) -> MeasuredCost | None:
    """Price what ``history`` measured at ``platform`` (default: its plan's); ``None`` without a platform,
    or for ``"local"`` (whose prices only rank plans), or before anything ran.

    Raises:
        ConfigError: ``platform`` is not a platform or the name of one.
    """
    if platform is None:
        platform = history.plan.platform if history.plan is not None else None
        if platform is None or platform == "local":
            return None
    spec = resolve(platform)
    if not history.runs:
        return None
    seconds = billed_s = gb_s = compute = iterations_s = 0.0
    cold = unpriced = 0
    by = {source: collections.Counter[str]() for source in SOURCES}
    for call in history.workers:
        seconds += call["call_s"]
        iterations_s += call["iterations_s"]
        cold += bool(call.get("cold"))
        _add(by["workers"], call["requests"])
        _add(by["status"], call["status_requests"])
        billed = spec.billed_s(call["call_s"])
        billed_s += billed
        memory = call.get("memory_mb")
        tier = next((t for t in spec.tiers if t.memory_mb == memory), None)
        if tier is None:
            unpriced += 1
            continue
        gb_s += billed * tier.memory_mb / 1024
        compute += billed * spec.price_per_s(tier)
    for run in history.runs:
        if not history.driver_requests:  # else the fit's whole, which holds the runs'
            _add(by["driver"], run["driver_requests"])
        _add(by["watcher"], run["watcher_requests"])
    _add(by["driver"], history.driver_requests)
    total: collections.Counter[str] = collections.Counter()
    for counts in by.values():
        total.update(counts)
    names = (*OPERATIONS, "GET_miss", "HEAD_miss")
    invocations = sum(run["invocations"] for run in history.runs)
    return MeasuredCost(
        platform=spec.name, iterations=len(history), runs=len(history.runs), invocations=invocations,
        calls=len(history.workers), billed=bool(history.workers) and all(c["billed"] for c in history.workers),
        seconds=seconds, billed_s=billed_s, gb_s=gb_s, iterations_s=iterations_s, cold_starts=cold,
        unpriced_calls=unpriced, requests={name: total[name] for name in names},
        requests_by={source: {name: counts[name] for name in names} for source, counts in by.items()},
        compute_usd=compute, requests_usd=request_usd(total, spec),
        invocations_usd=invocations * spec.price_per_invocation, spec=spec,
    )


@dataclasses.dataclass(frozen=True)
class Predicted:
    """A prediction's dollars per iteration by component, and what they assume.

    Attributes:
        iteration_s: predicted seconds per iteration.
        workers: functions that run at once.
        compute, requests, invocations: dollars per iteration of each.
        request_counts: predicted requests per iteration by kind (``put, get, miss, list, delete``)
            when the prediction is a simulation, which counts them; else ``None``.
        iterations_per_invocation: iterations one invocation is predicted to live.
    """

    iteration_s: float
    workers: int
    compute: float
    requests: float
    invocations: float
    request_counts: dict[str, float] | None = None
    iterations_per_invocation: int = 1

    @property
    def total(self) -> float:
        return self.compute + self.requests + self.invocations


def predicted(iteration_s: float, cost_usd: float, stage_costs: Iterable[float], workers: int, platform: Platform,
              request_counts: Mapping[str, float] | None = None) -> Predicted:
    """Split a prediction's ``cost_usd`` per iteration into its components, as
    :func:`funcpipe.costmodel.cost_per_iteration` makes it: each stage's functions (``stage_costs``),
    invocations spread over the iterations one invocation lives, and the rest: requests."""
    if workers < 1:
        raise ConfigError(f"a prediction needs at least one worker, got {workers!r}")
    compute = float(sum(stage_costs))
    per_invocation = max(1, math.floor(platform.lifetime_s / max(iteration_s, 1e-9)))
    invocations = workers * platform.price_per_invocation / per_invocation
    return Predicted(iteration_s, workers, compute, max(0.0, cost_usd - compute - invocations), invocations,
                     dict(request_counts) if request_counts is not None else None, per_invocation)


def explain(measured: MeasuredCost, prediction: Predicted) -> list[str]:
    """Lines naming what makes the measured dollars per iteration differ from the predicted, by component."""
    n = max(1, measured.iterations)
    per = measured.per_iteration()
    lines = []
    predicted_s = prediction.iteration_s * prediction.workers
    rounding = measured.billed_s - measured.seconds
    outside = measured.seconds - measured.iterations_s
    waits = measured.iterations_s / n - predicted_s
    compute = (f"compute {_signed(per['compute'] - prediction.compute)}: {measured.billed_s / n:.3f} function-s "
               f"billed per iteration against {predicted_s:.3f} predicted ({prediction.workers} functions x "
               f"{prediction.iteration_s:.3f} s); of them {outside / n:.3f} s outside iterations (start-up, loading, "
               f"the last checkpoint, {measured.cold_starts} cold start(s)), the iterations {_signed(waits, 3, '')} s "
               f"against the predicted (waits for peers and storage), rounding {rounding / n:.4f} s")
    if not measured.billed:
        compute += "; not billed (Ray or threads): priced as if on " + measured.platform
    if measured.unpriced_calls:
        compute += f"; {measured.unpriced_calls} call(s) without a {measured.platform} tier not priced"
    lines.append(compute)
    counts = _kinds(measured.requests)
    extra = []
    if prediction.request_counts is not None:
        for kind, value in counts.items():
            delta = value / n - prediction.request_counts.get(kind, 0.0)
            if abs(delta) >= 0.5:
                extra.append(f"{_signed(delta, 0, '')} {_KIND_NAMES[kind]}")
    else:
        extra.append(f"{counts['miss'] / n:.0f} polls that found nothing (not in the plan's formula)")
    status = measured.requests_by["status"]
    watcher = measured.requests_by["watcher"]
    driver = measured.requests_by["driver"]
    where = (f"per iteration: workers {sum(_billable(measured.requests_by['workers'])) / n:.0f}, "
             f"heartbeats and status {sum(_billable(status)) / n:.0f}, driver {sum(_billable(driver)) / n:.0f}, "
             f"status polls {sum(_billable(watcher)) / n:.0f}")
    lines.append(f"requests {_signed(per['requests'] - prediction.requests)}: "
                 + (", ".join(extra) + "; " if extra else "") + where)
    lifetime = measured.runs - 1
    lines.append(
        f"invocations {_signed(per['invocations'] - prediction.invocations)}: {measured.invocations} over "
        f"{measured.iterations} iteration(s) in {measured.runs} run(s)"
        + (f" ({lifetime} re-launch(es): lifetime stops or retries)" if lifetime else "")
        + f"; predicted: {prediction.workers} per run, a run every {prediction.iterations_per_invocation:,} "
          "iteration(s) (the lifetime over the predicted iteration)"
    )
    return lines


_KIND_NAMES = {"put": "PUT", "get": "GET/HEAD found", "miss": "polls (GET/HEAD found nothing)", "list": "LIST",
               "delete": "DELETE"}


def _billable(counts: Mapping[str, int]) -> list[int]:
    return [counts.get(name, 0) for name in OPERATIONS]


def _signed(value: float, digits: int = 6, unit: str = "$") -> str:
    sign = "+" if value >= 0 else "-"
    return f"{sign}{unit}{abs(value):.{digits}f}"
