"""Planner: stage cuts, memory tiers, replicas, micro-batch size, schedule and all-reduce chosen together.

:func:`plan` searches every plan of the space (:mod:`funcpipe.planner.search`): one
stage exhaustively (the baselines' spaces: one function with gradient accumulation,
every LambdaML configuration), pipelines per micro-batch size and schedule by the
exact dynamic program of :mod:`funcpipe.planner.dp` over the closed formula of
:mod:`funcpipe.costmodel` (the FuncPipe paper's §5 program; CP-SAT,
:mod:`funcpipe.planner.model`, solves a pair the program cannot finish in time), and
the paper's own configuration; the simulator re-ranks the best of them, so what it
returns is never worse, by the simulator, than any baseline's best plan.
:func:`pareto` traces the cost–time frontier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from funcpipe.errors import ConfigError, PlanInfeasible, PlanTimeout
from funcpipe.planner.search import (
    DEFAULT_MAX_REPLICAS,
    DEFAULT_MAX_STAGES,
    Goal,
    Result,
    Search,
    Space,
    objective_weight,
)
from funcpipe.plans import Plan
from funcpipe.platforms import Platform
from funcpipe.profiler import ModelProfile
from funcpipe.simulator import Simulation

__all__ = ["DEFAULT_MAX_REPLICAS", "DEFAULT_MAX_STAGES", "objective_weight", "pareto", "plan"]

#: How many of the best plans by the formula the simulator re-ranks.
DEFAULT_CANDIDATES = 6
#: :func:`plan` and :func:`pareto` show a progress bar when their ``time_limit_s`` is at least this
#: (unless ``progress=False``): below it they return within seconds.
PROGRESS_MIN_TIME_LIMIT_S = 10.0


def plan(
    profile: ModelProfile,
    platform: Platform | str,
    *,
    global_batch_size: int,
    micro_batch_size: int | Sequence[int] | None = None,
    schedule: str | None = None,
    sync: str | None = None,
    objective: str | float = "time",
    deadline_s: float | None = None,
    budget_usd: float | None = None,
    max_stages: int | None = None,
    max_replicas: int | None = None,
    memory_mb: int | Sequence[int] | None = None,
    time_limit_s: float = 30.0,
    candidates: int = DEFAULT_CANDIDATES,
    samples: int | None = None,
    progress: bool | None = None,
) -> Plan:
    """The best plan for ``profile`` on ``platform``.

    Args:
        profile: the model's profile (:func:`funcpipe.profile`).
        platform: a :class:`~funcpipe.platforms.Platform` or its name.
        global_batch_size: samples per iteration.
        micro_batch_size: samples per micro-batch; ``None`` (the default) chooses among the
            divisors of the global batch, a list chooses among those, an int fixes it.
        schedule: ``"gpipe"`` or ``"1f1b"`` (:mod:`funcpipe.schedule`); ``None`` chooses.
        sync: the all-reduce among a stage's replicas, ``"pipelined"`` or ``"four_phase"``;
            ``None`` chooses per stage.
        objective: ``"time"`` (seconds per iteration), ``"cost"`` (dollars per
            iteration), or a weight ``w`` in [0, 1] minimising
            ``w * time / fastest + (1 - w) * cost / cheapest``.
        deadline_s: seconds one iteration may take at most.
        budget_usd: dollars one iteration may cost at most.
        max_stages: most pipeline stages (default ``min(layers, 8)``).
        max_replicas: most replicas per stage (default 8 per stage of a pipeline, and up
            to one per micro-batch for a single stage: LambdaML's worker counts).
        memory_mb: the memory tiers allowed (one or several of the platform's).
        time_limit_s: time for the exact searches; the whole call takes at most about twice this.
        candidates: how many of the best plans by the formula the simulator re-ranks.
        samples: the data set's size; the plan's table then also shows time and
            dollars per epoch (``Plan.samples``).
        progress: show a progress bar, one step per micro-batch size and schedule searched,
            with the best plan so far; ``None`` shows one when ``time_limit_s`` is at least
            :data:`PROGRESS_MIN_TIME_LIMIT_S`.

    Returns:
        A :class:`~funcpipe.Plan` carrying its ``micro_batch_size``, ``schedule`` and
        ``sync``, the simulator's predicted iteration seconds and dollars (in total and
        per stage), the search's status (``"optimal"``: the formula's optimum over the
        whole space is proven) and gap, and the solve time.

    Raises:
        ConfigError: an argument is malformed (the message names it).
        PlanInfeasible: no plan fits (a layer larger than every tier), or none
            meets the deadline or budget.
    """
    started = time.perf_counter()
    space = Space.create(profile, platform, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                         schedule=schedule, sync=sync, max_stages=max_stages, max_replicas=max_replicas,
                         memory_mb=memory_mb)
    weight = objective_weight(objective)
    _check_limits(deadline_s, budget_usd, time_limit_s, samples)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ConfigError(f"candidates must be a positive integer, got {candidates!r}")
    give_up_at = started + 2 * time_limit_s
    search = Search(space)
    combos = len(space.sizes) * len(space.schedules)
    steps = combos * (3 if 0 < weight < 1 else 1)
    with _progress_bar(progress, time_limit_s, steps, f"planning on {space.platform.name}") as bar:

        def run(goal: Goal, limit: float) -> Result:
            # One step per (micro-batch size, schedule) of the space, those the search skips included.
            start = bar.n
            try:
                return search.run(goal, candidates=candidates, time_limit_s=limit, give_up_at=give_up_at, bar=bar)
            finally:
                bar.update(max(0, start + combos - bar.n))

        if 0 < weight < 1:  # normalise by the fastest and the cheapest plan
            limit = time_limit_s / 3
            fastest = run(Goal.of(1.0, deadline_s, budget_usd), limit).best
            cheapest = run(Goal.of(0.0, deadline_s, budget_usd), limit).best
            goal = Goal.of(weight, deadline_s, budget_usd, fastest.iteration_s, max(cheapest.cost_usd, 1e-12))
            result = run(goal, limit)
        else:
            result = run(Goal.of(weight, deadline_s, budget_usd), time_limit_s)
        bar.set_postfix_str(f"best {result.best.iteration_s:.3g} s, ${result.best.cost_usd:.3g}", refresh=False)
        bar.total = bar.n
        bar.refresh()
    return _to_plan(result.best, result, time.perf_counter() - started, samples)


def pareto(
    profile: ModelProfile,
    platform: Platform | str,
    *,
    global_batch_size: int,
    micro_batch_size: int | Sequence[int] | None = None,
    schedule: str | None = None,
    sync: str | None = None,
    points: int = 12,
    max_stages: int | None = None,
    max_replicas: int | None = None,
    memory_mb: int | Sequence[int] | None = None,
    time_limit_s: float = 10.0,
    samples: int | None = None,
    progress: bool | None = None,
) -> list[Plan]:
    """The cost–time frontier: plans no other plan the search saw beats on both time and cost.

    Finds the fastest and the cheapest plan, then the cheapest plan under deadlines
    between them, splitting the widest gaps of the frontier until it holds ``points``
    plans or no deadline finds a new one; every plan is simulated, and only those no
    other simulated plan dominates are kept.

    Args:
        points: how many plans to return at most (the fastest and the cheapest among them);
            fewer only when the frontier has fewer distinct points.
        time_limit_s: time for the exact searches of all points together.
        samples: the data set's size, carried by every plan (``Plan.samples``).
        progress: show a progress bar, one step per point searched; ``None`` shows one
            when ``time_limit_s`` is at least :data:`PROGRESS_MIN_TIME_LIMIT_S`.
        The other arguments are those of :func:`plan`.

    Returns:
        Plans sorted by predicted iteration time (fastest first), each carrying
        its predicted seconds and dollars.
    """
    started = time.perf_counter()
    space = Space.create(profile, platform, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                         schedule=schedule, sync=sync, max_stages=max_stages, max_replicas=max_replicas,
                         memory_mb=memory_mb)
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ConfigError(f"points must be an integer >= 2, got {points!r}")
    _check_limits(None, None, time_limit_s, samples)
    search = Search(space)
    give_up_at = started + 2 * time_limit_s
    per_point = time_limit_s / (points + 2)
    with _progress_bar(progress, time_limit_s, points, f"frontier on {space.platform.name}") as bar:
        results: list[Result] = []
        for weight in (1.0, 0.0):
            results.append(search.run(Goal.of(weight, None, None), candidates=2, time_limit_s=per_point,
                                      give_up_at=give_up_at))
            bar.update(1)
        fastest, cheapest = results[0].best, results[1].best
        tried: set[float] = set()
        while time.perf_counter() < give_up_at:
            frontier = _frontier(search.cache.values())
            if len(frontier) >= points:
                break
            deadline = _widest_gap(frontier, fastest.iteration_s, cheapest.iteration_s, tried)
            if deadline is None:
                break
            tried.add(deadline)
            with contextlib.suppress(PlanInfeasible, PlanTimeout):  # no plan meets it, or none found in time
                results.append(search.run(Goal.of(0.0, deadline, None), candidates=2, time_limit_s=per_point,
                                          give_up_at=give_up_at))
            bar.update(1)
        bar.total = bar.n
        bar.refresh()
    frontier = _spread(_frontier(search.cache.values()), points)
    status = "optimal" if all(r.status == "optimal" for r in results) else "feasible"
    gap = max(r.gap for r in results)
    seconds = time.perf_counter() - started
    summary = Result(frontier[0], tuple(frontier), status, gap, math.nan)
    return [_to_plan(sim, summary, seconds, samples) for sim in frontier]


def _frontier(sims: Any) -> list[Simulation]:
    """The simulations no other beats or matches on both time and cost (one of equal ones), fastest first."""
    ordered = sorted(sims, key=lambda s: (s.iteration_s, s.cost_usd))
    out: list[Simulation] = []
    for sim in ordered:
        if out and sim.cost_usd >= out[-1].cost_usd:
            continue  # as fast or slower, and no cheaper than a faster one
        out.append(sim)
    return out


def _widest_gap(frontier: list[Simulation], low: float, high: float, tried: set[float]) -> float | None:
    """A deadline between two neighbours of the frontier, in its widest gap (in log time) not tried yet."""
    times = sorted({s.iteration_s for s in frontier} | {low, high})
    gaps = []
    for a, b in itertools.pairwise(times):
        if b > a * (1 + 1e-3):
            middle = math.sqrt(a * b)
            if all(abs(middle / t - 1) > 1e-3 for t in tried):
                gaps.append((b / a, middle))
    if not gaps:
        return None
    return max(gaps)[1]


def _spread(frontier: list[Simulation], points: int) -> list[Simulation]:
    """At most ``points`` of the frontier: the fastest, the cheapest and the rest evenly spaced in log time."""
    if len(frontier) <= points:
        return frontier
    logs = [math.log(s.iteration_s) for s in frontier]
    chosen = {0, len(frontier) - 1}
    for k in range(1, points - 1):
        target = logs[0] + (logs[-1] - logs[0]) * k / (points - 1)
        free = [i for i in range(len(frontier)) if i not in chosen]
        chosen.add(min(free, key=lambda i: abs(logs[i] - target)))
    return [frontier[i] for i in sorted(chosen)]


def _to_plan(sim: Simulation, result: Result, seconds: float, samples: int | None) -> Plan:
    return dataclasses.replace(
        sim.plan,
        platform=sim.platform,
        predicted_iteration_s=sim.iteration_s,
        predicted_cost_usd=sim.cost_usd,
        predicted_stages=sim.stages,
        solver_status=result.status,
        solver_gap=result.gap,
        solve_s=seconds,
        samples=samples,
    )


def _check_limits(deadline_s: object, budget_usd: object, time_limit_s: object, samples: object) -> None:
    for name, value in (("deadline_s", deadline_s), ("budget_usd", budget_usd)):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if not (isinstance(time_limit_s, (int, float)) and not isinstance(time_limit_s, bool) and time_limit_s > 0):
        raise ConfigError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ConfigError(f"samples must be a positive integer (the data set's size), got {samples!r}")


def _progress_bar(progress: object, time_limit_s: float, total: int, desc: str) -> Any:
    """A tqdm bar of ``total`` steps, shown when asked or (``None``) when the time limit is long."""
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(f"progress must be True, False or None, got {progress!r}")
    show = progress if progress is not None else time_limit_s >= PROGRESS_MIN_TIME_LIMIT_S
    return tqdm(total=total, disable=not show, unit="solve", desc=desc, leave=True)
