"""Planner: stage cuts, memory tiers and replica counts chosen together with CP-SAT.

:func:`plan` solves the mixed-integer program of :mod:`funcpipe.planner.model`
(the FuncPipe paper's §5, with the cost model of :mod:`funcpipe.costmodel`);
for time or cost without a budget it first runs the exact dynamic program of
:mod:`funcpipe.planner.dp`, whose plan CP-SAT starts from and whose optimum
(less the model's rounding) bounds CP-SAT's objective, so CP-SAT closes its gap
where its LP bound alone cannot. It then re-ranks the best few solutions with the simulator, which sees what the
closed formula misses, and returns the simulator's best. :func:`pareto`
sweeps deadlines to trace the cost–time frontier.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tqdm.auto import tqdm

from funcpipe import costmodel
from funcpipe.errors import ConfigError, PlanInfeasible, PlanTimeout
from funcpipe.plan import Plan
from funcpipe.planner import dp
from funcpipe.planner.model import Candidate, Objective, Problem, Solution, rounding, solve
from funcpipe.platforms import Platform, resolve
from funcpipe.platforms.base import MIB, Tier
from funcpipe.profiler import ModelProfile
from funcpipe.simulator import Simulation, simulate

__all__ = ["DEFAULT_MAX_REPLICAS", "DEFAULT_MAX_STAGES", "objective_weight", "pareto", "plan"]

log = logging.getLogger(__name__)

#: Default ceilings of the search (the paper's experiments stay within these).
DEFAULT_MAX_STAGES = 8
DEFAULT_MAX_REPLICAS = 8
#: How many of CP-SAT's best solutions the simulator re-ranks.
DEFAULT_CANDIDATES = 6
#: Share of a solve's time limit, and most seconds, the dynamic program may take before
#: CP-SAT (for time and cost without budget or exclusions), on top of CP-SAT's limit;
#: past it CP-SAT solves alone.
DP_SHARE = 0.5
DP_LIMIT_S = 5.0
#: Time allowed to CP-SAT to evaluate one given plan (every choice fixed: propagation only).
FIXED_SOLVE_S = 10.0
#: :func:`plan` and :func:`pareto` show a progress bar when their ``time_limit_s`` is at least this
#: (unless ``progress=False``): below it they return within seconds.
PROGRESS_MIN_TIME_LIMIT_S = 10.0


def plan(
    profile: ModelProfile,
    platform: Platform | str,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    objective: str | float = "time",
    deadline_s: float | None = None,
    budget_usd: float | None = None,
    max_stages: int | None = None,
    max_replicas: int | None = None,
    memory_mb: int | Sequence[int] | None = None,
    time_limit_s: float = 30.0,
    sync: str = "pipelined",
    candidates: int = DEFAULT_CANDIDATES,
    samples: int | None = None,
    progress: bool | None = None,
) -> Plan:
    """The best plan for ``profile`` on ``platform``.

    Args:
        profile: the model's profile (:func:`funcpipe.profile`).
        platform: a :class:`~funcpipe.platforms.Platform` or its name.
        global_batch_size: samples per iteration.
        micro_batch_size: samples per micro-batch; must divide the global batch.
        objective: ``"time"`` (seconds per iteration), ``"cost"`` (dollars per
            iteration), or a weight ``w`` in [0, 1] minimising
            ``w * time / fastest + (1 - w) * cost / cheapest``.
        deadline_s: seconds one iteration may take at most.
        budget_usd: dollars one iteration may cost at most.
        max_stages: most pipeline stages (default ``min(layers, 8)``).
        max_replicas: most replicas per stage (default ``min(micro-batches, 8)``).
        memory_mb: the memory tiers allowed (one or several of the platform's).
        time_limit_s: CP-SAT's time for the main solve; the whole call takes at
            most about twice this.
        sync: the all-reduce to plan for: ``"pipelined"`` or ``"four_phase"``.
        candidates: how many of CP-SAT's best solutions the simulator re-ranks.
        samples: the data set's size; the plan's table then also shows time and
            dollars per epoch (``Plan.samples``).
        progress: show a progress bar, one step per solve, with the best plan
            so far; ``None`` shows one when ``time_limit_s`` is at least
            :data:`PROGRESS_MIN_TIME_LIMIT_S`.

    Returns:
        A :class:`~funcpipe.Plan` carrying the simulator's predicted iteration
        seconds and dollars (in total and per stage), the solver's status and
        gap, and the solve time.

    Raises:
        ConfigError: an argument is malformed (the message names it).
        PlanInfeasible: no plan fits (a layer larger than every tier), or none
            meets the deadline or budget.
    """
    started = time.perf_counter()
    search = _Search.create(
        profile, platform, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
        max_stages=max_stages, max_replicas=max_replicas, memory_mb=memory_mb, sync=sync,
    )
    weight = objective_weight(objective)
    for name, value in (("deadline_s", deadline_s), ("budget_usd", budget_usd)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if not (isinstance(time_limit_s, (int, float)) and time_limit_s > 0):
        raise ConfigError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ConfigError(f"candidates must be a positive integer, got {candidates!r}")
    _check_samples(samples)
    give_up_at = started + 2 * time_limit_s  # wall clock, for the re-ranking's extra solves
    steps = candidates + (2 if 0 < weight < 1 else 0)
    with _progress_bar(progress, time_limit_s, steps, f"planning on {search.problem.platform.name}") as bar:
        best = _plan(search, bar, weight, deadline_s, budget_usd, time_limit_s, candidates, give_up_at)
        bar.total = bar.n  # fewer solves than candidates when CP-SAT ran out of solutions or time
        bar.refresh()
    return _to_plan(search, best[1], best[0], time.perf_counter() - started, samples)


def _plan(
    search: _Search, bar: Any, weight: float, deadline_s: float | None, budget_usd: float | None,
    time_limit_s: float, candidates: int, give_up_at: float,
) -> tuple[Solution, Simulation]:
    """The body of :func:`plan`: CP-SAT's first solution and the simulation of the best plan."""
    goal = Objective(weight)
    if 0 < weight < 1:  # normalise by the fastest and the cheapest plan
        fastest = search.solve(Objective(1.0), deadline_s, budget_usd, (), time_limit_s / 3)
        bar.update(1)
        cheapest = search.solve(Objective(0.0), deadline_s, budget_usd, (), time_limit_s / 3)
        bar.update(1)
        if fastest is None or cheapest is None:
            search.explain_infeasible(deadline_s, budget_usd)
        goal = Objective(weight, fastest.iteration_s, max(cheapest.cost_usd, 1e-12))

    def score(sim: Simulation) -> tuple[float, float]:
        if goal.time_weight >= 1:
            return (sim.iteration_s, sim.cost_usd)
        if goal.time_weight <= 0:
            return (sim.cost_usd, sim.iteration_s)
        w = goal.time_weight
        return (w * sim.iteration_s / goal.time_ref_s + (1 - w) * sim.cost_usd / goal.cost_ref_usd, 0.0)

    def acceptable(sim: Simulation) -> bool:
        return (deadline_s is None or sim.iteration_s <= deadline_s) and (
            budget_usd is None or sim.cost_usd <= budget_usd
        )

    def step() -> None:
        if bar.n >= bar.total:  # still looking for a plan the simulator accepts
            bar.total += 1
        best = min([s for _, s in found if acceptable(s)] or [s for _, s in found], key=score)
        bar.set_postfix_str(f"best {best.iteration_s:.3g} s, ${best.cost_usd:.3g}", refresh=False)
        bar.update(1)

    first = search.solve(goal, deadline_s, budget_usd, (), time_limit_s)
    if first is None:
        search.explain_infeasible(deadline_s, budget_usd)
    found: list[tuple[Solution, Simulation]] = [(first, search.simulate(first.candidate))]
    step()
    # The next best solutions, each forbidding the ones before (no-goods): the simulator
    # re-ranks them, catching what the formula misses. Keep looking while none is
    # acceptable by the simulator (the formula may under-estimate a deadline).
    while (len(found) < candidates or not any(acceptable(sim) for _, sim in found)) and len(found) < 4 * candidates:
        remaining = give_up_at - time.perf_counter()
        if remaining <= 0.05:
            break
        limit = min(remaining, max(0.5, first.seconds))
        try:
            nxt = search.solve(goal, deadline_s, budget_usd, [s.candidate for s, _ in found], limit)
        except TimeoutError:
            break
        if nxt is None:
            break
        found.append((nxt, search.simulate(nxt.candidate)))
        step()
    ok = [(sol, sim) for sol, sim in found if acceptable(sim)]
    if not ok:
        limit_name = "deadline_s" if deadline_s is not None else "budget_usd"
        best = min(found, key=lambda pair: score(pair[1]))[1]
        raise PlanInfeasible(
            f"no plan meets {limit_name}={deadline_s if deadline_s is not None else budget_usd!r} by the "
            f"simulator; the best the planner found takes {best.iteration_s:.4g} s and ${best.cost_usd:.4g} "
            f"per iteration; hint: relax the {limit_name}"
        )
    best_sim = min((sim for _, sim in ok), key=score)
    if goal.time_weight >= 1:
        best_sim = search.cheapen(best_sim, give_up_at, acceptable)
    return first, best_sim


def pareto(
    profile: ModelProfile,
    platform: Platform | str,
    *,
    global_batch_size: int,
    micro_batch_size: int,
    points: int = 12,
    max_stages: int | None = None,
    max_replicas: int | None = None,
    memory_mb: int | Sequence[int] | None = None,
    time_limit_s: float = 10.0,
    sync: str = "pipelined",
    samples: int | None = None,
    progress: bool | None = None,
) -> list[Plan]:
    """The cost–time frontier: plans no other plan beats on both time and cost.

    Finds the fastest and the cheapest plan, then the cheapest plan under
    deadlines spaced geometrically between them; each is simulated and the
    dominated ones are dropped.

    Args:
        points: how many plans to solve for (the fastest, the cheapest, and
            ``points - 2`` deadlines between them); dominated ones are dropped.
        time_limit_s: CP-SAT's time for all of them together.
        samples: the data set's size, carried by every plan (``Plan.samples``).
        progress: show a progress bar, one step per solve; ``None`` shows one
            when ``time_limit_s`` is at least :data:`PROGRESS_MIN_TIME_LIMIT_S`.
        The other arguments are those of :func:`plan`.

    Returns:
        Plans sorted by predicted iteration time (fastest first), each carrying
        its predicted seconds and dollars.
    """
    started = time.perf_counter()
    search = _Search.create(
        profile, platform, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
        max_stages=max_stages, max_replicas=max_replicas, memory_mb=memory_mb, sync=sync,
    )
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ConfigError(f"points must be an integer >= 2, got {points!r}")
    if not (isinstance(time_limit_s, (int, float)) and time_limit_s > 0):
        raise ConfigError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}")
    _check_samples(samples)
    per_solve = time_limit_s / (points + 2)
    with _progress_bar(progress, time_limit_s, points, f"frontier on {search.problem.platform.name}") as bar:
        fastest = search.solve(Objective(1.0), None, None, (), per_solve)
        bar.update(1)
        cheapest = search.solve(Objective(0.0), None, None, (), per_solve)
        bar.update(1)
        if fastest is None or cheapest is None:
            search.explain_infeasible(None, None)
        solutions = {fastest.candidate: fastest, cheapest.candidate: cheapest}
        low, high = fastest.iteration_s, cheapest.iteration_s
        if high > low * (1 + 1e-6):
            for i in range(1, points - 1):
                limit = low * (high / low) ** (i / (points - 1))
                try:
                    found = search.solve(Objective(0.0), limit, None, (), per_solve)
                except TimeoutError:
                    continue
                finally:
                    bar.update(1)
                if found is not None:
                    solutions.setdefault(found.candidate, found)
        bar.total = bar.n  # all the same plan: no deadlines between the fastest and the cheapest
        bar.refresh()
    simulated = [(sol, search.simulate(sol.candidate)) for sol in solutions.values()]
    frontier = [
        (sol, sim) for sol, sim in simulated
        if not any(
            (o.iteration_s <= sim.iteration_s and o.cost_usd <= sim.cost_usd)
            and (o.iteration_s < sim.iteration_s or o.cost_usd < sim.cost_usd)
            for _, o in simulated
        )
    ]
    frontier.sort(key=lambda pair: pair[1].iteration_s)
    seconds = time.perf_counter() - started
    return [_to_plan(search, sim, sol, seconds, samples) for sol, sim in frontier]


