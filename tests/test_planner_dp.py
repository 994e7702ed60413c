"""The dynamic program of funcpipe.planner.dp against exhaustive enumeration with funcpipe.costmodel."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from funcpipe import Plan, PlanInfeasible, costmodel
from funcpipe.planner import dp
from funcpipe.planner.model import Objective, Problem, rounding, solve
from funcpipe.platforms import Platform, Tier
from tests.test_planner import random_platform, random_profile

MICRO_BATCH, MICRO_BATCHES = 2, 8


def every_value(problem: Problem) -> list[tuple[float, float]]:
    """``(seconds, dollars)`` by funcpipe.costmodel of every plan of ``problem`` that fits."""
    values = []
    layers = problem.profile.num_layers
    for stages in range(1, problem.max_stages + 1):
        for cuts in itertools.combinations(range(1, layers), stages - 1):
            bounds = [0, *cuts, layers]
            balance = tuple(b - a for a, b in itertools.pairwise(bounds))
            for memory in itertools.product([t.memory_mb for t in problem.tiers], repeat=stages):
                for replicas in itertools.product(range(1, problem.max_replicas + 1), repeat=stages):
                    plan = Plan(balance, replicas, MICRO_BATCH, MICRO_BATCH * MICRO_BATCHES, memory, problem.sync)
                    try:
                        st = costmodel.stage_costs(problem.profile, problem.platform, plan)
                    except PlanInfeasible:
                        continue
                    seconds = costmodel.formula_iteration_s(st, problem.platform, plan)
                    values.append((seconds, costmodel.cost_per_iteration(seconds, st, plan, problem.platform)))
    return values


def formula(problem: Problem, found: dp.Optimum) -> tuple[float, float]:
    c = found.candidate
    plan = Plan(c.balance, c.replicas, MICRO_BATCH, MICRO_BATCH * MICRO_BATCHES, c.memory_mb, problem.sync)
    st = costmodel.stage_costs(problem.profile, problem.platform, plan)
    seconds = costmodel.formula_iteration_s(st, problem.platform, plan)
    return seconds, costmodel.cost_per_iteration(seconds, st, plan, problem.platform)


def check(problem: Problem) -> bool:
    """The program's optimum for time, cost and cost under a deadline equals the enumeration's."""
    values = every_value(problem)
    if not values:
        assert dp.optimum(problem, "time") is None
        return False
    times = sorted(s for s, _ in values)
    deadline = times[len(times) // 4]  # a deadline a quarter of the plans meet (one exactly)
    expected = {
        ("time", None): min(s for s, _ in values),
        ("cost", None): min(c for _, c in values),
        ("cost", deadline): min(c for s, c in values if s <= deadline),
    }
    for (objective, limit), best in expected.items():
        found = dp.optimum(problem, objective, deadline_s=limit)
        assert found is not None
        seconds, dollars = formula(problem, found)
        assert found.value == (seconds if objective == "time" else dollars)
        assert (found.iteration_s, found.cost_usd) == (seconds, dollars)
        assert found.value == pytest.approx(best, rel=1e-9), (objective, limit)
        assert found.bound == found.value
        if limit is not None:
            assert seconds <= limit
    return True


def test_equals_exhaustive_enumeration_on_random_small_profiles() -> None:
    checked = 0
    for seed in range(60):
        rng = random.Random(seed)
        profile, platform = random_profile(rng), random_platform(rng)
        sync = "four_phase" if seed % 3 == 0 else "pipelined"
        problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 3, sync)
        checked += check(problem)
    assert checked >= 30


def eight_tiers(rng: random.Random) -> Platform:
    base = random_platform(rng)
    tiers = tuple(
        Tier(mb, mb / 1769, min(1.0, mb / 1769) + 0.5 * max(0.0, mb / 1769 - 1), bandwidth, bandwidth)
        for mb, bandwidth in zip((512, 1024, 1536, 2048, 3072, 4096, 6144, 8192), (20, 20, 70, 70, 70, 300, 300, 300),
                                 strict=True)
    )
    return dataclasses.replace(base, tiers=tiers)


@pytest.mark.parametrize("seed", [1, 2])
def test_equals_exhaustive_enumeration_on_a_medium_profile(seed: int) -> None:
    """9 layers, 8 tiers with three link speeds, up to 3 stages and 2 replicas (about 10**5 plans)."""
    rng = random.Random(seed)
    profile = random_profile(rng)
    while profile.num_layers < 8:
        profile = random_profile(rng)
    platform = eight_tiers(rng)
    problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 2)
    assert check(problem)


def test_a_gap_gives_a_proven_bound_within_it() -> None:
    rng = random.Random(5)
    profile, platform = random_profile(rng), random_platform(rng)
    problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 3)
    exact = dp.optimum(problem, "cost")
    loose = dp.optimum(problem, "cost", gap=0.05)
    assert exact is not None and loose is not None
    assert loose.bound <= exact.value <= loose.value <= loose.bound * 1.05


def test_cp_sat_with_the_bound_stays_at_the_formula_optimum() -> None:
    """With the program's bound (less the model's rounding), CP-SAT stops within 1% of it, at
    a plan whose formula value is the optimum's within the model's resolution."""
    for seed in range(4):
        rng = random.Random(seed)
        profile, platform = random_profile(rng), random_platform(rng)
        problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 3)
        slack = rounding(problem)
        found = dp.optimum(problem, "time", memory_slack_bytes=slack.memory_slack_bytes(MICRO_BATCHES))
        if found is None:
            continue
        solution = solve(problem, Objective(1.0), hint=found.candidate, lower_bound=found.bound, time_limit_s=10)
        assert solution is not None
        assert solution.gap <= 0.01
        assert solution.iteration_s == pytest.approx(found.value, rel=2e-3)
