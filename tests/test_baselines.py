"""The baselines: LambdaML (either all-reduce), one function, the original FuncPipe; each its own best."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch import nn

import funcpipe
from funcpipe import PlanInfeasible, Trainer, simulate
from funcpipe.baselines import BASELINES, funcpipe_original, lambdaml, lambdaml_pipelined, one_function
from funcpipe.plans import Plan
from funcpipe.profiler import LayerProfile, ModelProfile
from tests.helpers import assert_same_parameters, mlp7, plain_training, regression_batches
from tests.test_planner import random_platform, random_profile

GLOBAL_BATCH = 16


def every_data_parallel_plan(profile: ModelProfile, platform: funcpipe.platforms.Platform) -> list[funcpipe.Simulation]:
    """Every worker count that splits the batch, on every tier the simulator accepts."""
    sims = []
    for d in (1, 2, 4, 8, 16):
        for tier in platform.tiers:
            plan = Plan((profile.num_layers,), (d,), GLOBAL_BATCH // d, GLOBAL_BATCH, (tier.memory_mb,), "four_phase")
            try:
                sims.append(simulate(plan, profile, platform))
            except PlanInfeasible:
                continue
    return sims


@pytest.mark.parametrize("seed", range(8))
def test_lambdaml_is_the_best_data_parallel_configuration(seed: int) -> None:
    rng = random.Random(seed)
    platform, profile = random_platform(rng), random_profile(rng)
    sims = every_data_parallel_plan(profile, platform)
    if not sims:
        with pytest.raises(PlanInfeasible, match="LambdaML cannot train"):
            lambdaml(profile, platform, global_batch_size=GLOBAL_BATCH)
        return
    fastest = lambdaml(profile, platform, global_batch_size=GLOBAL_BATCH, objective="time")
    cheapest = lambdaml(profile, platform, global_batch_size=GLOBAL_BATCH, objective="cost")
    for plan in (fastest, cheapest):
        assert plan.num_stages == 1 and plan.sync == "four_phase"
        assert plan.micro_batch_size * plan.replicas[0] == GLOBAL_BATCH  # one pass per worker
    assert fastest.predicted_iteration_s == pytest.approx(min(s.iteration_s for s in sims), rel=1e-12)
    assert cheapest.predicted_cost_usd == pytest.approx(min(s.cost_usd for s in sims), rel=1e-12)
    # A deadline between the two: the cheapest configuration that meets it.
    deadline = (fastest.predicted_iteration_s + cheapest.predicted_iteration_s) / 2
    bounded = lambdaml(profile, platform, global_batch_size=GLOBAL_BATCH, objective="cost", deadline_s=deadline)
    meeting = [s for s in sims if s.iteration_s <= deadline]
    assert bounded.predicted_iteration_s <= deadline
    assert bounded.predicted_cost_usd == pytest.approx(min(s.cost_usd for s in meeting), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_lambdaml_pipelined_is_the_best_data_parallel_configuration_with_the_pipelined_sync(seed: int) -> None:
    rng = random.Random(seed)
    platform, profile = random_platform(rng), random_profile(rng)
    sims = [simulate(dataclasses.replace(s.plan, sync="pipelined"), profile, platform)
            for s in every_data_parallel_plan(profile, platform)]
    if not sims:
        return
    fastest = lambdaml_pipelined(profile, platform, global_batch_size=GLOBAL_BATCH, objective="time")
    assert fastest.sync == "pipelined" and fastest.num_stages == 1
    assert fastest.predicted_iteration_s == pytest.approx(min(s.iteration_s for s in sims), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_one_function_is_the_best_accumulation_over_every_micro_batch_size_and_tier(seed: int) -> None:
    rng = random.Random(seed)
    platform, profile = random_platform(rng), random_profile(rng)
    sims = []
    for b in (1, 2, 4, 8, 16):
        for tier in platform.tiers:
            plan = Plan((profile.num_layers,), (1,), b, GLOBAL_BATCH, (tier.memory_mb,), schedule="1f1b")
            try:
                sims.append(simulate(plan, profile, platform))
            except PlanInfeasible:
                continue
    if not sims:
        with pytest.raises(PlanInfeasible, match="one function cannot train"):
            one_function(profile, platform, global_batch_size=GLOBAL_BATCH)
        return
    for objective, best in (("time", min(s.iteration_s for s in sims)), ("cost", min(s.cost_usd for s in sims))):
        plan = one_function(profile, platform, global_batch_size=GLOBAL_BATCH, objective=objective)
        assert plan.replicas == (1,) and plan.schedule == "1f1b"
        got = plan.predicted_iteration_s if objective == "time" else plan.predicted_cost_usd
        assert got == pytest.approx(best, rel=1e-12)


def test_funcpipe_original_runs_the_papers_configuration_and_no_better_plan_of_it_exists() -> None:
    rng = random.Random(3)
    platform, profile = random_platform(rng), random_profile(rng)
    plan = funcpipe_original(profile, platform, global_batch_size=GLOBAL_BATCH, objective="time", time_limit_s=10)
    assert (plan.micro_batch_size, plan.schedule, plan.sync) == (4, "gpipe", "four_phase")
    assert plan.predicted_iteration_s == pytest.approx(simulate(plan, profile, platform).iteration_s)
    # No other cut at that configuration on the plan's own tiers and replicas is faster by the simulator
    # (an independent enumeration of the two-stage cuts, where the plan has two stages or fewer).
    if plan.num_stages == 1:
        for cut in range(1, profile.num_layers):
            rival = Plan((cut, profile.num_layers - cut), (plan.replicas[0],) * 2, 4, GLOBAL_BATCH, None,
                         "four_phase", "gpipe")
            try:
                sim = simulate(rival, profile, platform)
            except PlanInfeasible:
                continue
            assert plan.predicted_iteration_s <= sim.iteration_s * 1.01
    assert set(BASELINES) == {"lambdaml", "lambdaml_pipelined", "one_function", "funcpipe_original"}


def test_a_model_no_function_holds_is_refused_with_its_size() -> None:
    huge = LayerProfile(name="embedding", forward_alpha_s=0.0, forward_beta_s=0.01, backward_alpha_s=0.0,
                        backward_beta_s=0.02, param_bytes=4 * 2**30, optimizer_bytes=8 * 2**30, update_s=0.1,
                        output_bytes_per_sample=1e3, held_bytes_per_sample=1e4)
    profile = ModelProfile((huge,), input_bytes_per_sample=1e3, target_bytes_per_sample=8)
    with pytest.raises(PlanInfeasible, match=r"LambdaML cannot train this model on aws_lambda.*\d+ MB.*10240 MB"):
        lambdaml(profile, "aws_lambda", global_batch_size=64)
    # funcpipe cannot either (one layer is larger than a function), but says which layer.
    with pytest.raises(PlanInfeasible, match="layer 0"):
        funcpipe.plan(profile, "aws_lambda", global_batch_size=64, micro_batch_size=4)


def test_limits_and_bad_input() -> None:
    layer = LayerProfile(name="dense", forward_alpha_s=0.001, forward_beta_s=0.01, backward_alpha_s=0.001,
                         backward_beta_s=0.02, param_bytes=20 * 2**20, optimizer_bytes=40 * 2**20, update_s=0.01,
                         output_bytes_per_sample=1e5, held_bytes_per_sample=1e6)
    profile = ModelProfile((layer,) * 4, input_bytes_per_sample=1e5, target_bytes_per_sample=8)
    platform = random_platform(random.Random(0))
    small = platform.tiers[0].memory_mb
    plan = lambdaml(profile, platform, global_batch_size=GLOBAL_BATCH, memory_mb=small, max_workers=4)
    assert plan.memory_mb == (small,) and plan.replicas[0] <= 4
    with pytest.raises(PlanInfeasible, match="deadline_s=1e-09"):
        lambdaml(profile, platform, global_batch_size=GLOBAL_BATCH, memory_mb=platform.tiers[-1].memory_mb,
                 deadline_s=1e-9)
    with pytest.raises(funcpipe.ConfigError, match="max_workers"):
        lambdaml(profile, platform, global_batch_size=GLOBAL_BATCH, max_workers=0)
    with pytest.raises(funcpipe.ConfigError, match="objective"):
        lambdaml(profile, platform, global_batch_size=GLOBAL_BATCH, objective="fast")


def test_the_baseline_plan_trains_like_plain_pytorch() -> None:
    model = mlp7()
    batches = regression_batches(3, GLOBAL_BATCH)
    x, y = batches[0]
    sgd = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
    profile = funcpipe.profile(model, x, y, nn.functional.mse_loss, rounds=2, warmup=1, optimizer=sgd,
                               progress=False)
    plan = lambdaml(profile, "local", global_batch_size=GLOBAL_BATCH, max_workers=4)
    assert plan.replicas[0] in (1, 2, 4)
    expected = plain_training(model, nn.functional.mse_loss, sgd, batches)
    trainer = Trainer(model, nn.functional.mse_loss, sgd, plan)
    trainer.fit(batches, progress=False)
    assert_same_parameters(trainer.model, expected)