# -- the search state shared by plan() and pareto() ------------------------------


@dataclasses.dataclass
class _Search:
    problem: Problem
    global_batch_size: int
    _cache: dict[Candidate, Simulation] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        profile: ModelProfile,
        platform: Platform | str,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        max_stages: int | None,
        max_replicas: int | None,
        memory_mb: int | Sequence[int] | None,
        sync: str,
    ) -> _Search:
        if not isinstance(profile, ModelProfile):
            raise ConfigError(
                f"profile must be a funcpipe ModelProfile, got {type(profile).__name__}; "
                "hint: profile = funcpipe.profile(model, inputs, targets, loss_fn)"
            )
        spec = resolve(platform)
        for name, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if global_batch_size % micro_batch_size:
            raise ConfigError(
                f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                f"{micro_batch_size}; hint: pick a micro_batch_size that divides {global_batch_size}"
            )
        if sync not in ("pipelined", "four_phase"):
            raise ConfigError(f"unknown gradient sync {sync!r}; choose 'pipelined' or 'four_phase'")
        num_mb = global_batch_size // micro_batch_size
        layers = profile.num_layers
        stages = _limit("max_stages", max_stages, min(layers, DEFAULT_MAX_STAGES))
        replicas = min(_limit("max_replicas", max_replicas, DEFAULT_MAX_REPLICAS), num_mb)
        tiers = spec.tiers
        if memory_mb is not None:
            wanted = [memory_mb] if isinstance(memory_mb, int) else list(memory_mb)
            if not wanted:
                raise ConfigError("memory_mb is empty; give one or more of the platform's tiers")
            tiers = tuple(spec.tier(mb) for mb in sorted(set(wanted)))
        problem = Problem(profile, spec, tiers, micro_batch_size, num_mb, min(stages, layers), replicas, sync)
        search = cls(problem, global_batch_size)
        search.check_layers_fit()
        return search

    def check_layers_fit(self) -> None:
        """Every layer must fit the largest allowed tier alone, in its cheapest-memory configuration."""
        p = self.problem
        largest = p.tiers[-1]
        b = p.micro_batch_size
        for i, lp in enumerate(p.profile.layers):
            in_bytes = (p.profile.input_bytes_per_sample if i == 0 else p.profile.layers[i - 1].output_bytes_per_sample)
            needed = min(
                costmodel.memory_bytes(
                    p.platform,
                    param_bytes=lp.param_bytes,
                    optimizer_bytes=lp.optimizer_bytes,
                    held_bytes=lp.held_bytes_per_sample * b,
                    message_bytes=(in_bytes + lp.output_bytes_per_sample) * b,
                    micro_batches=-(-p.num_micro_batches // d),
                    replicas=d,
                )
                for d in range(1, p.max_replicas + 1)
            )
            if needed > largest.memory_mb * MIB:
                raise PlanInfeasible(
                    f"layer {i} ({lp.name!r}) needs {needed} bytes ({needed / MIB:.0f} MB) even alone in a "
                    f"stage, more than the largest tier allowed on {p.platform.name} ({largest.memory_mb} MB); "
                    "hint: smaller micro-batches, more replicas, a platform with larger functions, or split "
                    "the layer"
                )

    def solve(
        self, goal: Objective, deadline_s: float | None, budget_usd: float | None,
        exclude: Sequence[Candidate], time_limit_s: float,
    ) -> Solution | None:
        problem = self.problem
        if goal.time_weight >= 1 and budget_usd is None:
            # For time alone, a tier with at least as much memory, speed and bandwidth as
            # another is never worse: drop the dominated ones (fewer choices, same optimum).
            problem = dataclasses.replace(problem, tiers=_undominated(problem.tiers))
        # The program's time comes on top of CP-SAT's (which keeps its whole limit: without the
        # program's bound it needs it, and with the bound it stops within 1% early).
        proven = None
        if not exclude and budget_usd is None and goal.time_weight in (0.0, 1.0):
            proven = self.formula_bound(problem, goal, deadline_s, min(DP_SHARE * time_limit_s, DP_LIMIT_S))
        if proven is None:
            start = self.heuristic(problem, goal)
            options: dict[str, Any] = {}
        else:
            start = proven[0] or self.heuristic(problem, goal)
            options = {"lower_bound": proven[1], "fastest_s": proven[2]}
        try:
            return solve(problem, goal, deadline_s=deadline_s, budget_usd=budget_usd, exclude=exclude,
                         time_limit_s=time_limit_s, hint=start, **options)
        except PlanTimeout:
            if start is None or start in exclude:
                raise
            # The plan CP-SAT was to start from is a plan too: give it, its optimality unproven
            # (CP-SAT on a loaded machine can run out of time before it reads the hint back).
            fixed = solve(problem, goal, deadline_s=deadline_s, budget_usd=budget_usd,
                          time_limit_s=max(time_limit_s, FIXED_SOLVE_S), fix=start)
            if fixed is None:  # it breaks the deadline or the budget
                raise
            log.warning("CP-SAT found no plan within %g s; using the plan it was to start from (%s), "
                        "not proven optimal", time_limit_s, "dynamic program" if proven and proven[0] else "heuristic")
            return dataclasses.replace(fixed, status="feasible", gap=1.0)

    def formula_bound(
        self, problem: Problem, goal: Objective, deadline_s: float | None, time_limit_s: float,
    ) -> tuple[Candidate | None, float, float | None] | None:
        """The formula's optimum by the dynamic program (:mod:`funcpipe.planner.dp`), for CP-SAT:
        ``(plan to start from, proven lower bound of the objective, of the seconds)``.

        The bound is over every plan the CP-SAT model admits: stages may exceed their tier by
        the model's byte rounding and the deadline is relaxed by its time rounding (both
        from :func:`funcpipe.planner.model.rounding`). ``None`` when the program runs out of
        time or finds no plan.
        """
        started = time.perf_counter()
        slack = rounding(problem)
        memory = slack.memory_slack_bytes(problem.num_micro_batches)
        fastest_problem = dataclasses.replace(problem, tiers=_undominated(problem.tiers))
        try:
            fastest = dp.optimum(fastest_problem, "time", memory_slack_bytes=memory, time_limit_s=time_limit_s)
            if fastest is None:
                return None
            if goal.time_weight >= 1:
                best = fastest if problem.tiers == fastest_problem.tiers else dp.optimum(
                    problem, "time", memory_slack_bytes=memory,
                    time_limit_s=time_limit_s - (time.perf_counter() - started))
            else:
                relaxed = None if deadline_s is None else slack.formula_deadline_s(deadline_s)
                best = dp.optimum(problem, "cost", deadline_s=relaxed, invocations=False, memory_slack_bytes=memory,
                                  time_limit_s=time_limit_s - (time.perf_counter() - started))
        except TimeoutError:
            return None
        if best is None:
            return None
        return (best.candidate if best.fits else None), best.bound, fastest.bound

    def heuristic(self, problem: Problem, goal: Objective) -> Candidate | None:
        """A starting point for CP-SAT: the best, by the formula, of simple plans.

        Compute-balanced cuts into 1..max_stages stages, each with one tier and one
        replica count for all stages. Cheap (a few hundred formula evaluations) and
        often close on large models, where CP-SAT alone may not find a good plan in time.
        """
        if goal.time_weight not in (0.0, 1.0) or problem.profile.num_layers < 8:
            return None
        b = problem.micro_batch_size
        work = [lp.forward_s(b) + lp.backward_s(b) for lp in problem.profile.layers]
        total = sum(work) or 1.0
        best: tuple[float, Candidate] | None = None
        for stages in range(1, problem.max_stages + 1):
            bounds, acc, target = [0], 0.0, total / stages
            for i, w in enumerate(work[:-1]):
                acc += w
                if acc >= target * len(bounds) and len(bounds) < stages:
                    bounds.append(i + 1)
            bounds.append(len(work))
            balance = tuple(y - x for x, y in itertools.pairwise(bounds))
            for tier in problem.tiers:
                for replicas in range(1, problem.max_replicas + 1):
                    plan = Plan(balance, (replicas,) * len(balance), b, self.global_batch_size,
                                (tier.memory_mb,) * len(balance), problem.sync)
                    try:
                        stage_list = costmodel.stage_costs(problem.profile, problem.platform, plan)
                    except PlanInfeasible:
                        continue
                    seconds = costmodel.formula_iteration_s(stage_list, problem.platform, plan)
                    value = seconds if goal.time_weight >= 1 else costmodel.cost_per_iteration(
                        seconds, stage_list, plan, problem.platform)
                    if best is None or value < best[0]:
                        best = (value, Candidate(plan.balance, plan.memory_mb or (), plan.replicas))
        return None if best is None else best[1]

    def to_plan(self, candidate: Candidate) -> Plan:
        return Plan(
            balance=candidate.balance,
            replicas=candidate.replicas,
            micro_batch_size=self.problem.micro_batch_size,
            global_batch_size=self.global_batch_size,
            memory_mb=candidate.memory_mb,
            sync=self.problem.sync,
        )

    def cheapen(self, best: Simulation, give_up_at: float, acceptable: Callable[[Simulation], bool]) -> Simulation:
        """Smaller tiers and fewer replicas, stage by stage, wherever the simulator says it costs no time."""
        improved = True
        while improved and time.perf_counter() < give_up_at:
            improved = False
            plan = best.plan
            assert plan.memory_mb is not None
            for stage in range(plan.num_stages):
                options = [(mb, plan.replicas[stage]) for mb in (t.memory_mb for t in self.problem.tiers)
                           if mb < plan.memory_mb[stage]]
                options += [(plan.memory_mb[stage], d) for d in range(1, plan.replicas[stage])]
                for memory, replicas in options:
                    candidate = Candidate(
                        plan.balance,
                        tuple(memory if s == stage else m for s, m in enumerate(plan.memory_mb)),
                        tuple(replicas if s == stage else r for s, r in enumerate(plan.replicas)),
                    )
                    try:
                        sim = self.simulate(candidate)
                    except PlanInfeasible:
                        continue
                    if (sim.iteration_s <= best.iteration_s and sim.cost_usd < best.cost_usd
                            and acceptable(sim)):
                        best, improved = sim, True
                        break
                if improved or time.perf_counter() >= give_up_at:
                    break
        return best

    def simulate(self, candidate: Candidate) -> Simulation:
        sim = self._cache.get(candidate)
        if sim is None:
            sim = self._cache[candidate] = simulate(self.to_plan(candidate), self.problem.profile,
                                                    self.problem.platform)
        return sim

    def explain_infeasible(self, deadline_s: float | None, budget_usd: float | None) -> NoReturn:
        """Raise :class:`PlanInfeasible` saying which limit no plan meets and what the best plan reaches."""
        if deadline_s is not None or budget_usd is not None:
            fastest = self.solve(Objective(1.0), None, budget_usd, (), 10.0) if deadline_s is not None else None
            if deadline_s is not None and fastest is not None:
                raise PlanInfeasible(
                    f"no plan meets deadline_s={deadline_s!r}: the fastest plan"
                    f"{' within the budget' if budget_usd is not None else ''} takes "
                    f"{fastest.iteration_s:.4g} s per iteration by the planner's formula; hint: raise the "
                    "deadline, allow more stages, replicas or larger tiers"
                )
            cheapest = self.solve(Objective(0.0), None, None, (), 10.0)
            if cheapest is not None:
                raise PlanInfeasible(
                    f"no plan meets budget_usd={budget_usd!r}"
                    f"{f' with deadline_s={deadline_s!r}' if deadline_s is not None else ''}: the cheapest "
                    f"plan costs ${cheapest.cost_usd:.4g} per iteration; hint: raise the budget"
                )
        p = self.problem
        raise PlanInfeasible(
            f"no plan of at most {p.max_stages} stages and {p.max_replicas} replicas per stage fits "
            f"{p.platform.name}'s tiers {[t.memory_mb for t in p.tiers]} MB; hint: allow more stages "
            "(max_stages), smaller micro-batches or larger tiers"
        )


def _undominated(tiers: Sequence[Tier]) -> tuple[Tier, ...]:
    """The tiers no other tier beats or matches on memory, speed and both bandwidths."""

    def covers(a: Tier, b: Tier) -> bool:
        return (a.memory_mb >= b.memory_mb and a.speed >= b.speed and a.uplink_mb_s >= b.uplink_mb_s
                and a.downlink_mb_s >= b.downlink_mb_s)

    return tuple(t for t in tiers if not any(o is not t and covers(o, t) for o in tiers))


def _to_plan(search: _Search, sim: Simulation, first: Solution, seconds: float, samples: int | None) -> Plan:
    return dataclasses.replace(
        sim.plan,
        platform=search.problem.platform.name,
        predicted_iteration_s=sim.iteration_s,
        predicted_cost_usd=sim.cost_usd,
        predicted_stages=sim.stages,
        solver_status=first.status,
        solver_gap=first.gap,
        solve_s=seconds,
        samples=samples,
    )


def _check_samples(samples: object) -> None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ConfigError(f"samples must be a positive integer (the data set's size), got {samples!r}")


def _progress_bar(progress: object, time_limit_s: float, total: int, desc: str) -> Any:
    """A tqdm bar of ``total`` solves, shown when asked or (``None``) when the time limit is long."""
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(f"progress must be True, False or None, got {progress!r}")
    show = progress if progress is not None else time_limit_s >= PROGRESS_MIN_TIME_LIMIT_S
    return tqdm(total=total, disable=not show, unit="solve", desc=desc, leave=True)


def _limit(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def objective_weight(objective: str | float) -> float:
    """The weight of time in the objective ``"time"``, ``"cost"`` or ``w`` in [0, 1]."""
    if objective == "time":
        return 1.0
    if objective == "cost":
        return 0.0
    if isinstance(objective, (int, float)) and not isinstance(objective, bool) and 0 <= objective <= 1:
        return float(objective)
    raise ConfigError(
        f"objective must be 'time', 'cost' or a weight of time in [0, 1], got {objective!r}; "
        "hint: objective=0.5 weighs time and cost equally"
    )
