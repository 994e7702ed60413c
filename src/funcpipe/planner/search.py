"""The planner's search: every micro-batch size and schedule, the baselines' own plans, the simulator's ranking.

For one objective (and deadline or budget), :class:`Search` proceeds in four steps:

1. **One stage, exhaustively.** Every plan of one stage — any micro-batch size, any
   replica count up to the micro-batches (LambdaML's worker counts reach the global
   batch), any tier, both schedules, both all-reduces — is priced by the closed
   formula, which is exact for one stage. This space holds the baselines: one
   function training the whole batch by gradient accumulation (one replica, 1F1B),
   and every LambdaML configuration (``d`` replicas of one micro-batch each).
2. **Pipelines, exactly by the formula.** For each micro-batch size and schedule, the
   dynamic program (:mod:`funcpipe.planner.dp`) finds the best plans of 1 to
   ``max_stages`` stages, each stage choosing its tier, replicas and all-reduce; it is
   given the best plans found so far, so a pair that cannot beat them is dismissed by
   its bounds in a fraction of the time. When the program runs out of time, CP-SAT
   (:mod:`funcpipe.planner.model`) solves that pair, starting from the program's plan.
3. **The paper's plan**: the best GPipe pipeline at micro-batch 4 with the pipelined
   all-reduce (the FuncPipe paper's configuration), by the formula.
4. **The simulator decides.** The best few plans by the formula, each also under the
   other schedule, the best one-stage plans, the best plan of each baseline and the
   paper's plan are simulated; the best by the simulator that meets the deadline and
   budget is returned (for time, then made cheaper stage by stage where that costs no
   time). So the plan returned is never worse, by the simulator, than the best plan of
   any baseline, whether or not the solver finished.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from funcpipe import costmodel
from funcpipe.errors import ConfigError, PlanInfeasible, PlanTimeout
from funcpipe.planner import dp
from funcpipe.planner.model import Objective, Problem, solve
from funcpipe.plans import Plan
from funcpipe.platforms import Platform, resolve
from funcpipe.platforms.base import MIB, Tier
from funcpipe.profiler import ModelProfile
from funcpipe.protocol import REPORT_BYTES, SYNC_ALGORITHMS
from funcpipe.schedule import SCHEDULES
from funcpipe.simulator import Simulation, simulate

__all__ = ["DEFAULT_MAX_REPLICAS", "DEFAULT_MAX_STAGES", "Goal", "Result", "Search", "Space", "objective_weight"]

log = logging.getLogger(__name__)

#: Default ceilings of the search (the paper's experiments stay within these). One-stage
#: plans may have up to one replica per micro-batch (LambdaML's worker counts).
DEFAULT_MAX_STAGES = 8
DEFAULT_MAX_REPLICAS = 8
#: The FuncPipe paper's configuration, kept among the candidates: GPipe, micro-batches of 4.
PAPER_MICRO_BATCH = 4
#: Share of the time limit the most promising (micro-batch size, schedule) gets; the rest split the rest.
FIRST_SHARE = 0.5
#: Least time left in the limit for which CP-SAT is tried on a pair the program could not finish.
CP_SAT_MIN_S = 2.0
#: Most simulations the cheapening step of a time-optimal plan runs (each small gain costs a replay).
CHEAPEN_SIMULATIONS = 12
#: Rounds of tightened deadlines or budgets when the plans the formula lets through break them.
LIMIT_ROUNDS = 6
#: How many one-stage plans (besides each baseline's best and the best one) the simulator sees.
ONE_STAGE_CANDIDATES = 3
#: How far above the best plan's formula value another's may be and still be re-ranked by the
#: simulator (the formula misses what the replay sees by a few percent either way).
RERANK_MARGIN = 0.05


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


# -- the space ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Space:
    """Every plan the planner may return: the choices and their limits, checked."""

    profile: ModelProfile
    platform: Platform
    tiers: tuple[Tier, ...]
    global_batch_size: int
    sizes: tuple[int, ...]
    schedules: tuple[str, ...]
    syncs: tuple[str, ...]
    max_stages: int
    max_replicas: int | None  # None: DEFAULT_MAX_REPLICAS per pipeline stage, one per micro-batch for one stage

    @classmethod
    def create(
        cls,
        profile: ModelProfile,
        platform: Platform | str,
        *,
        global_batch_size: int,
        micro_batch_size: int | Sequence[int] | None,
        schedule: str | None,
        sync: str | None,
        max_stages: int | None,
        max_replicas: int | None,
        memory_mb: int | Sequence[int] | None,
    ) -> Space:
        if not isinstance(profile, ModelProfile):
            raise ConfigError(
                f"profile must be a funcpipe ModelProfile, got {type(profile).__name__}; "
                "hint: profile = funcpipe.profile(model, inputs, targets, loss_fn)"
            )
        spec = resolve(platform)
        if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1:
            raise ConfigError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
        sizes = _sizes(micro_batch_size, global_batch_size)
        schedules = _choice("schedule", schedule, SCHEDULES,
                            "gpipe: every forward, then every backward; 1f1b: one forward one backward, less memory")
        syncs = _choice("sync", sync, SYNC_ALGORITHMS, "pipelined: funcpipe's scatter-reduce; four_phase: LambdaML's")
        layers = profile.num_layers
        stages = min(_limit("max_stages", max_stages, min(layers, DEFAULT_MAX_STAGES)), layers)
        replicas = None if max_replicas is None else _limit("max_replicas", max_replicas, 1)
        tiers = spec.tiers
        if memory_mb is not None:
            wanted = [memory_mb] if isinstance(memory_mb, int) else list(memory_mb)
            if not wanted:
                raise ConfigError("memory_mb is empty; give one or more of the platform's tiers")
            tiers = tuple(spec.tier(mb) for mb in sorted(set(wanted)))
        space = cls(profile, spec, tiers, global_batch_size, sizes, schedules, syncs, stages, replicas)
        space.check_layers_fit()
        return space

    def problem(self, micro_batch_size: int, schedule: str, *, tiers: tuple[Tier, ...] | None = None,
                syncs: tuple[str, ...] | None = None) -> Problem:
        """The dynamic program's (and CP-SAT's) problem for one micro-batch size and schedule."""
        m = self.global_batch_size // micro_batch_size
        replicas = min(self.max_replicas or DEFAULT_MAX_REPLICAS, m)
        chosen = syncs or self.syncs
        # Each tier at this micro-batch size's speed (Tier.speed_at), as costmodel.stage_costs prices it.
        at_b = tuple(t.at_batch(micro_batch_size) for t in tiers or self.tiers)
        return Problem(self.profile, self.platform, at_b, micro_batch_size, m, self.max_stages,
                       replicas, chosen if len(chosen) > 1 else chosen[0], schedule)

    def one_stage_replicas(self, micro_batch_size: int) -> int:
        """Most replicas of a one-stage plan: one per micro-batch unless ``max_replicas`` says less."""
        m = self.global_batch_size // micro_batch_size
        return m if self.max_replicas is None else min(self.max_replicas, m)

    def check_layers_fit(self) -> None:
        """Every layer must fit the largest allowed tier alone, in its leanest configuration."""
        prof, spec = self.profile, self.platform
        largest = self.tiers[-1]
        b = min(self.sizes)
        m = self.global_batch_size // b
        schedule = "1f1b" if "1f1b" in self.schedules else self.schedules[0]
        last = prof.num_layers - 1
        for i, lp in enumerate(prof.layers):
            in_bytes = prof.input_bytes_per_sample if i == 0 else prof.layers[i - 1].output_bytes_per_sample
            at_end = i == last
            needed = min(
                costmodel.memory_bytes(
                    spec, param_bytes=lp.param_bytes, optimizer_bytes=lp.optimizer_bytes,
                    held_bytes=lp.held_bytes_per_sample * b, input_bytes=in_bytes * b,
                    output_bytes=0.0 if at_end else lp.output_bytes_per_sample * b,
                    target_bytes=prof.target_bytes_per_sample * b if at_end else 0.0, replicas=d,
                    counts=costmodel.held(schedule, last=at_end, micro_batches=-(-m // d), in_flight=1),
                    grad_bytes=0.0 if at_end else lp.gradient_bytes_per_sample * b,
                )
                for d in range(1, self.one_stage_replicas(b) + 1)
            )
            if needed > largest.memory_mb * MIB:
                raise PlanInfeasible(
                    f"layer {i} ({lp.name!r}) needs {needed} bytes ({needed / MIB:.0f} MB) even alone in a stage "
                    f"(micro-batches of {b}, {schedule}), more than the largest tier allowed on {spec.name} "
                    f"({largest.memory_mb} MB); hint: smaller micro-batches, a platform with larger functions, "
                    "or split the layer"
                )


def _sizes(value: int | Sequence[int] | None, batch: int) -> tuple[int, ...]:
    divisors = tuple(b for b in range(1, batch + 1) if batch % b == 0)
    if value is None:
        return divisors
    given = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or not given:
        raise ConfigError(
            f"micro_batch_size must be a positive integer, a list of them, or None (choose), got {value!r}"
        )
    for b in given:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"micro_batch_size must be a positive integer, got {b!r}")
        if batch % b:
            raise ConfigError(
                f"micro_batch_size {b} does not divide global_batch_size {batch}; hint: choose among its "
                f"divisors {list(divisors)}, or None to let the planner choose"
            )
    return tuple(sorted(set(given)))


def _choice(name: str, value: str | None, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if value is None:
        return known
    if value not in known:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {list(known)} or None (choose); {what}")
    return (value,)


def _limit(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def undominated(tiers: Sequence[Tier]) -> tuple[Tier, ...]:
    """The tiers no other tier beats or matches on memory, speed and both bandwidths."""

    def covers(a: Tier, b: Tier) -> bool:
        return (a.memory_mb >= b.memory_mb and a.speed >= b.speed and a.speed_half_batch <= b.speed_half_batch
                and a.uplink_mb_s >= b.uplink_mb_s
                and a.downlink_mb_s >= b.downlink_mb_s)

    return tuple(t for t in tiers if not any(o is not t and covers(o, t) for o in tiers))


# -- the objective ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Goal:
    """What to minimise: ``time_weight * seconds + cost_weight * dollars`` (per iteration),
    under an optional deadline and budget; pure time and pure cost break ties by the other."""

    time_weight: float
    cost_weight: float
    deadline_s: float | None = None
    budget_usd: float | None = None

    @classmethod
    def of(cls, weight: float, deadline_s: float | None, budget_usd: float | None,
           time_ref_s: float = 1.0, cost_ref_usd: float = 1.0) -> Goal:
        if weight >= 1:
            return cls(1.0, 0.0, deadline_s, budget_usd)
        if weight <= 0:
            return cls(0.0, 1.0, deadline_s, budget_usd)
        return cls(weight / time_ref_s, (1 - weight) / cost_ref_usd, deadline_s, budget_usd)

    @property
    def dp_objective(self) -> str | tuple[float, float]:
        if self.cost_weight == 0:
            return "time"
        if self.time_weight == 0:
            return "cost"
        return (self.time_weight, self.cost_weight)

    @property
    def pure_time(self) -> bool:
        return self.cost_weight == 0

    def value(self, seconds: float, dollars: float) -> float:
        return self.time_weight * seconds + self.cost_weight * dollars

    def score(self, sim: Simulation) -> tuple[float, float]:
        if self.cost_weight == 0:
            return (sim.iteration_s, sim.cost_usd)
        if self.time_weight == 0:
            return (sim.cost_usd, sim.iteration_s)
        return (self.value(sim.iteration_s, sim.cost_usd), 0.0)

    def acceptable(self, seconds: float, dollars: float) -> bool:
        return (self.deadline_s is None or seconds <= self.deadline_s) and (
            self.budget_usd is None or dollars <= self.budget_usd
        )


# -- the search ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    """What a search found: the best plan by the simulator, the candidates and the proof."""

    best: Simulation
    simulated: tuple[Simulation, ...]  # every candidate simulated (the best among them)
    status: str  # "optimal": the formula's optimum over the whole space is proven; else "feasible"
    gap: float  # relative gap between the best formula value found and the proven bound
    best_formula: float  # the best formula value found (the objective)


@dataclasses.dataclass(frozen=True)
class _Single:
    """A one-stage plan: its formula seconds and dollars, and lower bounds on its simulation's."""

    plan: Plan
    seconds: float
    usd: float
    low_s: float
    low_usd: float


