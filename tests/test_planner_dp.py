"""The dynamic program of funcpipe.planner.dp against exhaustive enumeration with funcpipe.costmodel."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

from funcpipe import PlanInfeasible, costmodel
from funcpipe.planner import dp
from funcpipe.planner.model import Candidate, Objective, Problem, rounding, solve
from funcpipe.platforms import Platform, Tier
from funcpipe.profiler import LayerProfile, ModelProfile
from tests.test_planner import random_platform, random_profile

MICRO_BATCH, MICRO_BATCHES = 2, 8


def every_value(problem: Problem) -> list[tuple[float, float, Candidate]]:
    """``(seconds, dollars, candidate)`` by funcpipe.costmodel of every plan of ``problem`` that fits:
    every cut, tier and replica count per stage, and every all-reduce the problem allows per
    stage with replicas."""
    values = []
    layers = problem.profile.num_layers
    syncs = problem.syncs
    for stages in range(1, problem.max_stages + 1):
        for cuts in itertools.combinations(range(1, layers), stages - 1):
            bounds = [0, *cuts, layers]
            balance = tuple(b - a for a, b in itertools.pairwise(bounds))
            for memory in itertools.product([t.memory_mb for t in problem.tiers], repeat=stages):
                for replicas in itertools.product(range(1, problem.max_replicas + 1), repeat=stages):
                    for sync in itertools.product(*[syncs if d > 1 else syncs[:1] for d in replicas]):
                        candidate = Candidate(balance, memory, replicas, sync if len(syncs) > 1 else ())
                        plan = candidate.to_plan(problem)
                        try:
                            st = costmodel.stage_costs(problem.profile, problem.platform, plan)
                        except PlanInfeasible:
                            continue
                        seconds = costmodel.formula_iteration_s(st, problem.platform, plan, windows=False)
                        values.append((seconds, costmodel.cost_per_iteration(seconds, st, plan, problem.platform),
                                       candidate))
    return values


def formula(problem: Problem, candidate: Candidate) -> tuple[float, float]:
    plan = candidate.to_plan(problem)
    st = costmodel.stage_costs(problem.profile, problem.platform, plan)
    seconds = costmodel.formula_iteration_s(st, problem.platform, plan, windows=False)
    return seconds, costmodel.cost_per_iteration(seconds, st, plan, problem.platform)


def check(problem: Problem) -> bool:
    """The program's optimum for time, cost, cost under a deadline, time under a budget and a
    weighted sum equals the enumeration's."""
    values = every_value(problem)
    if not values:
        assert dp.optimum(problem, "time") is None
        return False
    times = sorted(s for s, _, _ in values)
    costs = sorted(c for _, c, _ in values)
    deadline = times[len(times) // 4]  # a deadline a quarter of the plans meet (one exactly)
    budget = costs[len(costs) // 3]
    weights = (0.5 / times[0], 0.5 / costs[0])
    cases: dict[tuple[str | tuple[float, float], float | None, float | None], float] = {
        ("time", None, None): times[0],
        ("cost", None, None): costs[0],
        ("cost", deadline, None): min(c for s, c, _ in values if s <= deadline),
        ("time", None, budget): min(s for s, c, _ in values if c <= budget),
        (weights, None, None): min(weights[0] * s + weights[1] * c for s, c, _ in values),
    }
    for (objective, limit, budget_usd), best in cases.items():
        found = dp.optimum(problem, objective, deadline_s=limit, budget_usd=budget_usd)
        assert found is not None and found.candidate is not None and found.proven
        seconds, dollars = formula(problem, found.candidate)
        value = {"time": seconds, "cost": dollars}.get(objective) if isinstance(objective, str) else (
            weights[0] * seconds + weights[1] * dollars)
        assert found.value == value
        assert (found.iteration_s, found.cost_usd) == (seconds, dollars)
        assert found.value == pytest.approx(best, rel=1e-9), (objective, limit, budget_usd)
        assert found.bound == found.value
        assert limit is None or seconds <= limit
        assert budget_usd is None or dollars <= budget_usd
    return True


# Both schedules; one all-reduce for every stage (up to 3 stages of 3 replicas, or 4 of 2) or a
# choice per stage (3 of 2: every stage with replicas doubles the plans).
CONFIGS = [(schedule, sync, limits) for schedule in ("gpipe", "1f1b")
           for sync, limits in (("pipelined", (3, 3)), ("four_phase", (3, 3)), ("pipelined", (4, 2)),
                                (("pipelined", "four_phase"), (3, 2)))]


@pytest.mark.parametrize(("schedule", "sync", "limits"), CONFIGS)
def test_equals_exhaustive_enumeration_on_random_small_profiles(
    schedule: str, sync: str | tuple[str, ...], limits: tuple[int, int]
) -> None:
    checked = 0
    for seed in range(5):
        rng = random.Random(seed * 31 + CONFIGS.index((schedule, sync, limits)))
        profile, platform = random_profile(rng), random_platform(rng)
        problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, *limits, sync, schedule)
        checked += check(problem)
    assert checked >= 3


def eight_tiers(rng: random.Random) -> Platform:
    base = random_platform(rng)
    tiers = tuple(
        Tier(mb, mb / 1769, min(1.0, mb / 1769) + 0.5 * max(0.0, mb / 1769 - 1), bandwidth, bandwidth)
        for mb, bandwidth in zip((512, 1024, 1536, 2048, 3072, 4096, 6144, 8192), (20, 20, 70, 70, 70, 300, 300, 300),
                                 strict=True)
    )
    return dataclasses.replace(base, tiers=tiers)


@pytest.mark.parametrize(("seed", "schedule"), [(1, "gpipe"), (2, "1f1b")])
def test_equals_exhaustive_enumeration_on_a_medium_profile(seed: int, schedule: str) -> None:
    """8 layers or more, 8 tiers with three link speeds, up to 3 stages and 2 replicas (about 10**5 plans)."""
    rng = random.Random(seed)
    profile = random_profile(rng)
    while profile.num_layers < 8:
        profile = random_profile(rng)
    platform = eight_tiers(rng)
    problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 2, "pipelined", schedule)
    assert check(problem)


