"""Baselines funcpipe is measured against, as plans funcpipe itself can run and simulate.

**LambdaML** (Jiang et al., SIGMOD 2021), the serverless system the FuncPipe
paper compares with: pure data parallelism. Every function holds the whole
model and trains on its share of the global batch in one pass (no
micro-batches, no pipeline), then the workers average gradients through
storage with the four-phase scatter-reduce. As a funcpipe plan that is one
stage, ``d`` replicas, micro-batches of ``global_batch_size / d`` and
``sync="four_phase"`` — so :class:`funcpipe.Trainer` trains it and
:func:`funcpipe.simulate` predicts it exactly as it does funcpipe's own plans.

:func:`lambdaml` searches the baseline's own best configuration (worker count
and memory tier) exhaustively, by the simulator, under the same objective and
limits :func:`funcpipe.plan` takes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from funcpipe import costmodel
from funcpipe.errors import ConfigError, PlanInfeasible
from funcpipe.plan import Plan
from funcpipe.planner import DEFAULT_MAX_REPLICAS, DEFAULT_MAX_STAGES, objective_weight
from funcpipe.platforms import Platform, resolve
from funcpipe.platforms.base import MIB
from funcpipe.profiler import ModelProfile
from funcpipe.simulator import Simulation, simulate

__all__ = ["lambdaml"]

#: Default most workers: as many functions as funcpipe's largest default plan.
DEFAULT_MAX_WORKERS = DEFAULT_MAX_STAGES * DEFAULT_MAX_REPLICAS


def lambdaml(
    profile: ModelProfile,
    platform: Platform | str,
    *,
    global_batch_size: int,
    objective: str | float = "time",
    deadline_s: float | None = None,
    budget_usd: float | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    memory_mb: int | Sequence[int] | None = None,
) -> Plan:
    """LambdaML's best configuration for ``profile`` on ``platform``.

    Tries every worker count ``d`` that divides ``global_batch_size`` (each
    worker then trains on ``global_batch_size / d`` samples) up to
    ``max_workers``, on every allowed memory tier the whole model fits, and
    returns the best by the simulator under ``objective`` (as in
    :func:`funcpipe.plan`).

    Returns:
        A one-stage :class:`~funcpipe.Plan` with ``sync="four_phase"``, carrying
        its predicted seconds and dollars; ``solver_status`` is ``"optimal"``
        (the search is exhaustive).

    Raises:
        ConfigError: an argument is malformed.
        PlanInfeasible: the whole model fits no allowed function even with one
            sample per worker (the message gives the bytes), or no configuration
            meets the deadline or budget.
    """
    started = time.perf_counter()
    spec = resolve(platform)
    if not isinstance(profile, ModelProfile):
        raise ConfigError(f"profile must be a funcpipe ModelProfile, got {type(profile).__name__}")
    for name, value in (("global_batch_size", global_batch_size), ("max_workers", max_workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    weight = objective_weight(objective)
    tiers = [t.memory_mb for t in spec.tiers]
    if memory_mb is not None:
        wanted = [memory_mb] if isinstance(memory_mb, int) else list(memory_mb)
        tiers = sorted({spec.tier(mb).memory_mb for mb in wanted})
        if not tiers:
            raise ConfigError("memory_mb is empty; give one or more of the platform's tiers")
    workers = [d for d in range(1, min(max_workers, global_batch_size) + 1) if global_batch_size % d == 0]

    fits: list[Simulation] = []
    lightest: tuple[int, int] | None = None  # (bytes, workers) of the configuration needing least memory
    for d in workers:
        plan = Plan((profile.num_layers,), (d,), global_batch_size // d, global_batch_size, None, "four_phase")
        need = costmodel.stage_memory_bytes(profile, spec, plan, 0)
        if lightest is None or need < lightest[0]:
            lightest = (need, d)
        for mb in tiers:
            if need <= mb * MIB:
                fits.append(simulate(dataclasses.replace(plan, memory_mb=(mb,)), profile, spec))
    if not fits:
        assert lightest is not None
        raise PlanInfeasible(
            f"LambdaML cannot train this model on {spec.name}: a function holding the whole model needs "
            f"{lightest[0] / MIB:.0f} MB even with {lightest[1]} worker(s) of {global_batch_size // lightest[1]} "
            f"samples each, more than the largest allowed tier ({max(tiers)} MB); hint: this is the case "
            "pipelining is for (funcpipe.plan)"
        )
    ok = [s for s in fits if (deadline_s is None or s.iteration_s <= deadline_s)
          and (budget_usd is None or s.cost_usd <= budget_usd)]
    if not ok:
        raise PlanInfeasible(
            f"no LambdaML configuration meets deadline_s={deadline_s!r} / budget_usd={budget_usd!r}: the "
            f"fastest takes {min(s.iteration_s for s in fits):.4g} s and the cheapest costs "
            f"${min(s.cost_usd for s in fits):.4g} per iteration; hint: relax the limit"
        )
    fastest = min(s.iteration_s for s in ok)
    cheapest = max(min(s.cost_usd for s in ok), 1e-12)

    def score(sim: Simulation) -> tuple[float, float]:
        if weight >= 1:
            return (sim.iteration_s, sim.cost_usd)
        if weight <= 0:
            return (sim.cost_usd, sim.iteration_s)
        return (weight * sim.iteration_s / fastest + (1 - weight) * sim.cost_usd / cheapest, 0.0)

    best = min(ok, key=score)
    return Plan(
        best.plan.balance, best.plan.replicas, best.plan.micro_batch_size, global_batch_size,
        best.plan.memory_mb, "four_phase", platform=spec.name, predicted_iteration_s=best.iteration_s,
        predicted_cost_usd=best.cost_usd, solver_status="optimal", solver_gap=0.0,
        solve_s=time.perf_counter() - started,
    )

