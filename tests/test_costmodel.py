"""The cost model's closed formulas against values worked out by hand."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest

from funcpipe import Plan, PlanInfeasible, costmodel, simulate
from funcpipe.platforms import Tier
from funcpipe.profiler import ModelProfile
from tests.test_simulator import HAND, STALLING, layer, random_job

LINK = Tier(memory_mb=1024, vcpus=1.0, speed=1.0, uplink_mb_s=100.0, downlink_mb_s=100.0)  # 10**8 bytes/s
P = 64 * 2**20


def test_pipelined_sync_counts_pieces() -> None:
    # Two replicas: chunks of 32 MiB in 8 pieces of 4 MiB, each u = 4 MiB / 1e8 + 0.01 s up and
    # as long down. A replica uploads its 8 chunk pieces, then its 8 merged pieces, back to back
    # (each merged piece's chunk from the peer is down long before): 16 u; then the peer fetches
    # its last merged piece: one more. The downlink (16 pieces, 0.67 s) is never the limit.
    u = 4 * 2**20 / 1e8 + 0.01
    assert costmodel.sync_s(P, 2, LINK, 0.01, "pipelined") == pytest.approx(17 * u)
    # The simulator agrees: a stage of two replicas, one micro-batch each, P bytes of parameters.
    platform = HAND.replace(tiers=(LINK,), latency_s=0.01)
    profile = ModelProfile((layer(1.0, 2.0, params=P),), input_bytes_per_sample=0.0, target_bytes_per_sample=0.0)
    sim = simulate(Plan.manual([1], replicas=[2], micro_batch_size=1, global_batch_size=2, memory_mb=1024),
                   profile, platform)
    assert sim.stages[0].sync_s == pytest.approx(17 * u)


def test_four_phase_sync_is_four_phases() -> None:
    chunk = P / 2 / 1e8 + 0.01  # one 32 MiB chunk, either way
    assert costmodel.sync_s(P, 2, LINK, 0.01, "four_phase") == pytest.approx(4 * chunk)


def test_no_sync_without_replicas_or_parameters() -> None:
    assert costmodel.sync_s(P, 1, LINK, 0.01, "pipelined") == 0.0
    assert costmodel.sync_s(0, 4, LINK, 0.01, "pipelined") == 0.0


MB = 2**20


def test_memory_of_a_replica() -> None:
    # 100 MB runtime; 2 x 10 MB weights and gradients; 20 MB optimizer state; the workspace,
    # 10 + 20 MB (the checkpoint's weights and state), and 1 MB (one micro-batch's held
    # tensors: a layer's transients); the all-reduce's buffers (replicas): one chunk, 10 / 2 MB,
    # and the pieces in flight, 6 x 4 MB; 3 micro-batches of 1 MB held + 0.5 MB output; 4 inputs of 0.25 MB, one
    # output gradient of 0.5 MB, 2 targets of 0.125 MB.
    counts = costmodel.Held(activations=3, inputs=4, grads=1, targets=2)
    needed = costmodel.memory_bytes(
        HAND, param_bytes=10 * MB, optimizer_bytes=20 * MB, held_bytes=MB, input_bytes=MB / 4,
        output_bytes=MB / 2, target_bytes=MB / 8, replicas=2, counts=counts,
    )
    assert needed == ((100 + 20 + 20 + 30 + 1 + 5 + 24) * MB + 3 * (MB + MB // 2) + 4 * MB // 4 + MB // 2
                      + 2 * MB // 8)
    # One replica: no all-reduce buffers.
    alone = costmodel.memory_bytes(
        HAND, param_bytes=10 * MB, optimizer_bytes=20 * MB, held_bytes=MB, input_bytes=MB / 4,
        output_bytes=MB / 2, target_bytes=MB / 8, replicas=1, counts=counts,
    )
    assert needed - alone == (5 + 24) * MB
    # Four replicas: a quarter of the gradient in flight; not the 2 x 10 MB of a separate flat and result.
    four = costmodel.memory_bytes(
        HAND, param_bytes=10 * MB, optimizer_bytes=20 * MB, held_bytes=MB, input_bytes=MB / 4,
        output_bytes=MB / 2, target_bytes=MB / 8, replicas=4, counts=counts,
    )
    assert four - alone == math.ceil(10 * MB / 4) + 24 * MB


def test_memory_terms_over_arrays_of_replicas() -> None:
    """The DP planner evaluates it over arrays of replica counts: each entry as if alone."""
    base = {"param_bytes": 12.0 * MB, "optimizer_bytes": 5.0, "held_bytes": 7.0, "input_bytes": 11.0,
            "output_bytes": 13.0, "target_bytes": 17.0, "activations": 2, "inputs": 3, "grads": 1, "targets": 0}
    replicas = np.array([1.0, 2.0, 3.0, 4.0])
    together = costmodel.memory_terms(HAND, **base, replicas=replicas)
    alone = [costmodel.memory_terms(HAND, **base, replicas=int(d)) for d in replicas]
    assert together.tolist() == pytest.approx(alone)
    assert together[1] - together[0] == pytest.approx(6 * MB + 24 * MB)


def test_memory_terms_are_linear_in_each_count() -> None:
    """The planner's programs rely on it: one more of a count adds its bytes, whatever the others."""
    base = {"param_bytes": 3.0, "optimizer_bytes": 5.0, "held_bytes": 7.0, "input_bytes": 11.0,
            "output_bytes": 13.0, "target_bytes": 17.0, "replicas": 1}
    counts = {"activations": 2, "inputs": 3, "grads": 1, "targets": 0}
    each = {"activations": 7.0 + 13.0, "inputs": 11.0, "grads": 13.0, "targets": 17.0}
    at = costmodel.memory_terms(HAND, **base, **counts)
    for name, step in each.items():
        more = costmodel.memory_terms(HAND, **base, **{**counts, name: counts[name] + 1})
        assert more - at == pytest.approx(step)


