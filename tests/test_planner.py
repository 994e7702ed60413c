"""The planner against exhaustive search, its formula against the simulator, and its errors."""

from __future__ import annotations

import itertools
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
import torch
from torch import nn

import funcpipe
from funcpipe import ConfigError, Plan, PlanInfeasible, Trainer, costmodel, simulate
from funcpipe.planner.model import Candidate, Objective, Problem, solve
from funcpipe.platforms import Platform, Tier
from funcpipe.profiler import LayerProfile, ModelProfile
from tests.helpers import assert_same_parameters, plain_training, regression_batches

PROFILES = 30
GLOBAL_BATCH, MICRO_BATCH = 16, 2  # 8 micro-batches
MAX_STAGES = MAX_REPLICAS = 3


def random_platform(rng: random.Random) -> Platform:
    """Three tiers whose speed grows with memory (Lambda's rule), a random link and latency."""
    bandwidth = rng.choice([20.0, 70.0, 300.0])
    tiers = tuple(
        Tier(mb, mb / 1769, min(1.0, mb / 1769) + 0.5 * max(0.0, mb / 1769 - 1), bandwidth, bandwidth)
        for mb in (1024, 2048, 4096)
    )
    return Platform("random", tiers, rng.choice([0.002, 0.03, 0.08]), 0.0000166667, 0.0, 2e-7, 5e-6, 4e-7,
                    900.0, 300, 2**20, "s3")


def random_profile(rng: random.Random) -> ModelProfile:
    """3 to 8 layers; parameters up to 600 MB, so memory rules out many plans."""
    layers = []
    for i in range(rng.randint(3, 8)):
        params = rng.choice([0, rng.randint(10**6, 6 * 10**8)])
        layers.append(LayerProfile(
            name=f"layer{i}", forward_alpha_s=rng.uniform(0, 0.005), forward_beta_s=rng.uniform(0.001, 0.03),
            backward_alpha_s=rng.uniform(0, 0.01), backward_beta_s=rng.uniform(0.002, 0.06),
            param_bytes=params, optimizer_bytes=2 * params, update_s=params / 4e9,
            output_bytes_per_sample=rng.uniform(1e3, 3e6), held_bytes_per_sample=rng.uniform(1e4, 3e7),
        ))
    return ModelProfile(tuple(layers), rng.uniform(1e3, 1e6), 8.0)


def every_plan(profile: ModelProfile, platform: Platform) -> list[funcpipe.Simulation]:
    """Simulate every plan of at most 3 stages, 3 replicas per stage and any tiers (that fits)."""
    sims = []
    memories = [t.memory_mb for t in platform.tiers]
    for stages in range(1, MAX_STAGES + 1):
        for cuts in itertools.combinations(range(1, profile.num_layers), stages - 1):
            bounds = [0, *cuts, profile.num_layers]
            balance = tuple(b - a for a, b in itertools.pairwise(bounds))
            for memory in itertools.product(memories, repeat=stages):
                for replicas in itertools.product(range(1, MAX_REPLICAS + 1), repeat=stages):
                    plan = Plan(balance, replicas, MICRO_BATCH, GLOBAL_BATCH, memory)
                    try:
                        sims.append(simulate(plan, profile, platform))
                    except PlanInfeasible:
                        continue
    return sims