def _simulated_at_least(st: costmodel.StageCost, platform: Platform) -> float:
    """A lower bound on the simulated iteration of a one-stage plan: the first input and target
    come down; the busiest replica computes its micro-batches; its all-reduce downloads
    ``2 (d-1)/d`` of the gradient after its last backward; the update; the report goes up."""
    lat = platform.latency_s
    seconds = (st.down_s(st.input_bytes, lat) + st.down_s(st.target_bytes, lat)
               + st.micro_batches * (st.forward_s + st.backward_s) + st.update_s + st.up_s(REPORT_BYTES, lat))
    if st.replicas > 1 and st.param_bytes > 0:
        d = st.replicas
        seconds += st.down_s(2 * (d - 1) / d * st.param_bytes, lat)
    return seconds * (1 - 1e-9)


@dataclasses.dataclass
class _Entry:
    value: float  # the goal's formula value
    plan: Plan
    origin: str  # "one-stage", "pipeline", "paper", ...


class Search:
    """One objective's search over a :class:`Space` (see the module docstring)."""

    def __init__(self, space: Space, cache: dict[Plan, Simulation] | None = None) -> None:
        self.space = space
        self.cache: dict[Plan, Simulation] = {} if cache is None else cache
        self._one_stage: list[_Single] | None = None

    # -- simulation ---------------------------------------------------------------

    def simulate(self, plan: Plan) -> Simulation:
        key = dataclasses.replace(plan, platform=None)
        sim = self.cache.get(key)
        if sim is None:
            sim = self.cache[key] = simulate(plan, self.space.profile, self.space.platform)
        return sim

    def try_simulate(self, plan: Plan) -> Simulation | None:
        try:
            return self.simulate(plan)
        except PlanInfeasible:
            return None

    # -- step 1: one stage ----------------------------------------------------------

    def one_stage(self) -> list[_Single]:
        """Every one-stage plan that fits, with its formula values and lower bounds on its simulation."""
        if self._one_stage is not None:
            return self._one_stage
        space = self.space
        plat = space.platform
        out = []
        layers = space.profile.num_layers
        for b in space.sizes:
            for d in range(1, space.one_stage_replicas(b) + 1):
                for schedule in space.schedules:
                    for sync in (space.syncs if d > 1 else space.syncs[:1]):
                        # A tier with less memory than one the plan does not fit does not fit either.
                        too_small = 0
                        for tier in sorted(space.tiers, key=lambda t: -t.memory_mb):
                            if tier.memory_mb < too_small:
                                continue
                            plan = Plan((layers,), (d,), b, space.global_batch_size, (tier.memory_mb,), sync,
                                        schedule)
                            try:
                                stages = costmodel.stage_costs(space.profile, plat, plan)
                            except PlanInfeasible:
                                too_small = tier.memory_mb
                                continue
                            seconds = costmodel.formula_iteration_s(stages, plat, plan)
                            low = _simulated_at_least(stages[0], plat)
                            out.append(_Single(plan, seconds, costmodel.cost_per_iteration(seconds, stages, plan, plat),
                                               low, costmodel.cost_per_iteration(low, stages, plan, plat)))
        self._one_stage = out
        return out

    def best_single(self, goal: Goal, members: Sequence[_Single], *, cutoff: float = math.inf,
                    give_up_at: float = math.inf) -> Simulation | None:
        """The best of ``members`` by the simulator under ``goal``, if better than ``cutoff``: exact,
        simulating in order of a lower bound on each plan's simulation and stopping where that bound
        passes the best found (or at ``give_up_at``)."""
        best: Simulation | None = None
        best_value = cutoff
        for single in sorted(members, key=lambda e: (goal.value(e.low_s, e.low_usd), e.seconds)):
            if goal.value(single.low_s, single.low_usd) > best_value or time.perf_counter() > give_up_at:
                break
            if not goal.acceptable(single.low_s, single.low_usd):
                continue
            sim = self.simulate(single.plan)
            value = goal.value(sim.iteration_s, sim.cost_usd)
            if goal.acceptable(sim.iteration_s, sim.cost_usd) and value <= best_value and (
                    best is None or goal.score(sim) < goal.score(best)):
                best, best_value = sim, value
        return best

    def baselines(self, goal: Goal) -> dict[str, Simulation]:
        """The best plan, by the simulator, of each baseline's own space: ``one_function`` (one
        function, 1F1B, any micro-batch size and tier) and ``lambdaml`` / ``lambdaml_pipelined``
        (``d`` functions of one micro-batch each, four-phase / pipelined all-reduce)."""
        families: dict[str, list[_Single]] = {"one_function": [], "lambdaml": [], "lambdaml_pipelined": []}
        for single in self.one_stage():
            plan = single.plan
            if plan.replicas == (1,) and plan.schedule == "1f1b":
                families["one_function"].append(single)
            if plan.replicas[0] == plan.num_micro_batches:  # one micro-batch per worker
                if plan.replicas == (1,):
                    names = ["lambdaml", "lambdaml_pipelined"]  # no all-reduce
                else:
                    names = ["lambdaml" if plan.stage_sync(0) == "four_phase" else "lambdaml_pipelined"]
                for name in names:
                    families[name].append(single)
        out = {}
        for name, members in families.items():
            best = self.best_single(goal, members)
            if best is not None:
                out[name] = best
        return out

    # -- the whole search -------------------------------------------------------------

    def run(self, goal: Goal, *, candidates: int, time_limit_s: float, give_up_at: float,
            bar: Any = None, fallback: bool = False) -> Result:
        """The best plan for ``goal`` by the simulator among the candidates (see the module docstring).

        Raises:
            PlanInfeasible: no plan fits, or none meets the deadline and budget.
            PlanTimeout: the searches ran out of time before any plan meeting them was found.
        """
        started = time.perf_counter()
        entries: list[_Entry] = []
        lower_bounds: list[float] = []

        # 1. One stage by the formula, enumerated whole.
        one = self.one_stage()
        entries += self._one_stage_entries(goal, one)
        if entries:
            lower_bounds.append(entries[0].value)

        # 2. Pipelines of two stages and more, by the dynamic program, per micro-batch size and schedule.
        proven = self._pipeline_entries(goal, goal, one, entries, lower_bounds, candidates, started, time_limit_s,
                                        give_up_at, bar)

        # 3. The paper's configuration.
        paper = self._paper_plan(goal, give_up_at)
        if paper is not None:
            entries.append(_Entry(paper[0], paper[1], "paper"))

        # 4. The simulator decides among the best by the formula, each pipeline also under the
        # other schedule. The formula is a lower bound: a plan it lets through a deadline or a
        # budget may break it in the replay; then the programs look again under limits
        # tightened by how far the formula fell short (a few rounds at most).
        simulated: list[Simulation] = []
        dp_goal = goal
        for _ in range(LIMIT_ROUNDS):
            simulated += self._simulate_pool(entries, candidates, simulated)
            ok = [sim for sim in simulated if goal.acceptable(sim.iteration_s, sim.cost_usd)]
            best_ok = min((goal.score(sim) for sim in ok), default=None)
            broke = [sim for sim in simulated if not goal.acceptable(sim.iteration_s, sim.cost_usd)
                     and (best_ok is None or goal.score(sim) < best_ok)]
            if not broke or time.perf_counter() > give_up_at:
                break
            # Tighten by how far the formula fell short on the best plan that broke the limit (each
            # round tightens a little more, as the next best break); the plans known to break it no
            # longer bound what the programs look for.
            worst = min(broke, key=goal.score)
            ratio = worst.formula_s / worst.iteration_s
            if ratio >= 1 - 1e-9:
                break
            dp_goal = dataclasses.replace(
                dp_goal, deadline_s=None if dp_goal.deadline_s is None else dp_goal.deadline_s * ratio,
                budget_usd=None if dp_goal.budget_usd is None else dp_goal.budget_usd * ratio)
            broken = {sim.plan for sim in broke}
            entries[:] = [e for e in entries if e.plan not in broken]
            entries += [e for e in self._one_stage_entries(dp_goal, one) if e not in entries]
            self._pipeline_entries(goal, dp_goal, one, entries, [], candidates, time.perf_counter(),
                                   max(0.5, (give_up_at - time.perf_counter()) / 2), give_up_at, None)
        ok = [sim for sim in simulated if goal.acceptable(sim.iteration_s, sim.cost_usd)]
        # ... and every one-stage plan that the simulator may find better than those: the
        # baselines' spaces (one function with gradient accumulation, every LambdaML configuration)
        # are in it, so none of their plans beats the one returned.
        cutoff = min((goal.value(sim.iteration_s, sim.cost_usd) for sim in ok), default=math.inf)
        single = self.best_single(goal, one, cutoff=cutoff, give_up_at=give_up_at)
        if single is not None:
            simulated.append(single)
            ok.append(single)
        if not ok and (goal.deadline_s is not None or goal.budget_usd is not None) and not fallback:
            # The programs' plans broke the limit in the replay: the fastest plan (for a deadline) or the
            # cheapest (for a budget) without it may still meet it; then make it cheaper or keep it.
            give_up_at = max(give_up_at, time.perf_counter() + time_limit_s / 2)  # the rescue's own time
            rescue = self._within_limit(goal, candidates, give_up_at)
            if rescue is not None:
                give_up_at = max(give_up_at, time.perf_counter() + time_limit_s / 4)  # and its cheapening
                simulated.append(rescue)
                ok.append(rescue)
        if not ok:
            if not simulated and not entries:
                self.explain_infeasible(goal)
            if not proven:
                raise PlanTimeout(
                    f"no plan meeting the deadline or budget was found within time_limit_s={time_limit_s:g}; "
                    "hint: raise time_limit_s"
                )
            best = min(simulated, key=goal.score) if simulated else None
            limit = "deadline_s" if goal.deadline_s is not None else "budget_usd"
            value = goal.deadline_s if goal.deadline_s is not None else goal.budget_usd
            reached = "" if best is None else (
                f"; the best the planner found takes {best.iteration_s:.4g} s and ${best.cost_usd:.4g} per "
                "iteration")
            raise PlanInfeasible(f"no plan meets {limit}={value!r} by the simulator{reached}; hint: relax the {limit}")
        best = min(ok, key=goal.score)
        if goal.pure_time:
            best = self.cheapen(best, goal, give_up_at)
        elif goal.time_weight == 0 and goal.deadline_s is not None:
            best = self.cheapen(best, goal, give_up_at, within_s=goal.deadline_s)
        best_formula = min((e.value for e in entries), default=math.inf)
        bound = min(lower_bounds) if lower_bounds else 0.0
        gap = 0.0 if not math.isfinite(best_formula) or best_formula <= 0 else max(
            0.0, (best_formula - bound) / best_formula)
        status = "optimal" if proven and gap <= 1e-9 else "feasible"
        return Result(best, tuple(simulated), status, gap, best_formula)

    def _one_stage_entries(self, goal: Goal, one: list[_Single]) -> list[_Entry]:
        singles = sorted((e for e in one if goal.acceptable(e.seconds, e.usd)),
                         key=lambda e: (goal.value(e.seconds, e.usd), e.seconds, e.usd))
        return [_Entry(goal.value(e.seconds, e.usd), e.plan, "one-stage") for e in singles[:ONE_STAGE_CANDIDATES]]

    def _pipeline_entries(self, goal: Goal, dp_goal: Goal, one: list[_Single], entries: list[_Entry],
                          lower_bounds: list[float], candidates: int, started: float, time_limit_s: float,
                          give_up_at: float, bar: Any) -> bool:
        """Add the best pipelines by the formula under ``dp_goal``'s limits to ``entries`` and their
        proven bounds to ``lower_bounds``; whether every pair was proven.

        Every (micro-batch size, schedule) gets a share of the time limit, the most promising
        half of it; pairs whose proof ran out of time get the time the others left, and CP-SAT
        the rest when even that was not enough."""
        space = self.space
        ends = started + time_limit_s
        unfinished: list[Problem] = []
        unproven = False
        combos = self._combos(goal, one) if space.max_stages >= 2 else []
        for k, (b, schedule) in enumerate(combos):
            # Plans up to RERANK_MARGIN above the best so far by the formula may be the best by the
            # simulator: the program looks for those too.
            incumbent = min((e.value for e in entries), default=math.inf) * (1 + RERANK_MARGIN)
            least = self._least(goal, b)
            if least >= incumbent:  # no pipeline at this micro-batch size can do better
                lower_bounds.append(least)
            elif time.perf_counter() >= ends and entries:  # out of time: its closed-form bound only
                lower_bounds.append(least)
                unproven = True
            else:
                remaining = ends - time.perf_counter()
                share = max(0.05, remaining * (FIRST_SHARE if k == 0 else 1 / (len(combos) - k)))
                problem = space.problem(b, schedule, tiers=self._tiers(goal))
                if not self._pipelines(problem, dp_goal, incumbent, candidates, share, None, entries, lower_bounds):
                    unfinished.append(problem)
            if bar is not None:
                bar.update(1)
        proven = not unproven
        for k, problem in enumerate(unfinished):
            if time.perf_counter() >= ends:
                lower_bounds.append(self._least(goal, problem.micro_batch_size))
                proven = False
                continue
            incumbent = min((e.value for e in entries), default=math.inf) * (1 + RERANK_MARGIN)
            share = max(0.05, (ends - time.perf_counter()) / (len(unfinished) - k))
            proven &= self._pipelines(problem, dp_goal, incumbent, candidates, share, ends, entries, lower_bounds)
        return proven

    def _simulate_pool(self, entries: list[_Entry], candidates: int, done: list[Simulation]) -> list[Simulation]:
        """Simulate the best entries by the formula (pipelines: the best ``candidates``, each also
        under the other schedule) not simulated yet."""
        space = self.space
        pool: list[Plan] = []
        for entry in sorted(entries, key=lambda e: e.value):
            if entry.origin == "pipeline" and sum(1 for p in pool if p.num_stages > 1) >= 2 * candidates:
                continue
            pool.append(entry.plan)
            if entry.plan.num_stages > 1:
                pool += [dataclasses.replace(entry.plan, schedule=s) for s in space.schedules
                         if s != entry.plan.schedule]
        seen = {sim.plan for sim in done}
        out = []
        for plan in dict.fromkeys(pool):
            if dataclasses.replace(plan, platform=None) in seen:
                continue
            sim = self.try_simulate(plan)
            if sim is not None:
                out.append(sim)
        return out

    def _tiers(self, goal: Goal) -> tuple[Tier, ...]:
        # For time alone, a tier with at least as much memory, speed and bandwidth as
        # another is never worse: drop the dominated ones (fewer choices, same optimum).
        return undominated(self.space.tiers) if goal.pure_time and goal.budget_usd is None else self.space.tiers

    def _combos(self, goal: Goal, one: list[_Single]) -> list[tuple[int, str]]:
        """Every (micro-batch size, schedule), the most promising first: by the best one-stage plan
        at that size, so the incumbent is good early and prunes the rest."""
        best_at: dict[int, float] = {}
        for e in one:
            value = goal.value(e.seconds, e.usd)
            b = e.plan.micro_batch_size
            best_at[b] = min(best_at.get(b, math.inf), value)
        combos = [(b, s) for b in self.space.sizes for s in self.space.schedules]
        return sorted(combos, key=lambda c: (best_at.get(c[0], math.inf), c[0] != PAPER_MICRO_BATCH, c))

    def _pipelines(self, problem: Problem, goal: Goal, incumbent: float, candidates: int, time_limit_s: float,
                   cp_sat_until: float | None, entries: list[_Entry], lower_bounds: list[float]) -> bool:
        """Add the best plans of one micro-batch size and schedule to ``entries`` and their proven
        bound to ``lower_bounds``; whether it was proven. With ``cp_sat_until``, CP-SAT tries until
        then when the program runs out of time."""
        try:
            found: dp.Optimum | None = dp.optimum(
                problem, goal.dp_objective, deadline_s=goal.deadline_s, budget_usd=goal.budget_usd,
                incumbent=incumbent, alternatives=candidates - 1, time_limit_s=time_limit_s)
        except TimeoutError:
            found = None
            timed_out = True
        else:
            timed_out = found is not None and not found.proven
        if found is None and not timed_out:  # proven: no pipeline fits, or none meets the deadline and budget
            lower_bounds.append(math.inf)
            return True
        if found is not None:
            plans = [] if found.candidate is None else [(found.value, found.candidate.to_plan(problem))]
            plans += [(v, c.to_plan(problem)) for v, c in found.others]
            entries += [_Entry(value, plan, "pipeline") for value, plan in plans if
                        _Entry(value, plan, "pipeline") not in entries]
            if found.proven:
                lower_bounds.append(found.bound)
                return True
        if cp_sat_until is None:
            return False
        solved = self._cp_sat(problem, goal, found, cp_sat_until)
        if solved is None:  # nothing proven: the closed-form bound of every plan at this micro-batch size
            lower_bounds.append(self._least(goal, problem.micro_batch_size))
            return False
        bound, plans = solved
        entries += [_Entry(value, plan, "pipeline") for value, plan in plans]
        lower_bounds.append(max(bound, self._least(goal, problem.micro_batch_size)))
        return bound > 0

    def _cp_sat(self, problem: Problem, goal: Goal, found: dp.Optimum | None,
                until: float) -> tuple[float, list[tuple[float, Plan]]] | None:
        """CP-SAT on one pair the program could not finish, from the program's plan if it had one:
        ``(proven lower bound, [(value, plan)])``, ``(0, ...)`` when it proved nothing, ``None``
        when it did not run or found nothing in time."""
        hint = None if found is None else found.candidate
        remaining = until - time.perf_counter()
        weight = 1.0 if goal.pure_time else 0.0 if goal.time_weight == 0 else None
        if remaining < CP_SAT_MIN_S or weight is None:
            return None
        try:
            solution = solve(problem, Objective(weight), deadline_s=goal.deadline_s, budget_usd=goal.budget_usd,
                             time_limit_s=remaining, hint=hint)
        except PlanTimeout:
            return None
        if solution is None:
            return math.inf, []
        plan = solution.candidate.to_plan(problem)
        try:
            stages = costmodel.stage_costs(problem.profile, problem.platform, plan)
        except PlanInfeasible:  # pragma: no cover - the model's byte rounding
            return None
        seconds = costmodel.formula_iteration_s(stages, problem.platform, plan, windows=False)
        dollars = costmodel.cost_per_iteration(seconds, stages, plan, problem.platform)
        value = goal.value(seconds, dollars)
        # CP-SAT's bound, in the goal's units (its model rounds the formula by well under 0.1%).
        bound = value * (1 - solution.gap) * 0.999 if solution.gap < 1 else 0.0
        return bound, [(value, plan)]

    def _least(self, goal: Goal, micro_batch_size: int) -> float:
        """A lower bound on the goal's value of every plan at ``micro_batch_size``: micro-batch 0
        crosses every layer forward and backward at the fastest speed, the whole batch's work
        spreads over at most ``max_stages x max_replicas`` functions at most, and every function
        is billed at least for its work at the best price per speed, plus the driver's messages."""
        space = self.space
        b = micro_batch_size
        m = space.global_batch_size // b
        work = sum(lp.forward_s(b) + lp.backward_s(b) for lp in space.profile.layers)
        fastest = max(t.speed for t in space.tiers)
        workers = space.max_stages * min(space.max_replicas or DEFAULT_MAX_REPLICAS, m)
        seconds = max(work / fastest, m * work / fastest / workers)
        best_rate = min(space.platform.price_per_s(t) / t.speed for t in space.tiers)
        plat = space.platform
        dollars = m * work * best_rate + 2 * m * (plat.price_per_put + plat.price_per_get)
        return goal.value(seconds, dollars) * (1 - 1e-9)

    def _paper_plan(self, goal: Goal, give_up_at: float) -> tuple[float, Plan] | None:
        """The best GPipe pipeline at micro-batch 4 with the pipelined all-reduce, by the formula."""
        space = self.space
        if (PAPER_MICRO_BATCH not in space.sizes or "gpipe" not in space.schedules or "pipelined" not in space.syncs
                or space.max_stages < 2):
            return None
        problem = space.problem(PAPER_MICRO_BATCH, "gpipe", tiers=self._tiers(goal), syncs=("pipelined",))
        remaining = max(0.05, give_up_at - time.perf_counter())
        try:
            found = dp.optimum(problem, goal.dp_objective, deadline_s=goal.deadline_s, budget_usd=goal.budget_usd,
                               time_limit_s=min(remaining, 10.0))
        except TimeoutError:
            return None
        if found is None or found.candidate is None:
            return None
        return found.value, found.candidate.to_plan(problem)

    def _within_limit(self, goal: Goal, candidates: int, give_up_at: float) -> Simulation | None:
        """For a deadline: the fastest plan (within the budget, if any), if it meets the deadline; for a
        budget alone: the cheapest plan, if it meets it. ``None`` if that plan does not, or none is found
        before ``give_up_at``."""
        remaining = give_up_at - time.perf_counter()
        if remaining <= 0.5:
            return None
        other = (Goal.of(1.0, None, goal.budget_usd) if goal.deadline_s is not None else Goal.of(0.0, None, None))
        try:
            found = Search(self.space, self.cache).run(other, candidates=candidates, time_limit_s=remaining / 2,
                                                        give_up_at=give_up_at, fallback=True).best
        except (PlanInfeasible, PlanTimeout):
            return None
        return found if goal.acceptable(found.iteration_s, found.cost_usd) else None

    def cheapen(self, best: Simulation, goal: Goal, give_up_at: float, *, within_s: float | None = None) -> Simulation:
        """Smaller tiers and fewer replicas, stage by stage, wherever the simulator says it costs no time
        (or, with ``within_s``, keeps the iteration within ``within_s`` seconds)."""
        improved = True
        tries = 0
        most = CHEAPEN_SIMULATIONS if within_s is None else 4 * CHEAPEN_SIMULATIONS  # a deadline leaves room
        while improved and time.perf_counter() < give_up_at and tries < most:
            improved = False
            plan = best.plan
            assert plan.memory_mb is not None
            for stage in range(plan.num_stages):
                options = [(mb, plan.replicas[stage]) for mb in (t.memory_mb for t in self.space.tiers)
                           if mb < plan.memory_mb[stage]]
                options += [(plan.memory_mb[stage], d) for d in range(1, plan.replicas[stage])]
                for memory, replicas in options:
                    candidate = dataclasses.replace(
                        plan,
                        memory_mb=tuple(memory if s == stage else m for s, m in enumerate(plan.memory_mb)),
                        replicas=tuple(replicas if s == stage else r for s, r in enumerate(plan.replicas)),
                    )
                    limit_s = best.iteration_s if within_s is None else within_s
                    if not self._may_beat(candidate, best, limit_s) or tries >= most:
                        continue
                    tries += 1
                    sim = self.try_simulate(candidate)
                    if sim is None:
                        continue
                    if (sim.iteration_s <= limit_s and sim.cost_usd < best.cost_usd
                            and goal.acceptable(sim.iteration_s, sim.cost_usd)):
                        best, improved = sim, True
                        break
                if improved or time.perf_counter() >= give_up_at:
                    break
        return best

    def _may_beat(self, plan: Plan, best: Simulation, limit_s: float) -> bool:
        """Whether ``plan`` may take at most ``limit_s`` and cost less than ``best``: the formula is a lower
        bound on the simulator's seconds (and so on its dollars), so only those it allows are simulated."""
        space = self.space
        try:
            stages = costmodel.stage_costs(space.profile, space.platform, plan)
        except PlanInfeasible:
            return False
        seconds = costmodel.formula_iteration_s(stages, space.platform, plan)
        if seconds > limit_s:
            return False
        return costmodel.cost_per_iteration(seconds, stages, plan, space.platform) < best.cost_usd

    def explain_infeasible(self, goal: Goal) -> None:
        """Raise :class:`PlanInfeasible` saying which limit no plan meets and what the best plan reaches."""
        space = self.space
        if goal.deadline_s is not None or goal.budget_usd is not None:
            # The fastest plan within the budget says what deadline can be met; the cheapest, what budget.
            weight, limits = (1.0, (None, goal.budget_usd)) if goal.deadline_s is not None else (0.0, (None, None))
            try:
                best = Search(space, self.cache).run(Goal.of(weight, *limits), candidates=1, time_limit_s=10.0,
                                                     give_up_at=time.perf_counter() + 20.0).best
            except (PlanInfeasible, PlanTimeout):
                best = None
            if best is not None:
                asked = (f"deadline_s={goal.deadline_s!r}" if goal.deadline_s is not None else "") + (
                    " with " if goal.deadline_s is not None and goal.budget_usd is not None else "") + (
                    f"budget_usd={goal.budget_usd!r}" if goal.budget_usd is not None else "")
                what = (f"the fastest plan{' within the budget' if goal.budget_usd is not None else ''} takes "
                        f"{best.iteration_s:.4g} s per iteration" if weight else
                        f"the cheapest plan costs ${best.cost_usd:.4g} per iteration")
                raise PlanInfeasible(
                    f"no plan meets {asked}: {what}; hint: relax the "
                    f"{'deadline' if weight else 'budget'}, or allow more stages, replicas or larger tiers"
                )
        raise PlanInfeasible(
            f"no plan of at most {space.max_stages} stages fits {space.platform.name}'s tiers "
            f"{[t.memory_mb for t in space.tiers]} MB with micro-batches of {list(space.sizes)} and the "
            f"{' or '.join(space.schedules)} schedule; hint: allow more stages (max_stages), smaller micro-batches, "
            "the 1f1b schedule or larger tiers"
        )