@pytest.mark.parametrize(
    ("schedule", "last", "n", "k", "expected"),
    [
        ("gpipe", False, 5, 2, costmodel.Held(5, 5, 5, 0)),  # every input and gradient prefetched
        ("gpipe", True, 5, 1, costmodel.Held(1, 5, 0, 5)),  # the last stage's backward follows its forward
        ("1f1b", False, 5, 2, costmodel.Held(2, 3, 1, 0)),  # the window, one input and gradient ahead
        ("1f1b", False, 2, 4, costmodel.Held(2, 2, 1, 0)),  # a window wider than the replica's count
        ("1f1b", True, 5, 1, costmodel.Held(1, 2, 0, 2)),
        ("1f1b", True, 1, 1, costmodel.Held(1, 1, 0, 1)),
    ],
)
def test_held_by_schedule(schedule: str, last: bool, n: int, k: int, expected: costmodel.Held) -> None:
    assert costmodel.held(schedule, last=last, micro_batches=n, in_flight=k) == expected


def test_stage_memory_of_a_plan() -> None:
    # Two stages of one layer each, micro-batches of 2, 4 micro-batches; stage 0 on 2 replicas
    # (2 micro-batches each), GPipe. Stage 0: 8 MB of weights, 16 MB of state, 1 MB held per
    # sample, inputs 0.5 MB and outputs 0.25 MB per sample. Stage 1: no parameters, 2 MB held
    # per sample, targets of 0.125 MB per sample.
    first = dataclasses.replace(layer(0.1, 0.2, params=8 * MB, out=MB / 4), optimizer_bytes=16 * MB,
                                held_bytes_per_sample=float(MB))
    second = dataclasses.replace(layer(0.1, 0.2), held_bytes_per_sample=2.0 * MB)
    profile = ModelProfile((first, second), input_bytes_per_sample=MB / 2, target_bytes_per_sample=MB / 8)
    plan = Plan.manual([1, 1], replicas=[2, 1], micro_batch_size=2, global_batch_size=8)
    # Stage 0: runtime 100, 2 x 8, 16, workspace 8 + 16 + 2 (a micro-batch's held), all-reduce
    # 8 / 2 + 24 (a chunk, the pieces in flight); 2 activations of 2 MB held + 0.5 MB output,
    # 2 inputs of 1 MB, 2 gradients of 0.5 MB.
    assert costmodel.stage_memory_bytes(profile, HAND, plan, 0) == (
        (100 + 16 + 16 + 24 + 2 + 4 + 24) * MB + 2 * (2 * MB + MB // 2) + 2 * MB + 2 * (MB // 2))
    # Stage 1 (last): runtime 100, workspace 4, one activation of 4 MB held, 4 inputs of 0.5 MB,
    # 4 targets of 0.25 MB.
    assert costmodel.stage_memory_bytes(profile, HAND, plan, 1) == (
        100 * MB + 4 * MB + 4 * MB + 4 * (MB // 2) + 4 * (MB // 4))
    # 1F1B, one replica a stage: stage 0 runs all 4 micro-batches but holds its window of 2 (the
    # stages after it, plus one): 2 activations, 3 inputs, 1 gradient; no all-reduce buffers.
    one = Plan.manual([1, 1], replicas=[1, 1], micro_batch_size=2, global_batch_size=8, schedule="1f1b")
    assert one.in_flight(0) == 2
    assert costmodel.stage_memory_bytes(profile, HAND, one, 0) == (
        (100 + 16 + 16 + 24 + 2) * MB + 2 * (2 * MB + MB // 2) + 3 * MB + MB // 2)


def test_requests_of_an_iteration() -> None:
    # 4 micro-batches, 2 stages: the driver writes 4 inputs and 4 targets, the boundary
    # carries 4 activations and 4 gradients; stage 0's two replicas each write 2 x 1 pieces
    # and read 2 x 1; the last stage's one replica writes a report that the driver reads.
    profile = ModelProfile((layer(0.1, 0.2, params=1000, out=10.0), layer(0.1, 0.2)), 10.0, 8.0)
    plan = Plan.manual([1, 1], replicas=[2, 1], micro_batch_size=1, global_batch_size=4, memory_mb=1024)
    stages = costmodel.stage_costs(profile, HAND, plan)
    assert costmodel.requests_per_iteration(stages, plan) == (8 + 8 + 4 + 1, 8 + 8 + 4 + 1)


# -- the iteration formula against the simulator ---------------------------------------


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_formula_is_exact_for_one_stage(schedule: str) -> None:
    """One stage: one replica (GPipe, or 1F1B = gradient accumulation), any replicas under the
    four-phase all-reduce, two under the pipelined one; random profiles and platforms."""
    rng = random.Random(5)
    checked = set()
    for _ in range(60):
        plan, profile, platform = random_job(rng, stages=1, schedule=schedule)
        m = plan.num_micro_batches
        for replicas, sync in [(1, "pipelined"), (2, "pipelined"), *((d, "four_phase") for d in (2, 3, 4))]:
            if replicas > m:
                continue
            variant = dataclasses.replace(plan, replicas=(replicas,), sync=sync)
            sim = simulate(variant, profile, platform)
            assert sim.formula_s == pytest.approx(sim.iteration_s, rel=1e-9), (variant, profile, platform)
            checked.add((replicas, sync, m % replicas == 0))
    assert (3, "four_phase", False) in checked and (2, "pipelined", False) in checked


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_formula_is_never_above_the_simulator(schedule: str) -> None:
    """A set of lower bounds on paths the simulator takes, on random plans: 1-5 stages, replica
    counts that divide the micro-batches or not, mixed syncs, tiers of different speeds and links."""
    rng = random.Random(17)
    tight = 0
    for _ in range(250):
        plan, profile, platform = random_job(rng, schedule=schedule)
        sim = simulate(plan, profile, platform)
        assert sim.formula_s <= sim.iteration_s * (1 + 1e-9), (plan, profile, platform)
        tight += sim.formula_s >= 0.95 * sim.iteration_s
    assert tight >= 0.85 * 250  # and close: not a bound that holds by being small


def test_formula_follows_the_1f1b_stall() -> None:
    # test_simulator's stalling job: the window term gives the simulator's 16 s (GPipe: 12.6 s);
    # the formula before its window terms gave 12.6 s for both.
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=4, memory_mb=1024, schedule="1f1b")
    stages = costmodel.stage_costs(STALLING, HAND, plan)
    assert costmodel.formula_iteration_s(stages, HAND, plan) == pytest.approx(16.0)
    gpipe = dataclasses.replace(plan, schedule="gpipe")
    assert costmodel.formula_iteration_s(costmodel.stage_costs(STALLING, HAND, gpipe), HAND, gpipe) == (
        pytest.approx(12.6))


# -- a stage that does not fit ----------------------------------------------------------


def deep(held_mb: float) -> ModelProfile:
    """Two layers; the first keeps ``held_mb`` MB per sample alive for its backward."""
    first = dataclasses.replace(layer(1.0, 2.0, out=1e3), held_bytes_per_sample=held_mb * 2**20)
    return ModelProfile((first, layer(1.0, 1.0)), input_bytes_per_sample=1e3, target_bytes_per_sample=8.0)


def test_a_stage_that_does_not_fit_names_its_schedule_and_1f1b_when_that_fits() -> None:
    # Four micro-batches of 300 MB kept for backward: GPipe holds all four on stage 0 (over
    # 1200 MB), 1F1B two (its window over two stages), about 700 MB with the runtime.
    profile = deep(300)
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=4, memory_mb=1024)
    one_f_one_b = dataclasses.replace(plan, schedule="1f1b")
    need = costmodel.stage_memory_bytes(profile, HAND, plan, 0) / 2**20
    fits = costmodel.stage_memory_bytes(profile, HAND, one_f_one_b, 0) / 2**20
    assert need > 1024 >= fits  # the premise, in the memory model's own numbers
    with pytest.raises(PlanInfeasible) as caught:
        costmodel.stage_costs(profile, HAND, plan)
    message = str(caught.value)
    assert message.startswith(f"stage 0 (layers 0-0, 1 replica(s)) needs {need:.0f} MB per function under "
                              "schedule 'gpipe' but its tier has 1024 MB; hint: schedule='1f1b' keeps 2 "
                              f"micro-batch(es) of this stage in flight instead of 4 and needs {fits:.0f} MB, "
                              "which fits")
    assert costmodel.stage_costs(profile, HAND, one_f_one_b)[0].memory_bytes == pytest.approx(fits * 2**20)
    # Without memory sizes: the same hint against the largest tier.
    with pytest.raises(PlanInfeasible, match=r"more than the largest tier of hand \(1024 MB\); hint: "
                                             r"schedule='1f1b' keeps 2 micro-batch\(es\)"):
        costmodel.stage_costs(profile, HAND, dataclasses.replace(plan, memory_mb=None))


def test_a_stage_that_fits_under_no_schedule_gets_the_usual_hint() -> None:
    profile = deep(600)  # 1F1B's two micro-batches alone are over 1024 MB
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=4, memory_mb=1024)
    for schedule in ("gpipe", "1f1b"):
        with pytest.raises(PlanInfeasible) as caught:
            costmodel.stage_costs(profile, HAND, dataclasses.replace(plan, schedule=schedule))
        message = str(caught.value)
        assert f"under schedule '{schedule}' but its tier has 1024 MB" in message
        assert "schedule='1f1b'" not in message
        assert message.endswith("hint: a larger tier, more replicas, fewer layers in the stage or smaller "
                                "micro-batches")


# -- tied parameters and the speed at each micro-batch size ------------------------------------


def tied_profile(tie_bytes: int) -> ModelProfile:
    """Embedding-like layer 0 and decoder-like layer 2 sharing ``tie_bytes`` of parameters."""
    layers = (layer(0.1, 0.1, params=tie_bytes + 1000, out=10.0), layer(0.1, 0.1, params=500, out=10.0),
              layer(0.1, 0.1, params=tie_bytes))
    return ModelProfile(layers, 10.0, 8.0, tied=((0, 2, tie_bytes),))


def test_a_tie_inside_one_stage_is_held_once() -> None:
    profile = tied_profile(10**6)
    assert profile.param_bytes == 10**6 + 1500
    plan = Plan.manual([3], replicas=[2], micro_batch_size=1, global_batch_size=4, memory_mb=1024)
    (stage,) = costmodel.stage_costs(profile, HAND, plan)
    assert stage.param_bytes == 10**6 + 1500 and stage.tied == ()
    untied = dataclasses.replace(profile, tied=())
    (doubled,) = costmodel.stage_costs(untied, HAND, plan)
    # weights, gradients, workspace and the all-reduce's chunk (a half, 2 replicas) each hold the tie once less
    assert doubled.memory_bytes - stage.memory_bytes == 10**6 * (2 + 1) + 10**6 // 2


def test_a_tie_across_stages_is_exchanged_after_the_all_reduce() -> None:
    profile = tied_profile(10**6)  # 1 s each way on HAND's 1 MB/s links
    plan = Plan.manual([1, 2], replicas=[2, 1], micro_batch_size=1, global_batch_size=4, memory_mb=1024)
    first, last = costmodel.stage_costs(profile, HAND, plan)
    assert first.tied == ((1, 10**6),) and last.tied == ((0, 10**6),)
    assert first.param_bytes == 10**6 + 1000 and last.param_bytes == 10**6 + 500  # a copy each
    untied = costmodel.stage_costs(dataclasses.replace(profile, tied=()), HAND, plan)
    writes, reads = costmodel.requests_per_iteration((first, last), plan)
    assert (writes, reads) == tuple(n + extra for n, extra in
                                    zip(costmodel.requests_per_iteration(untied, plan), (2, 1 + 2), strict=True))
    with_tie = simulate(plan, profile, HAND)
    without = simulate(plan, dataclasses.replace(profile, tied=()), HAND)
    # Stage 0's replica 0 uploads its gradient of the tie once its all-reduce is done (where the
    # untied run starts its update), 1 s + 0.1 s; stage 1 downloads it, 1 s + 0.1 s, before its update.
    (done,) = [s.start for s in without.timeline.lane(0, 0, "compute") if s.label == "update"]
    assert with_tie.iteration_s >= done + 2 * (1.0 + HAND.latency_s) - 1e-9
    assert with_tie.iteration_s > without.iteration_s
    # uploads: stage 0's replica 0 and stage 1's replica; downloads: both replicas of stage 0, stage 1's
    assert len([s for s in with_tie.timeline.spans if s.label == "tie"]) == 2 + 3


def test_compute_speed_follows_the_micro_batch_size() -> None:
    fast = Tier(memory_mb=1024, vcpus=3.0, speed=2.0, uplink_mb_s=1.0, downlink_mb_s=1.0, speed_half_batch=4.0)
    platform = HAND.replace(tiers=(fast,))
    profile = ModelProfile((layer(1.0, 2.0),), 10.0, 8.0)
    for b, speed in ((1, 1 + 1 / 5), (4, 1.5), (16, 1 + 16 / 20)):
        plan = Plan.manual([1], micro_batch_size=b, global_batch_size=16, memory_mb=1024)
        (stage,) = costmodel.stage_costs(profile, platform, plan)
        assert stage.forward_s == pytest.approx(1.0 / speed) and stage.backward_s == pytest.approx(2.0 / speed)