def check_one(seed: int) -> dict[str, Any] | None:
    """Exhaustive search and the planner on one random case (runs in a worker process)."""
    rng = random.Random(seed)
    profile, platform = random_profile(rng), random_platform(rng)
    sims = every_plan(profile, platform)
    if not sims:
        return None
    times = sorted(s.iteration_s for s in sims)
    deadline = times[len(times) // 4]  # a deadline a quarter of the plans meet

    def planned(**kwargs: Any) -> Plan:
        return funcpipe.plan(profile, platform, global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO_BATCH,
                             max_stages=MAX_STAGES, max_replicas=MAX_REPLICAS, **kwargs)

    by_formula = min(sims, key=lambda s: s.formula_s)
    return {
        "seed": seed,
        "plans": len(sims),
        "errors": [s.formula_s / s.iteration_s - 1 for s in sims],
        "best_time": times[0],
        "best_cost": min(s.cost_usd for s in sims),
        "best_cost_by_deadline": min(s.cost_usd for s in sims if s.iteration_s <= deadline),
        "deadline": deadline,
        "formula_choice_time": by_formula.iteration_s,
        "time": planned().predicted_iteration_s,
        "time_without_rerank": planned(candidates=1).predicted_iteration_s,
        "cost": planned(objective="cost").predicted_cost_usd,
        "deadline_plan": (lambda p: (p.predicted_iteration_s, p.predicted_cost_usd))(
            planned(objective="cost", deadline_s=deadline)
        ),
    }


@pytest.fixture(scope="module")
def exhaustive() -> list[dict[str, Any]]:
    """30 random cases with at least one plan that fits, checked in two processes."""
    results: list[dict[str, Any]] = []
    seeds = iter(range(1000))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        while len(results) < PROFILES:
            batch = [next(seeds) for _ in range(PROFILES - len(results) + 4)]
            results += [r for r in pool.map(check_one, batch) if r is not None]
    return results[:PROFILES]


def test_plan_is_within_2_percent_of_exhaustive_search(exhaustive: list[dict[str, Any]]) -> None:
    assert len(exhaustive) == PROFILES
    for case in exhaustive:
        assert case["time"] <= case["best_time"] * 1.02, case["seed"]
        assert case["cost"] <= case["best_cost"] * 1.02, case["seed"]
        seconds, dollars = case["deadline_plan"]
        assert seconds <= case["deadline"], case["seed"]
        assert dollars <= case["best_cost_by_deadline"] * 1.02, case["seed"]


def test_formula_agrees_with_the_simulator(exhaustive: list[dict[str, Any]]) -> None:
    """The closed formula is within 5% of the replay on most plans, and within 15% on all.

    What it misses is mostly replicas interleaving their micro-batches (the
    busiest replica is not always the one that holds the last micro-batch);
    :func:`test_reranking_catches_what_the_formula_misses` shows the planner
    repairing that with the simulator.
    """
    errors = [e for case in exhaustive for e in case["errors"]]
    within = sum(abs(e) <= 0.05 for e in errors) / len(errors)
    assert within >= 0.8, f"only {within:.0%} of {len(errors)} plans within 5%"
    assert max(abs(e) for e in errors) <= 0.15


def test_reranking_catches_what_the_formula_misses(exhaustive: list[dict[str, Any]]) -> None:
    # Cases where the plan the formula ranks first is > 2% slower in the replay than the best.
    missed = [c for c in exhaustive if c["formula_choice_time"] > c["best_time"] * 1.02]
    assert missed, "the formula ranked every case right; this test would show nothing"
    for case in missed:
        assert case["time"] <= case["best_time"] * 1.02, case["seed"]
    # Among these 30 CP-SAT's own optimum is often already good (formula ties, and the
    # simulator-checked downgrade pass); case 99 is one where only the re-ranking gets there.
    case = check_one(99)
    assert case is not None
    assert case["time_without_rerank"] > case["best_time"] * 1.02
    assert case["time"] <= case["best_time"] * 1.02


def test_solver_optimum_equals_the_python_formula() -> None:
    """CP-SAT's iteration time for its own optimum is the formula of funcpipe.costmodel."""
    for seed in range(5):
        rng = random.Random(seed)
        profile, platform = random_profile(rng), random_platform(rng)
        problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, GLOBAL_BATCH // MICRO_BATCH, 3, 3)
        for weight in (1.0, 0.0):
            solution = solve(problem, Objective(weight), time_limit_s=20)
            if solution is None:
                continue
            c = solution.candidate
            plan = Plan(c.balance, c.replicas, MICRO_BATCH, GLOBAL_BATCH, c.memory_mb)
            stages = costmodel.stage_costs(profile, platform, plan)
            formula = costmodel.formula_iteration_s(stages, platform, plan)
            assert solution.iteration_s == pytest.approx(formula, rel=1e-3)
            if weight == 0.0:
                assert solution.cost_usd == pytest.approx(
                    costmodel.cost_per_iteration(formula, stages, plan, platform), rel=1e-2
                )


def test_solver_value_of_any_plan_equals_the_python_formula() -> None:
    """For plans fixed in the model (not only its optimum): no constraint, redundant bounds
    included, pushes the solver's iteration time above the formula or lets it fall below."""
    rng = random.Random(11)
    checked = 0
    for seed in range(4):
        profile, platform = random_profile(random.Random(seed)), random_platform(random.Random(seed))
        problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, GLOBAL_BATCH // MICRO_BATCH, 3, 3)
        sims = every_plan(profile, platform)
        for sim in rng.sample(sims, min(15, len(sims))):
            plan = sim.plan
            assert plan.memory_mb is not None
            candidate = Candidate(plan.balance, plan.memory_mb, plan.replicas)
            solution = solve(problem, Objective(1.0), fix=candidate, time_limit_s=10)
            assert solution is not None, plan
            assert solution.iteration_s == pytest.approx(sim.formula_s, rel=1e-3), plan
            checked += 1
    assert checked >= 30


def small_case() -> tuple[ModelProfile, Platform]:
    rng = random.Random(3)
    return random_profile(rng), random_platform(rng)


def test_plan_carries_predictions_and_solver_status() -> None:
    profile, platform = small_case()
    plan = funcpipe.plan(profile, platform, global_batch_size=16, micro_batch_size=2, max_stages=3,
                         max_replicas=3)
    sim = simulate(plan, profile, platform)
    assert plan.predicted_iteration_s == pytest.approx(sim.iteration_s)
    assert plan.predicted_cost_usd == pytest.approx(sim.cost_usd)
    assert plan.solver_status in ("optimal", "feasible") and plan.solver_gap is not None
    assert plan.solve_s is not None and plan.solve_s > 0
    assert plan.platform == "random"
    assert Plan.from_dict(plan.to_dict()) == plan
    assert str(plan).startswith("Plan for random:") and "predicted per iteration:" in str(plan)
    assert plan.predicted_stages == sim.stages


def test_when_cp_sat_finds_nothing_in_time_the_starting_plan_is_returned_unproven(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """CP-SAT on a loaded machine can time out before it reads its hint back: the plan it was to
    start from (the dynamic program's or the heuristic's) is returned, marked unproven."""
    import funcpipe.planner as planner

    def times_out(*args: Any, fix: Candidate | None = None, **kwargs: Any) -> Any:
        if fix is None:
            raise funcpipe.PlanTimeout("CP-SAT found no plan within time_limit_s=0.1 (status UNKNOWN)")
        return solve(*args, fix=fix, **kwargs)

    profile, platform = small_case()
    expected = funcpipe.plan(profile, platform, global_batch_size=16, micro_batch_size=2, max_stages=3,
                             max_replicas=3, objective="time")
    monkeypatch.setattr(planner, "solve", times_out)
    found = funcpipe.plan(profile, platform, global_batch_size=16, micro_batch_size=2, max_stages=3,
                          max_replicas=3, objective="time")
    assert (found.solver_status, found.solver_gap) == ("feasible", 1.0)
    assert "CP-SAT found no plan within" in caplog.text
    # The dynamic program's plan is exact for time on this small case: as good as the real solve's.
    assert found.predicted_iteration_s == pytest.approx(expected.predicted_iteration_s, rel=0.01)
    assert found.predicted_iteration_s == pytest.approx(simulate(found, profile, platform).iteration_s)
    # A deadline the starting plan breaks: no plan to give, the timeout stands.
    with pytest.raises(funcpipe.PlanTimeout):
        funcpipe.plan(profile, platform, global_batch_size=16, micro_batch_size=2, max_stages=3,
                      max_replicas=3, objective="cost", deadline_s=expected.predicted_iteration_s * 0.5)


def test_objective_weight_lies_between_time_and_cost() -> None:
    profile, platform = small_case()
    kwargs: dict[str, Any] = {"global_batch_size": 16, "micro_batch_size": 2, "max_stages": 3, "max_replicas": 3}
    fastest = funcpipe.plan(profile, platform, objective="time", **kwargs)
    cheapest = funcpipe.plan(profile, platform, objective="cost", **kwargs)
    middle = funcpipe.plan(profile, platform, objective=0.5, **kwargs)
    assert fastest.predicted_iteration_s is not None and cheapest.predicted_cost_usd is not None
    assert middle.predicted_iteration_s is not None and middle.predicted_cost_usd is not None
    assert fastest.predicted_iteration_s <= middle.predicted_iteration_s * 1.02
    assert cheapest.predicted_cost_usd <= middle.predicted_cost_usd * 1.02
    assert funcpipe.plan(profile, platform, objective=1.0, **kwargs) == fastest
    assert funcpipe.plan(profile, platform, objective=0.0, **kwargs) == cheapest


def test_pareto_frontier() -> None:
    profile, platform = small_case()
    frontier = funcpipe.pareto(profile, platform, global_batch_size=16, micro_batch_size=2, max_stages=3,
                               max_replicas=3, points=6)
    assert len(frontier) >= 2
    times = [p.predicted_iteration_s for p in frontier]
    costs = [p.predicted_cost_usd for p in frontier]
    assert all(t is not None for t in times) and all(c is not None for c in costs)
    assert times == sorted(times)  # type: ignore[type-var]
    assert costs == sorted(costs, reverse=True)  # type: ignore[type-var]  # non-dominated: faster costs more
    sims = every_plan(profile, platform)
    assert times[0] <= min(s.iteration_s for s in sims) * 1.02  # type: ignore[operator]
    assert costs[-1] <= min(s.cost_usd for s in sims) * 1.02  # type: ignore[operator]


def test_deadline_and_budget() -> None:
    profile, platform = small_case()
    kwargs: dict[str, Any] = {"global_batch_size": 16, "micro_batch_size": 2, "max_stages": 3, "max_replicas": 3}
    fastest = funcpipe.plan(profile, platform, **kwargs)
    assert fastest.predicted_iteration_s is not None
    with pytest.raises(PlanInfeasible, match=r"no plan meets deadline_s=.*fastest plan takes .* hint"):
        funcpipe.plan(profile, platform, objective="cost", deadline_s=fastest.predicted_iteration_s / 2, **kwargs)
    cheapest = funcpipe.plan(profile, platform, objective="cost", **kwargs)
    assert cheapest.predicted_cost_usd is not None
    budgeted = funcpipe.plan(profile, platform, budget_usd=cheapest.predicted_cost_usd * 1.5, **kwargs)
    assert budgeted.predicted_cost_usd is not None
    assert budgeted.predicted_cost_usd <= cheapest.predicted_cost_usd * 1.5
    with pytest.raises(PlanInfeasible, match=r"no plan meets budget_usd=.*cheapest plan costs"):
        funcpipe.plan(profile, platform, budget_usd=cheapest.predicted_cost_usd / 10, **kwargs)


def test_memory_mb_restricts_the_tiers() -> None:
    profile, platform = small_case()
    plan = funcpipe.plan(profile, platform, global_batch_size=16, micro_batch_size=2, memory_mb=4096)
    assert set(plan.memory_mb or ()) == {4096}


class TestBadInput:
    profile = ModelProfile((LayerProfile("a", 0, 0.01, 0, 0.02, 1000, 2000, 0.0, 100.0, 100.0),), 10.0, 8.0)

    def test_layer_larger_than_every_tier(self) -> None:
        huge = LayerProfile("giant", 0, 0.01, 0, 0.02, 8 * 2**30, 16 * 2**30, 0.0, 100.0, 100.0)
        profile = ModelProfile((self.profile.layers[0], huge), 10.0, 8.0)
        with pytest.raises(PlanInfeasible, match=r"layer 1 \('giant'\) needs \d+ bytes .* largest tier .*10240 MB"):
            funcpipe.plan(profile, "aws_lambda", global_batch_size=8, micro_batch_size=2)

    def test_global_batch_not_a_multiple(self) -> None:
        with pytest.raises(ConfigError, match="global_batch_size 10 is not a multiple of micro_batch_size 4"):
            funcpipe.plan(self.profile, "aws_lambda", global_batch_size=10, micro_batch_size=4)

    def test_unknown_platform(self) -> None:
        with pytest.raises(ConfigError, match="aws_lamda"):
            funcpipe.plan(self.profile, "aws_lamda", global_batch_size=8, micro_batch_size=2)

    def test_not_a_profile(self) -> None:
        with pytest.raises(ConfigError, match="profile must be a funcpipe ModelProfile, got Sequential"):
            funcpipe.plan(nn.Sequential(nn.Linear(2, 2)), "aws_lambda",  # type: ignore[arg-type]
                          global_batch_size=8, micro_batch_size=2)

    def test_empty_model(self) -> None:
        with pytest.raises(ConfigError, match="empty"):
            ModelProfile((), 10.0, 8.0)

    @pytest.mark.parametrize(("kwargs", "match"), [
        ({"objective": "speed"}, "objective must be 'time', 'cost' or a weight"),
        ({"objective": 1.5}, "objective must be"),
        ({"deadline_s": -1.0}, "deadline_s must be a positive number, got -1.0"),
        ({"max_stages": 0}, "max_stages must be a positive integer, got 0"),
        ({"memory_mb": 3000}, "no tier of 3000 MB"),
        ({"time_limit_s": 0}, "time_limit_s must be a positive number"),
    ])
    def test_malformed_arguments(self, kwargs: dict[str, Any], match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            funcpipe.plan(self.profile, "aws_lambda", global_batch_size=8, micro_batch_size=2, **kwargs)


def wide_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
        nn.Linear(512, 3),
    )


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_a_planned_plan_trains_like_plain_pytorch() -> None:
    """The equivalence of the first issue, with a plan made by funcpipe.plan from a real profile."""
    model = wide_mlp()
    batches = regression_batches(3, 16)
    x, y = batches[0]
    # SGD with momentum: on layers this wide, Adam turns float summation-order differences of
    # near-zero gradients into lr-sized steps (also with one stage), beyond the tolerance.
    sgd = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
    profile = funcpipe.profile(model, x, y, nn.functional.mse_loss, micro_batch_sizes=(1, 2, 4), rounds=2,
                               warmup=1, optimizer=sgd, progress=False)
    # Functions of 3 and 6 MB with no runtime: a 512x512 layer with SGD momentum needs 3.2 MB
    # (weights, gradients, momentum), so no function holds two of them and the plan must cut
    # the model into stages.
    tiny = funcpipe.platforms.get("local", runtime_overhead_mb=0, tiers=[
        {"memory_mb": 3, "vcpus": 1.0, "speed": 1.0, "uplink_mb_s": 10.0, "downlink_mb_s": 10.0},
        {"memory_mb": 6, "vcpus": 1.0, "speed": 1.0, "uplink_mb_s": 10.0, "downlink_mb_s": 10.0},
    ])
    plan = funcpipe.plan(profile, tiny, global_batch_size=16, micro_batch_size=4, max_stages=4,
                         time_limit_s=10)
    assert plan.num_stages >= 2
    expected = plain_training(model, nn.functional.mse_loss, sgd, batches)
    trainer = Trainer(model, nn.functional.mse_loss, sgd, plan)
    trainer.fit(batches, progress=False)
    assert_same_parameters(trainer.model, expected)


def test_no_plan_within_the_time_limit_gives_the_starting_plan_unproven() -> None:
    """CP-SAT needs seconds of presolve on 100 layers: a 0.05 s limit finds nothing, and the plan
    it was to start from is given instead, marked unproven."""
    from benchmarks.planner import synthetic_profile

    profile = synthetic_profile(100)
    found = funcpipe.plan(profile, "aws_lambda", global_batch_size=64, micro_batch_size=4, memory_mb=1024,
                          time_limit_s=0.05)
    assert (found.solver_status, found.solver_gap) == ("feasible", 1.0)
    assert found.predicted_iteration_s == pytest.approx(simulate(found, profile, "aws_lambda").iteration_s)
    assert found.memory_mb is not None and set(found.memory_mb) == {1024}


