"""Gradient bytes that differ from activation bytes (ids, masks and sizes cross a cut forward only):
the cost model, the simulator and the planner's programs send each gradient at its own size."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

import funcpipe
from funcpipe import ConfigError, Plan, costmodel, simulate
from funcpipe.planner.model import Candidate, Objective, Problem, solve
from funcpipe.profiler import ModelProfile
from tests.test_planner import random_plans, random_platform, random_profile
from tests.test_planner_dp import MICRO_BATCH, MICRO_BATCHES, check
from tests.test_simulator import HAND, REPORT, layer, spans


def with_grads(profile: ModelProfile, rng: random.Random) -> ModelProfile:
    """``profile`` with each layer's gradient a random share of its output: none, a part, or all of it."""
    layers = tuple(
        dataclasses.replace(lp, grad_bytes_per_sample=lp.output_bytes_per_sample * rng.choice([0.0, 0.1, 0.5, 1.0]))
        for lp in profile.layers
    )
    return dataclasses.replace(profile, layers=layers)


def grad_profile(seed: int) -> tuple[ModelProfile, funcpipe.Platform]:
    rng = random.Random(seed)
    profile, platform = random_profile(rng), random_platform(rng)
    return with_grads(profile, rng), platform


# -- the profile's field ----------------------------------------------------------------------


def test_no_grad_bytes_means_the_outputs() -> None:
    lp = layer(1.0, 2.0, out=300.0)
    assert lp.grad_bytes_per_sample is None and lp.gradient_bytes_per_sample == 300.0
    assert dataclasses.replace(lp, grad_bytes_per_sample=40.0).gradient_bytes_per_sample == 40.0


@pytest.mark.parametrize("grad", [-1.0, 301.0, "10", True])
def test_grad_bytes_beyond_the_output_are_refused(grad: object) -> None:
    with pytest.raises(ConfigError, match=r"grad_bytes_per_sample must be between 0 and .*300.*got"):
        dataclasses.replace(layer(1.0, 2.0, out=300.0), grad_bytes_per_sample=grad)  # type: ignore[arg-type]


def test_grad_bytes_are_saved_only_where_set(tmp_path: Path) -> None:
    plain = ModelProfile((layer(1.0, 2.0, out=300.0), layer(1.0, 1.0)), 10.0, 8.0)
    plain.save(tmp_path / "plain.json")
    data = json.loads((tmp_path / "plain.json").read_text())
    assert all("grad_bytes_per_sample" not in lp for lp in data["layers"])  # as before: older readers take it
    assert ModelProfile.load(tmp_path / "plain.json") == plain
    mixed = dataclasses.replace(plain, layers=(dataclasses.replace(plain.layers[0], grad_bytes_per_sample=30.0),
                                               plain.layers[1]))
    mixed.save(tmp_path / "mixed.json")
    data = json.loads((tmp_path / "mixed.json").read_text())
    assert data["format"] == 2 and data["layers"][0]["grad_bytes_per_sample"] == 30.0
    assert "grad_bytes_per_sample" not in data["layers"][1]
    assert ModelProfile.load(tmp_path / "mixed.json") == mixed


# -- the cost model and the simulator ------------------------------------------------------------


def test_stage_costs_and_memory_use_the_gradient_where_it_crosses() -> None:
    # Three stages; 500 B/sample of activations after layer 0 of which 100 carry a gradient, 400 after
    # layer 1 of which none.
    layers = (dataclasses.replace(layer(1.0, 1.0, out=500.0), grad_bytes_per_sample=100.0),
              dataclasses.replace(layer(1.0, 1.0, out=400.0), grad_bytes_per_sample=0.0), layer(1.0, 1.0))
    profile = ModelProfile(layers, 50.0, 8.0)
    plan = Plan.manual([1, 1, 1], micro_batch_size=2, global_batch_size=8, memory_mb=1024)
    st = costmodel.stage_costs(profile, HAND, plan)
    assert [(s.input_bytes, s.output_bytes) for s in st] == [(100.0, 1000.0), (1000.0, 800.0), (800.0, 0.0)]
    assert [(s.input_grad_bytes, s.output_grad_bytes) for s in st] == [(0.0, 200.0), (200.0, 0.0), (0.0, 0.0)]
    # GPipe buffers n = 4 output gradients on a stage that is not the last: 4 x (1000 - 200) bytes less
    # on stage 0 than if the whole output came back.
    whole = dataclasses.replace(profile, layers=(layer(1.0, 1.0, out=500.0), *layers[1:]))
    assert (costmodel.stage_memory_bytes(whole, HAND, plan, 0) - costmodel.stage_memory_bytes(profile, HAND, plan, 0)
            == 4 * 800)