def window_case() -> Problem:
    """Four layers of activations that only a short 1F1B window holds: the first stage fits its tier
    only if few workers follow it (its window ``ceil(W / d)`` is the workers from it on)."""
    # 92 MB saved per micro-batch of 2: a 512 MB function holds 4 of them (3 in flight and the
    # workspace of one) beside its runtime, not 5.
    layer = LayerProfile("block", 0.0, 0.01, 0.0, 0.02, 10**6, 10**6, 0.0, 2e5, 4.8e7)
    profile = ModelProfile((layer,) * 4, 2e5, 8.0)
    tiers = tuple(Tier(mb, 1.0, 1.0, 70.0, 70.0) for mb in (512, 1024))
    platform = Platform("window", tiers, 0.01, 0.0000166667, 0.0, 2e-7, 5e-6, 4e-7, 900.0, 100, 2**20, "s3")
    return Problem(profile, platform, tiers, 2, 16, 3, 3, "pipelined", "1f1b")


def test_the_1f1b_window_of_a_stage_depends_on_the_workers_after_it() -> None:
    """In the window case some plans fit only because few workers follow their first stage: the
    program, going left to right, carries the most workers later cuts may hold, and agrees with
    the enumeration."""
    problem = window_case()
    values = every_value(problem)
    # The case is what it says: a first stage that fits before two workers but not before three.
    first = Candidate((1, 3), (512, 1024), (1, 2))
    crowded = Candidate((1, 3), (512, 1024), (1, 3))
    plans = {c for _, _, c in values}
    assert first in plans and crowded not in plans
    assert costmodel.stage_costs(problem.profile, problem.platform,
                                 dataclasses.replace(crowded.to_plan(problem), memory_mb=(1024, 1024)))
    assert check(problem)


def test_alternatives_are_other_plans_in_order() -> None:
    rng = random.Random(4)
    profile, platform = random_profile(rng), random_platform(rng)
    problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 3)
    found = dp.optimum(problem, "time", alternatives=4)
    assert found is not None and found.candidate is not None
    values = [found.value] + [v for v, _ in found.others]
    assert values == sorted(values) and len(found.others) == 4
    candidates = [found.candidate] + [c for _, c in found.others]
    assert len(set(candidates)) == 5
    for value, candidate in found.others:
        assert formula(problem, candidate)[0] == value


def test_an_incumbent_that_no_plan_beats_gives_its_bound_and_no_plan() -> None:
    rng = random.Random(5)
    profile, platform = random_profile(rng), random_platform(rng)
    problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 3)
    best = dp.optimum(problem, "cost")
    assert best is not None
    none = dp.optimum(problem, "cost", incumbent=best.value * 0.9)
    assert none is not None and none.candidate is None and none.bound == best.value * 0.9
    better = dp.optimum(problem, "cost", incumbent=best.value * 1.1)
    assert better is not None and better.value == best.value


def test_a_gap_gives_a_proven_bound_within_it() -> None:
    rng = random.Random(5)
    profile, platform = random_profile(rng), random_platform(rng)
    problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 3)
    exact = dp.optimum(problem, "cost")
    loose = dp.optimum(problem, "cost", gap=0.05)
    assert exact is not None and loose is not None
    assert loose.bound <= exact.value <= loose.value <= loose.bound * 1.05


def test_out_of_time_the_narrow_passs_plan_is_given_unproven(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    profile, platform = random_profile(rng), random_platform(rng)
    problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 3)
    runs = []
    real_run = dp._Search.run

    def exact_pass_times_out(self: dp._Search) -> None:
        runs.append(self.beam)
        if self.beam is None:
            raise TimeoutError("the dynamic program ran out of time")
        real_run(self)

    monkeypatch.setattr(dp._Search, "run", exact_pass_times_out)
    found = dp.optimum(problem, "time")
    assert runs == [dp.BEAM, None]
    assert found is not None and found.candidate is not None and not found.proven and found.bound == 0.0
    assert found.value == formula(problem, found.candidate)[0]


def test_cp_sat_with_the_bound_stays_at_the_formula_optimum() -> None:
    """With the program's bound (less the model's rounding), CP-SAT stops within 1% of it, at
    a plan whose formula value is the optimum's within the model's resolution."""
    for seed in range(4):
        rng = random.Random(seed)
        profile, platform = random_profile(rng), random_platform(rng)
        problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 3,
                          ("pipelined", "four_phase"), "1f1b" if seed % 2 else "gpipe")
        slack = rounding(problem)
        found = dp.optimum(problem, "time", memory_slack_bytes=slack.memory_slack_bytes(MICRO_BATCHES))
        if found is None:
            continue
        solution = solve(problem, Objective(1.0), hint=found.candidate, lower_bound=found.bound, time_limit_s=10)
        assert solution is not None
        assert solution.gap <= 0.01
        assert solution.iteration_s == pytest.approx(found.value, rel=2e-3)


def test_bad_objective() -> None:
    rng = random.Random(5)
    problem = Problem(random_profile(rng), random_platform(rng), random_platform(rng).tiers, 2, 8, 2, 2)
    with pytest.raises(ValueError, match="objective must be"):
        dp.optimum(problem, "fast")
    assert math.isfinite(dp.optimum(problem, (1.0, 0.0)).value)  # type: ignore[union-attr]
