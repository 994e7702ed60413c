"""Baselines funcpipe is measured against, as plans funcpipe itself can run and simulate.

Each baseline's own best configuration is searched over its whole space, by the
simulator, under the same objective and limits :func:`funcpipe.plan` takes; the
planner's space contains every one of them (and re-ranks their best plans with
its own), so its plan is never worse than theirs under the same simulator.

* :func:`lambdaml` — **LambdaML** (Jiang et al., SIGMOD 2021), the serverless
  system the FuncPipe paper compares with: pure data parallelism. Every function
  holds the whole model and trains on its share of the global batch in one pass
  (no micro-batches, no pipeline), then the workers average gradients through
  storage with LambdaML's four-phase scatter-reduce. As a funcpipe plan that is one
  stage, ``d`` replicas, micro-batches of ``global_batch_size / d`` and
  ``sync="four_phase"`` — so :class:`funcpipe.Trainer` trains it and
  :func:`funcpipe.simulate` predicts it exactly as it does funcpipe's own plans.
  Searched: every worker count dividing the batch, every memory tier.
* :func:`lambdaml_pipelined` — LambdaML with funcpipe's pipelined scatter-reduce
  instead: what is left of funcpipe's gain over LambdaML is then the pipeline's
  and the planner's, not the all-reduce's.
* :func:`one_function` — the whole model and the whole batch on **one function**,
  by gradient accumulation over micro-batches of any size that divides the batch
  (one stage, one replica, 1F1B: one micro-batch's activations alive at a time).
  Searched: every micro-batch size, every tier.
* :func:`funcpipe_original` — the FuncPipe paper's system as its code ran: GPipe,
  micro-batches of 4, and the sequential four-phase all-reduce (the original
  code's ``AllReduce.latency_opt``; its ``bandwidth_opt`` is commented out), with
  the stage cuts, per-stage memory and data-parallel degrees still planned (the
  paper's MIQP) by :func:`funcpipe.plan` at that configuration.

:data:`BASELINES` maps each name to its function.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from funcpipe import costmodel, planner
from funcpipe.errors import ConfigError, PlanInfeasible
from funcpipe.planner import DEFAULT_MAX_REPLICAS, DEFAULT_MAX_STAGES, objective_weight
from funcpipe.plans import Plan
from funcpipe.platforms import Platform, resolve
from funcpipe.platforms.base import MIB
from funcpipe.profiler import ModelProfile
from funcpipe.protocol import SYNC_ALGORITHMS
from funcpipe.simulator import Simulation, simulate

__all__ = ["BASELINES", "funcpipe_original", "lambdaml", "lambdaml_pipelined", "one_function"]

#: Default most workers: as many functions as funcpipe's largest default plan.
DEFAULT_MAX_WORKERS = DEFAULT_MAX_STAGES * DEFAULT_MAX_REPLICAS
#: The original FuncPipe code's micro-batch size.
ORIGINAL_MICRO_BATCH = 4


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
    sync: str = "four_phase",
    runtime: str = "funcpipe",
) -> Plan:
    """LambdaML's best configuration for ``profile`` on ``platform``.

    Tries every worker count ``d`` that divides ``global_batch_size`` (each
    worker then trains on ``global_batch_size / d`` samples) up to
    ``max_workers``, on every allowed memory tier the whole model fits, and
    returns the best by the simulator under ``objective`` (as in
    :func:`funcpipe.plan`).

    Args:
        sync: the all-reduce: LambdaML's ``"four_phase"``, or funcpipe's ``"pipelined"``.
        runtime: how the plan is simulated (:func:`funcpipe.simulate`): ``"funcpipe"``, as
            :class:`funcpipe.Trainer` runs it (the driver feeds every micro-batch), or
            ``"lambdaml"``, as LambdaML's own workers do (each read its data partition once;
            the four-phase all-reduce polls with LIST and deletes what it read).

    Returns:
        A one-stage :class:`~funcpipe.Plan` with that ``sync``, carrying
        its predicted seconds and dollars; ``solver_status`` is ``"optimal"``
        (the search is exhaustive).

    Raises:
        ConfigError: an argument is malformed.
        PlanInfeasible: the whole model fits no allowed function even with one
            sample per worker (the message gives the bytes), or no configuration
            meets the deadline or budget.
    """
    started = time.perf_counter()
    spec, tiers, weight = _common(profile, platform, global_batch_size, objective, memory_mb)
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ConfigError(f"max_workers must be a positive integer, got {max_workers!r}")
    if sync not in SYNC_ALGORITHMS:
        raise ConfigError(f"unknown gradient sync {sync!r}; choose one of {list(SYNC_ALGORITHMS)}")
    workers = [d for d in range(1, min(max_workers, global_batch_size) + 1) if global_batch_size % d == 0]
    plans = [Plan((profile.num_layers,), (d,), global_batch_size // d, global_batch_size, None, sync)
             for d in workers]
    fits, lightest = _fitting(profile, spec, plans, tiers, runtime)
    if not fits:
        need, plan = lightest
        raise PlanInfeasible(
            f"LambdaML cannot train this model on {spec.name}: a function holding the whole model needs "
            f"{need / MIB:.0f} MB even with {plan.replicas[0]} worker(s) of {plan.micro_batch_size} "
            f"samples each, more than the largest allowed tier ({max(tiers)} MB); hint: this is the case "
            "pipelining is for (funcpipe.plan)"
        )
    return _best(fits, weight, deadline_s, budget_usd, "LambdaML", started)


def lambdaml_pipelined(
    profile: ModelProfile,
    platform: Platform | str,
    *,
    global_batch_size: int,
    objective: str | float = "time",
    deadline_s: float | None = None,
    budget_usd: float | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
    memory_mb: int | Sequence[int] | None = None,
    runtime: str = "funcpipe",
) -> Plan:
    """LambdaML's best configuration with funcpipe's pipelined scatter-reduce (:func:`lambdaml`)."""
    return lambdaml(profile, platform, global_batch_size=global_batch_size, objective=objective,
                    deadline_s=deadline_s, budget_usd=budget_usd, max_workers=max_workers, memory_mb=memory_mb,
                    sync="pipelined", runtime=runtime)


def funcpipe_original(
    profile: ModelProfile,
    platform: Platform | str,
    *,
    global_batch_size: int,
    objective: str | float = "time",
    deadline_s: float | None = None,
    budget_usd: float | None = None,
    memory_mb: int | Sequence[int] | None = None,
    time_limit_s: float = 20.0,
) -> Plan:
    """The FuncPipe paper's system as its code ran: the best plan at micro-batches of 4, GPipe and
    the four-phase all-reduce, by :func:`funcpipe.plan` (stage cuts, tiers and replicas planned).

    Raises:
        ConfigError: an argument is malformed, or the batch is not divisible into micro-batches of 4.
        PlanInfeasible: no such plan fits, or none meets the deadline or budget.
    """
    return planner.plan(profile, platform, global_batch_size=global_batch_size, objective=objective,
                deadline_s=deadline_s, budget_usd=budget_usd, memory_mb=memory_mb, time_limit_s=time_limit_s,
                micro_batch_size=ORIGINAL_MICRO_BATCH, schedule="gpipe", sync="four_phase", progress=False)


def one_function(
    profile: ModelProfile,
    platform: Platform | str,
    *,
    global_batch_size: int,
    objective: str | float = "time",
    deadline_s: float | None = None,
    budget_usd: float | None = None,
    memory_mb: int | Sequence[int] | None = None,
    runtime: str = "funcpipe",
) -> Plan:
    """The best way to train the whole batch on **one function** by gradient accumulation.

    One stage, one replica, the 1F1B schedule (one micro-batch's activations alive at a
    time): tries every micro-batch size that divides ``global_batch_size`` on every
    allowed tier the model fits, and returns the best by the simulator under
    ``objective`` (as in :func:`funcpipe.plan`); ``runtime`` as in :func:`lambdaml`.

    Returns:
        A one-stage, one-replica :class:`~funcpipe.Plan` carrying its predicted seconds
        and dollars; ``solver_status`` is ``"optimal"`` (the search is exhaustive).

    Raises:
        ConfigError: an argument is malformed.
        PlanInfeasible: the model fits no allowed function even in micro-batches of one
            sample, or no configuration meets the deadline or budget.
    """
    started = time.perf_counter()
    spec, tiers, weight = _common(profile, platform, global_batch_size, objective, memory_mb)
    sizes = [b for b in range(1, global_batch_size + 1) if global_batch_size % b == 0]
    plans = [Plan((profile.num_layers,), (1,), b, global_batch_size, None, schedule="1f1b") for b in sizes]
    fits, lightest = _fitting(profile, spec, plans, tiers, runtime)
    if not fits:
        need, plan = lightest
        raise PlanInfeasible(
            f"one function cannot train this model on {spec.name}: it needs {need / MIB:.0f} MB even in "
            f"micro-batches of {plan.micro_batch_size}, more than the largest allowed tier ({max(tiers)} MB); "
            "hint: this is the case pipelining is for (funcpipe.plan)"
        )
    return _best(fits, weight, deadline_s, budget_usd, "one-function", started)


def _common(profile: object, platform: Platform | str, global_batch_size: object, objective: str | float,
            memory_mb: int | Sequence[int] | None) -> tuple[Platform, list[int], float]:
    spec = resolve(platform)
    if not isinstance(profile, ModelProfile):
        raise ConfigError(f"profile must be a funcpipe ModelProfile, got {type(profile).__name__}")
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ConfigError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    weight = objective_weight(objective)
    tiers = [t.memory_mb for t in spec.tiers]
    if memory_mb is not None:
        wanted = [memory_mb] if isinstance(memory_mb, int) else list(memory_mb)
        tiers = sorted({spec.tier(mb).memory_mb for mb in wanted})
        if not tiers:
            raise ConfigError("memory_mb is empty; give one or more of the platform's tiers")
    return spec, tiers, weight


def _fitting(profile: ModelProfile, spec: Platform, plans: list[Plan],
             tiers: list[int], runtime: str) -> tuple[list[Simulation], tuple[int, Plan]]:
    """Every plan on every tier it fits, simulated; and the plan needing the least memory."""
    fits: list[Simulation] = []
    lightest: tuple[int, Plan] | None = None
    for plan in plans:
        need = costmodel.stage_memory_bytes(profile, spec, plan, 0)
        if lightest is None or need < lightest[0]:
            lightest = (need, plan)
        for mb in tiers:
            if need <= mb * MIB:
                fits.append(simulate(dataclasses.replace(plan, memory_mb=(mb,)), profile, spec, runtime=runtime))
    assert lightest is not None
    return fits, lightest


def _best(fits: list[Simulation], weight: float, deadline_s: float | None, budget_usd: float | None,
          name: str, started: float) -> Plan:
    ok = [s for s in fits if (deadline_s is None or s.iteration_s <= deadline_s)
          and (budget_usd is None or s.cost_usd <= budget_usd)]
    if not ok:
        raise PlanInfeasible(
            f"no {name} configuration meets deadline_s={deadline_s!r} / budget_usd={budget_usd!r}: the "
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
    return dataclasses.replace(
        best.plan, predicted_iteration_s=best.iteration_s, predicted_cost_usd=best.cost_usd,
        predicted_stages=best.stages, solver_status="optimal", solver_gap=0.0, solve_s=time.perf_counter() - started,
    )


#: Every baseline by the name ``benchmarks/paper.py`` reports it under.
BASELINES: dict[str, Callable[..., Plan]] = {
    "lambdaml": lambdaml,
    "lambdaml_pipelined": lambdaml_pipelined,
    "one_function": one_function,
    "funcpipe_original": funcpipe_original,
}