def test_two_stages_send_the_gradient_at_its_own_size() -> None:
    # tests/test_simulator.py's two stages (2e5 bytes of activations a micro-batch), of which a half
    # carries a gradient: each gradient takes 0.1 s of bytes + 0.1 s latency instead of 0.3 s.
    #   s0: input 0 [0, .2], input 1 [.2, .4]; F0 [.2, 1.2] -> act 0 up [1.2, 1.5];
    #       F1 [1.2, 2.2] -> act 1 up [2.2, 2.5]
    #   s1: act 0 [1.5, 1.8], target 0 [1.8, 2.0]; F0 [2.0, 2.5], B0 [2.5, 3.5] -> grad 0 up [3.5, 3.7]
    #       act 1 [2.5, 2.8], target 1 [2.8, 3.0]; F1 [3.5, 4.0], B1 [4.0, 5.0] -> grad 1 up [5.0, 5.2]
    #       report [5.2, 5.3+]
    #   s0: grad 0 [3.7, 3.9], B0 [3.9, 5.9]; grad 1 [5.2, 5.4], B1 [5.9, 7.9]; update at 7.9
    first = dataclasses.replace(layer(1.0, 2.0, out=2e5), grad_bytes_per_sample=1e5)
    profile = ModelProfile((first, layer(0.5, 1.0)), input_bytes_per_sample=1e5, target_bytes_per_sample=1e5)
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2, memory_mb=1024)
    sim = simulate(plan, profile, HAND)
    assert spans(sim, 0, 0, "upload") == [("act 0", 1.2, 1.5), ("act 1", 2.2, 2.5)]
    assert spans(sim, 1, 0, "upload") == [
        ("grad 0", 3.5, 3.7), ("grad 1", 5.0, 5.2), ("report", 5.2, round(5.2 + REPORT, 6)),
    ]
    assert spans(sim, 0, 0, "download") == [
        ("input 0", 0.0, 0.2), ("input 1", 0.2, 0.4), ("grad 0", 3.7, 3.9), ("grad 1", 5.2, 5.4),
    ]
    assert spans(sim, 0, 0, "compute") == [
        ("F0", 0.2, 1.2), ("F1", 1.2, 2.2), ("B0", 3.9, 5.9), ("B1", 5.9, 7.9), ("update", 7.9, 7.9),
    ]
    assert sim.iteration_s == pytest.approx(7.9)  # 8.1 with the whole activation coming back
    assert sim.formula_s <= sim.iteration_s + 1e-9


def test_no_gradient_across_the_cut_costs_only_the_latency() -> None:
    first = dataclasses.replace(layer(1.0, 2.0, out=2e5), grad_bytes_per_sample=0.0)
    profile = ModelProfile((first, layer(0.5, 1.0)), input_bytes_per_sample=1e5, target_bytes_per_sample=1e5)
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2, memory_mb=1024)
    sim = simulate(plan, profile, HAND)
    # grad 0 up [3.5, 3.6] and down [3.6, 3.7]; B0 [3.7, 5.7]; grad 1 up [5.0, 5.1], down [5.1, 5.2]; B1 [5.7, 7.7]
    assert [label for label, _, _ in spans(sim, 0, 0, "download")][2:] == ["grad 0", "grad 1"]
    assert spans(sim, 0, 0, "download")[2:] == [("grad 0", 3.6, 3.7), ("grad 1", 5.1, 5.2)]
    assert sim.iteration_s == pytest.approx(7.7)


# -- the planner's programs ------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dynamic_program_equals_enumeration_with_gradients_smaller_than_activations(schedule: str) -> None:
    """tests/test_planner_dp.py's check (every plan priced by funcpipe.costmodel) on profiles whose
    gradients differ from their activations."""
    checked = 0
    for seed in range(4):
        profile, platform = grad_profile(seed)
        problem = Problem(profile, platform, platform.tiers, MICRO_BATCH, MICRO_BATCHES, 3, 3, "pipelined", schedule)
        checked += check(problem)
    assert checked >= 2


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_cp_sat_value_of_any_plan_equals_the_formula_with_gradients(schedule: str) -> None:
    rng = random.Random(5)
    checked = 0
    for seed in range(2):
        profile, platform = grad_profile(seed)
        problem = Problem(profile, platform, platform.tiers, 2, 8, 3, 3, ("pipelined", "four_phase"), schedule)
        for plan in random_plans(rng, profile, platform, micro_batch_size=2, global_batch_size=16,
                                 schedule=schedule, count=5):
            assert plan.memory_mb is not None
            sync = tuple(plan.stage_sync(s) for s in range(plan.num_stages))
            solution = solve(problem, Objective(1.0), fix=Candidate(plan.balance, plan.memory_mb, plan.replicas, sync),
                             time_limit_s=10)
            assert solution is not None, plan
            formula = costmodel.formula_iteration_s(costmodel.stage_costs(profile, platform, plan), platform, plan,
                                                    windows=False)
            assert solution.iteration_s == pytest.approx(formula, rel=1e-3), plan
            checked += 1
    assert checked >= 6


def test_the_planned_time_is_the_simulated_one_and_the_gradients_count() -> None:
    """funcpipe.plan on a profile whose cuts carry little or no gradient: its predicted iteration is
    the simulator's of that plan, which is never above the same plan's with whole activations coming back."""
    for seed in range(3):
        profile, platform = grad_profile(seed)
        plan = funcpipe.plan(profile, platform, global_batch_size=16, max_stages=3, max_replicas=2)
        sim = simulate(plan, profile, platform)
        assert plan.predicted_iteration_s == pytest.approx(sim.iteration_s)
        assert plan.predicted_cost_usd == pytest.approx(sim.cost_usd)
        if plan.num_stages > 1:
            whole = dataclasses.replace(profile, layers=tuple(dataclasses.replace(lp, grad_bytes_per_sample=None)
                                                              for lp in profile.layers))
            cut = [plan.layer_range(s).stop - 1 for s in range(plan.num_stages - 1)]
            if any(profile.layers[i].gradient_bytes_per_sample < profile.layers[i].output_bytes_per_sample
                   for i in cut):
                assert simulate(plan, whole, platform).iteration_s >= sim.iteration_s
