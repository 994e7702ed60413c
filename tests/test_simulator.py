"""The simulator against timelines worked out by hand, span by span."""

from __future__ import annotations

import dataclasses
import random

import pytest

from funcpipe import ConfigError, Plan, PlanInfeasible, Simulation, costmodel, simulate
from funcpipe.platforms import Platform, Tier
from funcpipe.profiler import LayerProfile, ModelProfile
from funcpipe.schedule import worker_tasks

# One tier: speed 1, 1 MB/s (10**6 bytes/s) each way, 0.1 s per request: easy arithmetic.
HAND = Platform(
    name="hand",
    tiers=(Tier(memory_mb=1024, vcpus=1.0, speed=1.0, uplink_mb_s=1.0, downlink_mb_s=1.0),),
    latency_s=0.1,
    price_per_gb_s=1e-5,
    price_per_vcpu_s=0.0,
    price_per_invocation=0.0,
    price_per_put=0.0,
    price_per_get=0.0,
    lifetime_s=1e9,
    runtime_overhead_mb=100,
    async_payload_bytes=2**20,
    storage="file",
)
REPORT = 64e-6 + 0.1  # the last stage's 64-byte report to the driver


def layer(forward: float, backward: float, *, update: float = 0.0, params: int = 0, out: float = 0.0) -> LayerProfile:
    return LayerProfile(
        name="x", forward_alpha_s=forward, forward_beta_s=0.0, backward_alpha_s=backward, backward_beta_s=0.0,
        param_bytes=params, optimizer_bytes=0, update_s=update, output_bytes_per_sample=out,
        held_bytes_per_sample=0.0,
    )


def spans(sim: object, stage: int, replica: int, lane: str) -> list[tuple[str, float, float]]:
    timeline = sim.timeline  # type: ignore[attr-defined]
    return [(s.label, round(s.start, 6), round(s.end, 6)) for s in timeline.lane(stage, replica, lane)]


def test_one_stage_one_worker() -> None:
    # Downloads, 0.2 s each (0.1 s of bytes + 0.1 s latency), inputs and targets alternating:
    # input 0 [0, .2], target 0 [.2, .4], input 1 [.4, .6], target 1 [.6, .8].
    # Compute: F0 [.4, 1.4], B0 [1.4, 3.4], F1 [3.4, 4.4], B1 [4.4, 6.4], update [6.4, 6.9];
    # then the report goes up: 6.9 + 64 bytes / 1 MB/s + 0.1 s.
    profile = ModelProfile((layer(1.0, 2.0, update=0.5),), input_bytes_per_sample=1e5, target_bytes_per_sample=1e5)
    plan = Plan.manual([1], micro_batch_size=1, global_batch_size=2, memory_mb=1024)
    sim = simulate(plan, profile, HAND)
    assert spans(sim, 0, 0, "download") == [
        ("input 0", 0.0, 0.2), ("target 0", 0.2, 0.4), ("input 1", 0.4, 0.6), ("target 1", 0.6, 0.8),
    ]
    assert spans(sim, 0, 0, "compute") == [
        ("F0", 0.4, 1.4), ("B0", 1.4, 3.4), ("F1", 3.4, 4.4), ("B1", 4.4, 6.4), ("update", 6.4, 6.9),
    ]
    assert sim.iteration_s == pytest.approx(6.9 + REPORT)
    # Billed: one 1 GB function for the whole iteration; requests are free on this platform.
    assert sim.cost_usd == pytest.approx((6.9 + REPORT) * 1e-5)
    assert sim.formula_s == pytest.approx(sim.iteration_s)


def test_two_stages() -> None:
    # Stage 0: f=1, g=2, sends 2e5 bytes per micro-batch (0.2 s + 0.1 s each way).
    # Stage 1: f=0.5, g=1. Worked out:
    #   s0: input 0 [0, .2], input 1 [.2, .4]; F0 [.2, 1.2] -> act 0 up [1.2, 1.5];
    #       F1 [1.2, 2.2] -> act 1 up [2.2, 2.5]
    #   s1: act 0 [1.5, 1.8], target 0 [1.8, 2.0]; F0 [2.0, 2.5], B0 [2.5, 3.5] -> grad 0 up [3.5, 3.8]
    #       act 1 [2.5, 2.8], target 1 [2.8, 3.0]; F1 [3.5, 4.0], B1 [4.0, 5.0] -> grad 1 up [5.0, 5.3]
    #       report [5.3, 5.4+]
    #   s0: grad 0 [3.8, 4.1], B0 [4.1, 6.1]; grad 1 [5.3, 5.6], B1 [6.1, 8.1]; update at 8.1
    profile = ModelProfile(
        (layer(1.0, 2.0, out=2e5), layer(0.5, 1.0)), input_bytes_per_sample=1e5, target_bytes_per_sample=1e5
    )
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2, memory_mb=1024)
    sim = simulate(plan, profile, HAND)
    assert spans(sim, 0, 0, "compute") == [
        ("F0", 0.2, 1.2), ("F1", 1.2, 2.2), ("B0", 4.1, 6.1), ("B1", 6.1, 8.1), ("update", 8.1, 8.1),
    ]
    assert spans(sim, 0, 0, "upload") == [("act 0", 1.2, 1.5), ("act 1", 2.2, 2.5)]
    assert spans(sim, 0, 0, "download") == [
        ("input 0", 0.0, 0.2), ("input 1", 0.2, 0.4), ("grad 0", 3.8, 4.1), ("grad 1", 5.3, 5.6),
    ]
    assert spans(sim, 1, 0, "download") == [
        ("act 0", 1.5, 1.8), ("target 0", 1.8, 2.0), ("act 1", 2.5, 2.8), ("target 1", 2.8, 3.0),
    ]
    assert spans(sim, 1, 0, "compute") == [
        ("F0", 2.0, 2.5), ("B0", 2.5, 3.5), ("F1", 3.5, 4.0), ("B1", 4.0, 5.0), ("update", 5.0, 5.0),
    ]
    assert spans(sim, 1, 0, "upload") == [
        ("grad 0", 3.5, 3.8), ("grad 1", 5.0, 5.3), ("report", 5.3, round(5.3 + REPORT, 6)),
    ]
    assert sim.iteration_s == pytest.approx(8.1)
    assert [st.compute_s for st in sim.stages] == pytest.approx([6.0, 3.0])
    assert [st.idle_s for st in sim.stages] == pytest.approx([2.1, 5.1])


def test_two_stages_without_overlap() -> None:
    # The ablation: the same two stages, but every download starts when the computation needs
    # it and the computation waits for each upload. Worked out:
    #   s0: input 0 [0, .2], F0 [.2, 1.2], act 0 up [1.2, 1.5]; input 1 [1.5, 1.7], F1 [1.7, 2.7],
    #       act 1 up [2.7, 3.0]
    #   s1: act 0 [1.5, 1.8], target 0 [1.8, 2.0], F0 [2.0, 2.5], B0 [2.5, 3.5], grad 0 up [3.5, 3.8];
    #       act 1 [3.8, 4.1], target 1 [4.1, 4.3], F1 [4.3, 4.8], B1 [4.8, 5.8], grad 1 up [5.8, 6.1],
    #       update at 6.1, report [6.1, 6.2+]
    #   s0: grad 0 [3.8, 4.1], B0 [4.1, 6.1]; grad 1 [6.1, 6.4], B1 [6.4, 8.4]; update at 8.4
    profile = ModelProfile(
        (layer(1.0, 2.0, out=2e5), layer(0.5, 1.0)), input_bytes_per_sample=1e5, target_bytes_per_sample=1e5
    )
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2, memory_mb=1024)
    sim = simulate(plan, profile, HAND, overlap=False)
    assert spans(sim, 0, 0, "download") == [
        ("input 0", 0.0, 0.2), ("input 1", 1.5, 1.7), ("grad 0", 3.8, 4.1), ("grad 1", 6.1, 6.4),
    ]
    assert spans(sim, 0, 0, "compute") == [
        ("F0", 0.2, 1.2), ("F1", 1.7, 2.7), ("B0", 4.1, 6.1), ("B1", 6.4, 8.4), ("update", 8.4, 8.4),
    ]
    assert spans(sim, 0, 0, "upload") == [("act 0", 1.2, 1.5), ("act 1", 2.7, 3.0)]
    assert spans(sim, 1, 0, "download") == [
        ("act 0", 1.5, 1.8), ("target 0", 1.8, 2.0), ("act 1", 3.8, 4.1), ("target 1", 4.1, 4.3),
    ]
    assert spans(sim, 1, 0, "compute") == [
        ("F0", 2.0, 2.5), ("B0", 2.5, 3.5), ("F1", 4.3, 4.8), ("B1", 4.8, 5.8), ("update", 6.1, 6.1),
    ]
    assert spans(sim, 1, 0, "upload") == [
        ("grad 0", 3.5, 3.8), ("grad 1", 5.8, 6.1), ("report", 6.1, round(6.1 + REPORT, 6)),
    ]
    assert sim.iteration_s == pytest.approx(8.4)
    assert simulate(plan, profile, HAND).iteration_s == pytest.approx(8.1)  # overlapped, as above


def test_two_replicas_pipelined_scatter_reduce() -> None:
    # One stage, two replicas, one micro-batch each; 2e5 bytes of parameters: chunks of 1e5
    # (one piece each), 0.2 s per transfer. Each replica: input [0, .2], target [.2, .4],
    # F [.4, 1.4], B [1.4, 3.4]; its share of the peer's chunk up [3.4, 3.6]; the peer's
    # share down [3.6, 3.8]; the summed chunk up [3.8, 4.0]; the peer's sum down [4.0, 4.2];
    # update [4.2, 4.7]; report up.
    profile = ModelProfile(
        (layer(1.0, 2.0, update=0.5, params=200_000),), input_bytes_per_sample=1e5, target_bytes_per_sample=1e5
    )
    plan = Plan.manual([1], replicas=[2], micro_batch_size=1, global_batch_size=2, memory_mb=1024)
    sim = simulate(plan, profile, HAND)
    for replica in (0, 1):
        assert spans(sim, 0, replica, "compute") == [
            ("F" + str(replica), 0.4, 1.4), ("B" + str(replica), 1.4, 3.4), ("sync", 3.4, 4.2), ("update", 4.2, 4.7),
        ]
        assert spans(sim, 0, replica, "upload") == [
            ("chunk", 3.4, 3.6), ("merged", 3.8, 4.0), ("report", 4.7, round(4.7 + REPORT, 6)),
        ]
        assert spans(sim, 0, replica, "download")[2:] == [("chunk", 3.6, 3.8), ("merged", 4.0, 4.2)]
    assert sim.iteration_s == pytest.approx(4.7 + REPORT)
    assert sim.formula_s == pytest.approx(sim.iteration_s)
    assert sim.stages[0].sync_s == pytest.approx(0.8)


def test_two_replicas_four_phase() -> None:
    # The LambdaML baseline on the same job: shares up [3.4, 3.6] (waited for), peer's share
    # down [3.6, 3.8], merged up [3.8, 4.0] (waited for), peer's merged down [4.0, 4.2]: with
    # one peer and one piece, the same steps as pipelined, on the download thread.
    profile = ModelProfile(
        (layer(1.0, 2.0, update=0.5, params=200_000),), input_bytes_per_sample=1e5, target_bytes_per_sample=1e5
    )
    plan = Plan.manual([1], replicas=[2], micro_batch_size=1, global_batch_size=2, memory_mb=1024,
                       sync="four_phase")
    sim = simulate(plan, profile, HAND)
    assert spans(sim, 0, 0, "compute")[2] == ("sync", 3.4, 4.2)
    assert sim.iteration_s == pytest.approx(4.7 + REPORT)


def test_plan_without_memory_gets_the_smallest_tier_that_fits() -> None:
    two_tiers = HAND.replace(tiers=(HAND.tiers[0], Tier(2048, 1.0, 1.0, 1.0, 1.0)))
    profile = ModelProfile((layer(1.0, 2.0, params=300 * 2**20),), input_bytes_per_sample=1e5,
                           target_bytes_per_sample=1e5)
    sim = simulate(Plan.manual([1], micro_batch_size=1, global_batch_size=2), profile, two_tiers)
    # 100 MB runtime + 2 x 300 MB weights and gradients + a 300 MB workspace (weights and
    # optimizer state, which is 0 here): 1000 MB fits 1024; with a replica's all-reduce buffers
    # (its 150 MB chunk and 24 MB of pieces in flight) it does not.
    assert sim.plan.memory_mb == (1024,)
    with pytest.raises(PlanInfeasible, match="needs 1174 MB"):
        simulate(Plan.manual([1], replicas=[2], micro_batch_size=1, global_batch_size=2, memory_mb=1024),
                 profile, two_tiers)


def test_platform_by_name() -> None:
    profile = ModelProfile((layer(0.01, 0.02, out=10.0), layer(0.01, 0.02)), 100.0, 8.0)
    sim = simulate(Plan.manual([1, 1], micro_batch_size=2, global_batch_size=8), profile, "aws_lambda")
    assert sim.platform == "aws_lambda"
    assert sim.plan.memory_mb == (1024, 1024)
    assert sim.cost_usd > 0


def test_every_worker_runs_its_whole_schedule() -> None:
    profile = ModelProfile(
        tuple(layer(0.1 * (i + 1), 0.2, params=1000 * (i + 1), out=5e4) for i in range(5)), 1e4, 8.0
    )
    plan = Plan.manual([2, 1, 2], replicas=[2, 3, 1], micro_batch_size=1, global_batch_size=7, memory_mb=1024)
    sim = simulate(plan, profile, HAND)
    for stage, count in enumerate(plan.replicas):
        forwards = sorted(
            int(s.label[1:]) for s in sim.timeline.spans
            if s.stage == stage and s.lane == "compute" and s.label.startswith("F")
        )
        assert forwards == list(range(7))
        assert len({s.replica for s in sim.timeline.spans if s.stage == stage}) == count
    assert max(s.end for s in sim.timeline.spans) == pytest.approx(sim.iteration_s)


# -- 1F1B ------------------------------------------------------------------------------

# Stage 0: f = 1, g = 2, a 2e5-byte activation (0.3 s up or down, so is its gradient);
# stage 1 (last): f = 1, g = 1. Inputs and targets 1e5 bytes (0.2 s down).
STALLING = ModelProfile((layer(1.0, 2.0, out=2e5), layer(1.0, 1.0)), input_bytes_per_sample=1e5,
                        target_bytes_per_sample=1e5)


def test_1f1b_two_stages_interleave_and_stall() -> None:
    # Four micro-batches. Stage 0 keeps k = 2 in flight: F0 F1 B0 F2 B1 F3 B2 B3, and posts
    # each download one step ahead (input 2 behind gradient 0, then gradient j+1 and input
    # j+3 after backward j); stage 1 alternates, inputs one micro-batch ahead. One round trip
    # of a micro-batch from stage 0's forward to its backward (f + 0.3 + 0.3 + 0.2 + f' + g'
    # + 0.3 + 0.3 = 3.4 s) is longer than the window's other forward (1 s): stage 0 stalls.
    #
    # seconds  0         2         4         6         8         10        12        14        16
    # s0        F0===F1===            B0========F2===B1========F3===  B2========     B3========
    # s1                 F0===B0===F1===B1===            F2===B2===     F3===B3===
    #
    #   s0: input 0 [0, .2], input 1 [.2, .4]; F0 [.2, 1.2] -> act 0 up [1.2, 1.5];
    #       F1 [1.2, 2.2] -> act 1 up [2.2, 2.5]
    #   s1: act 0 [1.5, 1.8], target 0 [1.8, 2.0]; F0 [2, 3], B0 [3, 4] -> grad 0 up [4.0, 4.3];
    #       act 1 [2.5, 2.8], target 1 [2.8, 3.0]; F1 [4, 5], B1 [5, 6] -> grad 1 up [6.0, 6.3]
    #   s0: grad 0 [4.3, 4.6], then input 2 [4.6, 4.8]; B0 [4.6, 6.6], F2 [6.6, 7.6] -> act 2
    #       up [7.6, 7.9]; grad 1 (posted at 6.6) [6.6, 6.9], input 3 [6.9, 7.1]; B1 [7.6, 9.6],
    #       F3 [9.6, 10.6] -> act 3 up [10.6, 10.9]
    #   s1: act 2 [7.9, 8.2], target 2 [8.2, 8.4]; F2 [8.4, 9.4], B2 [9.4, 10.4] -> grad 2 up
    #       [10.4, 10.7]; act 3 [10.9, 11.2], target 3 [11.2, 11.4]; F3 [11.4, 12.4],
    #       B3 [12.4, 13.4] -> grad 3 up [13.4, 13.7], report [13.7, 13.8+]
    #   s0: grad 2 (posted at 9.6) [10.7, 11.0], B2 [11, 13]; grad 3 (posted at 13) [13.7, 14.0],
    #       B3 [14, 16]; the update (0 s) at 16.
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=4, memory_mb=1024, schedule="1f1b")
    sim = simulate(plan, STALLING, HAND)
    assert spans(sim, 0, 0, "download") == [
        ("input 0", 0.0, 0.2), ("input 1", 0.2, 0.4),
        ("grad 0", 4.3, 4.6), ("input 2", 4.6, 4.8),
        ("grad 1", 6.6, 6.9), ("input 3", 6.9, 7.1),
        ("grad 2", 10.7, 11.0),
        ("grad 3", 13.7, 14.0),
    ]
    assert spans(sim, 0, 0, "compute") == [
        ("F0", 0.2, 1.2), ("F1", 1.2, 2.2),  # warm-up: k = 2 forwards
        ("B0", 4.6, 6.6), ("F2", 6.6, 7.6),  # one backward, one forward
        ("B1", 7.6, 9.6), ("F3", 9.6, 10.6),
        ("B2", 11.0, 13.0),  # cool-down
        ("B3", 14.0, 16.0),
        ("update", 16.0, 16.0),
    ]
    assert spans(sim, 0, 0, "upload") == [("act 0", 1.2, 1.5), ("act 1", 2.2, 2.5), ("act 2", 7.6, 7.9),
                                          ("act 3", 10.6, 10.9)]
    assert spans(sim, 1, 0, "download") == [
        ("act 0", 1.5, 1.8), ("target 0", 1.8, 2.0), ("act 1", 2.5, 2.8), ("target 1", 2.8, 3.0),
        ("act 2", 7.9, 8.2), ("target 2", 8.2, 8.4), ("act 3", 10.9, 11.2), ("target 3", 11.2, 11.4),
    ]
    assert spans(sim, 1, 0, "compute") == [
        ("F0", 2.0, 3.0), ("B0", 3.0, 4.0),
        ("F1", 4.0, 5.0), ("B1", 5.0, 6.0),
        ("F2", 8.4, 9.4), ("B2", 9.4, 10.4),
        ("F3", 11.4, 12.4), ("B3", 12.4, 13.4),
        ("update", 13.4, 13.4),
    ]
    assert spans(sim, 1, 0, "upload") == [
        ("grad 0", 4.0, 4.3), ("grad 1", 6.0, 6.3), ("grad 2", 10.4, 10.7), ("grad 3", 13.4, 13.7),
        ("report", 13.7, round(13.7 + REPORT, 6)),
    ]
    assert sim.iteration_s == pytest.approx(16.0)
    # The formula's window term follows the chain that stalls: B1 ends at B0 + g + f = 9.6, and
    # B3 one round trip of the window later (f + 3.4 + g = 6.4), at 16.
    assert sim.formula_s == pytest.approx(16.0)


def test_1f1b_stall_makes_gpipe_faster() -> None:
    # The same job under GPipe: stage 0 prefetches every input and gradient and runs all four
    # forwards back to back, so it never waits on a round trip.
    #
    # seconds  0         2         4         6         8         10        12
    # s0        F0===F1===F2===F3===  B0========B1========B2========B3========
    # s1                 F0===B0===F1===B1===F2===B2===F3===B3===
    #
    #   s0: inputs [0, .2] ... [.6, .8]; F0..F3 [.2, 4.2]; acts up [1.2, 1.5], [2.2, 2.5],
    #       [3.2, 3.5], [4.2, 4.5]
    #   s1: act j and target j come down right after act j is up; F0 B0 ... B3 [2, 10];
    #       grads up [4, 4.3], [6, 6.3], [8, 8.3], [10, 10.3]
    #   s0: grad 0 [4.3, 4.6] B0 [4.6, 6.6]; grad 1 [6.3, 6.6] B1 [6.6, 8.6]; grad 2 [8.3, 8.6]
    #       B2 [8.6, 10.6]; grad 3 [10.3, 10.6] B3 [10.6, 12.6]
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=4, memory_mb=1024, schedule="gpipe")
    sim = simulate(plan, STALLING, HAND)
    assert spans(sim, 0, 0, "compute") == [
        ("F0", 0.2, 1.2), ("F1", 1.2, 2.2), ("F2", 2.2, 3.2), ("F3", 3.2, 4.2),
        ("B0", 4.6, 6.6), ("B1", 6.6, 8.6), ("B2", 8.6, 10.6), ("B3", 10.6, 12.6),
        ("update", 12.6, 12.6),
    ]
    assert spans(sim, 1, 0, "compute") == [
        ("F0", 2.0, 3.0), ("B0", 3.0, 4.0), ("F1", 4.0, 5.0), ("B1", 5.0, 6.0),
        ("F2", 6.0, 7.0), ("B2", 7.0, 8.0), ("F3", 8.0, 9.0), ("B3", 9.0, 10.0),
        ("update", 10.0, 10.0),
    ]
    assert sim.iteration_s == pytest.approx(12.6)
    one_f_one_b = simulate(dataclasses.replace(plan, schedule="1f1b"), STALLING, HAND)
    assert one_f_one_b.iteration_s == pytest.approx(16.0)  # as worked out above


def test_1f1b_equals_gpipe_when_the_last_stage_is_the_bottleneck() -> None:
    # Stage 0: f = g = 0.5; stage 1: f = g = 2. Stage 1's backwards pace both schedules: each
    # gradient comes back 4 s after the one before, and stage 0 has long finished the forward
    # 1F1B makes it wait for. Worked out (transfers as above):
    #   s1: act 0 [1.0, 1.3], target 0 [1.3, 1.5]; F0 [1.5, 3.5], B0 [3.5, 5.5], F1 B1 [5.5, 9.5],
    #       F2 B2 [9.5, 13.5], F3 B3 [13.5, 17.5]; grad j up 0.3 s after each backward
    #   s0, GPipe: F0..F3 [.2, 2.2]; grad j down [5.8 + 4 j, 6.1 + 4 j], B j 0.5 s after it.
    #   s0, 1F1B:  F0 F1 [.2, 1.2]; F2 after B0, F3 after B1 (inputs 2 and 3 come down behind
    #       gradients 0 and 1), long before stage 1 needs them; the same backwards.
    profile = ModelProfile((layer(0.5, 0.5, out=2e5), layer(2.0, 2.0)), input_bytes_per_sample=1e5,
                           target_bytes_per_sample=1e5)
    times = {}
    for schedule in ("gpipe", "1f1b"):
        plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=4, memory_mb=1024, schedule=schedule)
        sim = simulate(plan, profile, HAND)
        times[schedule] = sim.iteration_s
        backwards = [s for s in spans(sim, 0, 0, "compute") if s[0].startswith("B")]
        assert backwards == [("B0", 6.1, 6.6), ("B1", 10.1, 10.6), ("B2", 14.1, 14.6), ("B3", 18.1, 18.6)]
        assert spans(sim, 1, 0, "compute")[-2:] == [("B3", 15.5, 17.5), ("update", 17.5, 17.5)]
    gpipe_forwards = [("F0", 0.2, 0.7), ("F1", 0.7, 1.2), ("F2", 1.2, 1.7), ("F3", 1.7, 2.2)]
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=4, memory_mb=1024)
    assert [s for s in spans(simulate(plan, profile, HAND), 0, 0, "compute") if s[0][0] == "F"] == gpipe_forwards
    interleaved = spans(simulate(dataclasses.replace(plan, schedule="1f1b"), profile, HAND), 0, 0, "compute")
    assert [s[0] for s in interleaved] == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3", "update"]
    assert times == {"gpipe": pytest.approx(18.6), "1f1b": pytest.approx(18.6)}


def test_1f1b_posts_the_next_gradient_after_each_backward() -> None:
    # The two-stage job of test_two_stages under 1F1B: the same order (2 micro-batches, k = 2),
    # but gradient 1 is posted only after B0 ends at 6.1 (GPipe prefetched it at 5.3):
    # grad 1 [6.1, 6.4], B1 [6.4, 8.4] instead of [6.1, 8.1].
    profile = ModelProfile(
        (layer(1.0, 2.0, out=2e5), layer(0.5, 1.0)), input_bytes_per_sample=1e5, target_bytes_per_sample=1e5
    )
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2, memory_mb=1024, schedule="1f1b")
    sim = simulate(plan, profile, HAND)
    assert spans(sim, 0, 0, "download") == [
        ("input 0", 0.0, 0.2), ("input 1", 0.2, 0.4), ("grad 0", 3.8, 4.1), ("grad 1", 6.1, 6.4),
    ]
    assert spans(sim, 0, 0, "compute") == [
        ("F0", 0.2, 1.2), ("F1", 1.2, 2.2), ("B0", 4.1, 6.1), ("B1", 6.4, 8.4), ("update", 8.4, 8.4),
    ]
    assert sim.iteration_s == pytest.approx(8.4)
    # Without overlap the gradient is fetched when B1 needs it, after B0, as here; the first
    # forwards wait for their inputs as in test_two_stages_without_overlap.
    ablation = simulate(plan, profile, HAND, overlap=False)
    assert spans(ablation, 0, 0, "compute") == [
        ("F0", 0.2, 1.2), ("F1", 1.7, 2.7), ("B0", 4.1, 6.1), ("B1", 6.4, 8.4), ("update", 8.4, 8.4),
    ]
    assert ablation.iteration_s == pytest.approx(8.4)


@pytest.mark.parametrize(("syncs", "seconds"), [
    (("pipelined", "four_phase"), (1.1, 1.6)),
    (("four_phase", "pipelined"), (1.4, 1.3)),
])
def test_each_stage_runs_its_own_all_reduce(syncs: tuple[str, str], seconds: tuple[float, float]) -> None:
    # Two stages of three replicas, one micro-batch each (every replica of a stage has the same
    # timeline), 3e5 bytes of parameters per stage: chunks of 1e5, one piece each, 0.1 s on a
    # link plus 0.1 s latency. Stage 1 starts its all-reduce at 3.3 behind its last input
    # gradient (0.2 s up): its sync lasts 0.2 s longer than stage 0's, which starts at 5.7.
    #   four-phase: two shares up (0.4), two down (0.4), the merged chunk up (0.2), two
    #     merged down (0.4): 1.4 s.
    #   pipelined: shares up [0, .2] and [.2, .4]; the first peer's share is up at .2 and
    #     down at .4, the second's up at .4 and down at .6; the merged chunk goes up [.6, .8];
    #     the peers' merged chunks, up at .8, come down over one link: [.8, .9] + .1 latency and
    #     [.9, 1.0] + .1: 1.1 s.
    profile = ModelProfile((layer(1.0, 2.0, out=1e5, params=300_000), layer(0.5, 1.0, params=300_000)),
                           input_bytes_per_sample=1e5, target_bytes_per_sample=1e5)
    plan = Plan.manual([1, 1], replicas=[3, 3], micro_batch_size=1, global_batch_size=3, memory_mb=1024,
                       sync=syncs, schedule="1f1b")
    sim = simulate(plan, profile, HAND)
    starts = (5.7, 3.3)
    for stage in (0, 1):
        for replica in range(3):
            sync = [s for s in spans(sim, stage, replica, "compute") if s[0] == "sync"]
            assert sync == [("sync", starts[stage], round(starts[stage] + seconds[stage], 6))]
    assert [st.sync_s for st in sim.stages] == pytest.approx(list(seconds))
    assert sim.iteration_s == pytest.approx(5.7 + seconds[0])


# -- random plans -----------------------------------------------------------------------


def random_job(
    rng: random.Random, *, stages: int | None = None, schedule: str | None = None
) -> tuple[Plan, ModelProfile, Platform]:
    """A random plan, profile and platform: 1-5 stages of 1-3 layers, 1-12 micro-batches, up to
    4 replicas per stage (dividing the micro-batches or not), a sync per stage, tiers of different
    speeds and bandwidths, and messages and parameters from nothing to a hundred pieces' worth."""
    tiers = tuple(
        Tier(memory_mb=10240 * (i + 1), vcpus=1.0, speed=rng.choice([0.5, 1.0, 2.0]),
             uplink_mb_s=rng.choice([1.0, 10.0, 100.0]), downlink_mb_s=rng.choice([1.0, 10.0, 100.0]))
        for i in range(rng.randint(1, 3))
    )
    platform = HAND.replace(tiers=tiers, latency_s=rng.choice([0.0, 0.01, 0.1]), runtime_overhead_mb=10)
    count = stages if stages is not None else rng.randint(1, 5)
    balance = [rng.randint(1, 3) for _ in range(count)]

    def size() -> float:
        return rng.choice([0.0, 1e3, 1e4, 1e5, 1e6]) * rng.uniform(0.5, 2.0)

    layers = tuple(
        LayerProfile(
            name=f"l{i}", forward_alpha_s=rng.uniform(0, 0.5), forward_beta_s=rng.uniform(0, 0.3),
            backward_alpha_s=rng.uniform(0, 0.5), backward_beta_s=rng.uniform(0, 0.6),
            param_bytes=rng.choice([0, 10**4, 10**6, 10**7, 10**8]), optimizer_bytes=0,
            update_s=rng.uniform(0, 0.2), output_bytes_per_sample=size(), held_bytes_per_sample=0.0,
        )
        for i in range(sum(balance))
    )
    profile = ModelProfile(layers, input_bytes_per_sample=size(), target_bytes_per_sample=size())
    m = rng.randint(1, 12)
    b = rng.randint(1, 3)
    syncs = [rng.choice(["pipelined", "four_phase"]) for _ in range(count)]
    plan = Plan.manual(
        balance, replicas=[rng.randint(1, min(m, 4)) for _ in range(count)], micro_batch_size=b,
        global_batch_size=m * b, memory_mb=[rng.choice(tiers).memory_mb for _ in range(count)],
        sync=syncs if rng.random() < 0.5 else syncs[0],
        schedule=schedule if schedule is not None else rng.choice(["gpipe", "1f1b"]),
    )
    return plan, profile, platform


def replayed(sim: Simulation, plan: Plan, stage: int, replica: int, *, synced: bool) -> None:
    """Check one worker's threads against its task list.

    Its compute spans are its forwards, backwards, sync (when it has parameters to all-reduce)
    and update in the list's order; it downloads what its ``recv`` tasks name in their order,
    each no earlier than the compute span before the ``recv`` ends (where the list posts it);
    it uploads what its ``send`` tasks name in their order, each no earlier than the compute
    span that produced it ends.
    """
    tasks = worker_tasks(stage, replica, replicas=plan.replicas, num_micro_batches=plan.num_micro_batches,
                         schedule=plan.schedule)
    names = {"forward": "F{}", "backward": "B{}", "sync": "sync", "update": "update"}
    program = [names[op].format(m) for op, m in tasks if op in names and (op != "sync" or synced)]
    compute = sim.timeline.lane(stage, replica, "compute")
    assert [s.label for s in compute] == program, (plan, stage, replica)
    ends = iter(s.end for s in compute)
    now = 0.0  # when the compute thread reaches the next task
    posted: list[tuple[str, float]] = []
    produced: list[tuple[str, float]] = []
    for op, m in tasks:
        if op in names and (op != "sync" or synced):
            now = next(ends)
        elif op == "recv":
            posted.append((f"{'input' if stage == 0 else 'act'} {m}", now))
        elif op == "recv_target":
            posted.append((f"target {m}", now))
        elif op == "recv_grad":
            posted.append((f"grad {m}", now))
        elif op in ("send", "send_grad"):
            produced.append((f"{'act' if op == 'send' else 'grad'} {m}", now))
    for lane, expected in (("download", posted), ("upload", produced)):
        transfers = [s for s in sim.timeline.lane(stage, replica, lane) if s.label not in ("chunk", "merged", "report")]
        assert [s.label for s in transfers] == [label for label, _ in expected], (plan, stage, replica, lane)
        for span, (_, at) in zip(transfers, expected, strict=True):
            assert span.start >= at - 1e-9, (plan, stage, replica, span, at)


@pytest.mark.parametrize("overlap", [True, False])
def test_random_plans_replay_every_task_list(overlap: bool) -> None:
    """No deadlock, and every worker runs its whole task list as :func:`replayed` checks, on
    random plans of both schedules (replica counts that divide the micro-batches or not, mixed
    syncs); without overlap too."""
    rng = random.Random(13)
    schedules = []
    for _ in range(150):
        plan, profile, platform = random_job(rng)
        schedules.append(plan.schedule)
        sim = simulate(plan, profile, platform, overlap=overlap)
        for st in costmodel.stage_costs(profile, platform, sim.plan):
            for replica in range(st.replicas):
                replayed(sim, plan, st.stage, replica, synced=st.param_bytes > 0)
        assert max(s.end for s in sim.timeline.spans) == pytest.approx(sim.iteration_s)
    assert {"gpipe", "1f1b"} <= set(schedules)


def test_lambdamls_runtime_reads_its_data_once_and_polls_by_listing() -> None:
    # One function, one micro-batch of 4: as funcpipe runs it, the input (4 x 1e5 B at 1 MB/s + 0.1 s)
    # and the target (4 x 1e4 B + 0.1 s) come down before the forward; as LambdaML runs it, its
    # partition is in memory.
    profile = ModelProfile((layer(1.0, 2.0, update=0.5),), input_bytes_per_sample=1e5, target_bytes_per_sample=1e4)
    plan = Plan.manual([1], micro_batch_size=4, global_batch_size=4, memory_mb=1024)
    fed = simulate(plan, profile, HAND)
    resident = simulate(plan, profile, HAND, runtime="lambdaml")
    assert fed.iteration_s - resident.iteration_s == pytest.approx((0.4 + 0.1) + (0.04 + 0.1))
    assert not [s for s in resident.timeline.spans if s.lane == "download"]
    assert resident.requests == dict.fromkeys(("put", "get", "miss", "list", "delete"), 0.0)
    assert fed.requests["put"] == 2 + 1 and fed.requests["get"] == 2 + 1  # input, target; the report
    with pytest.raises(ConfigError, match="runtime must be one of"):
        simulate(plan, profile, HAND, runtime="cached")


def test_a_stored_data_set_downloads_nothing_per_iteration_and_a_serverless_run_adds_its_go_object() -> None:
    # As the LambdaML case above: the shards are held, so no input or target comes down in an iteration,
    # and the driver writes neither (put 3 -> 1: the report); on a serverless platform (not "file"
    # storage) one go object more per iteration, read by stage 0's one replica.
    profile = ModelProfile((layer(1.0, 2.0, update=0.5),), input_bytes_per_sample=1e5, target_bytes_per_sample=1e4)
    plan = Plan.manual([1], micro_batch_size=4, global_batch_size=4, memory_mb=1024)
    fed = simulate(plan, profile, HAND)
    stored = simulate(plan, profile, HAND, data="stored")
    assert fed.iteration_s - stored.iteration_s == pytest.approx((0.4 + 0.1) + (0.04 + 0.1))
    assert not [s for s in stored.timeline.spans if s.lane == "download"]
    assert stored.requests["put"] == 1 and stored.requests["get"] == 1
    serverless = HAND.replace(storage="s3")
    fed_s3, stored_s3 = simulate(plan, profile, serverless), simulate(plan, profile, serverless, data="stored")
    beats = stored_s3.iteration_s / 5.0  # one worker's heartbeats, written and read
    assert stored_s3.requests["put"] == pytest.approx(1 + 1 + beats)  # the report, the go object
    assert stored_s3.requests["get"] == pytest.approx(1 + 1 + beats)
    assert fed_s3.requests["put"] - fed_s3.iteration_s / 5.0 == pytest.approx(2 + 1)
    with pytest.raises(ConfigError, match="data must be one of"):
        simulate(plan, profile, HAND, data="cached")


def test_polls_count_the_reads_before_an_object_exists_and_the_delay_after() -> None:
    from funcpipe.simulator import polls

    # reads at 0, 0.2 (after 0.1 s + 0.1 s), 0.5 (0.1 + 0.2), 1.0, 1.5 (0.1 + 0.4, the cap) ...
    assert polls(1.0, 0.1, 0.1, 0.4) == (3, pytest.approx(0.0, abs=1e-12))
    misses, delay = polls(1.2, 0.1, 0.1, 0.4)
    assert misses == 4 and delay == pytest.approx(0.3)
    assert polls(0.0, 0.1, 0.1, 0.4) == (0, 0.0)  # there already
    misses, delay = polls(0.25, 0.1, 0.0, 0.0)  # back to back, one round trip each
    assert misses == 3 and delay == pytest.approx(0.05)


def test_lambdaml_lists_while_it_waits_and_deletes_what_it_read() -> None:
    profile = ModelProfile((layer(1.0, 2.0, params=10**6),), input_bytes_per_sample=10.0, target_bytes_per_sample=1.0)
    # Three workers, four micro-batches: replica 0 trains two, so its peers wait for its shares.
    plan = Plan.manual([1], replicas=[3], micro_batch_size=1, global_batch_size=4, memory_mb=1024, sync="four_phase")
    sim = simulate(plan, profile, HAND, runtime="lambdaml")
    assert sim.requests["delete"] == 3 * 2 + 1
    # Every replica LISTs once per share and merged chunk it reads (3 x 2 x 2), the two that wait
    # about 3 s for replica 0's shares once per round trip (0.1 s) meanwhile; one for the batch delete.
    assert sim.requests["list"] >= 3 * 2 * 2 + 1 + 2 * 25
    assert sim.requests["miss"] == 0 and sim.requests["put"] == 3 * 3 and sim.requests["get"] == 3 * 2 * 2
    priced = HAND.replace(price_per_list=1.0)
    assert simulate(plan, profile, priced, runtime="lambdaml").cost_usd == pytest.approx(
        sim.cost_usd + sim.requests["list"])


def test_funcpipe_polls_with_the_storage_back_off_and_pays_for_the_misses() -> None:
    profile = ModelProfile((layer(1.0, 2.0, out=1e4), layer(1.0, 1.0)), input_bytes_per_sample=1e4,
                           target_bytes_per_sample=1.0)
    plan = Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2, memory_mb=1024)
    instant = simulate(plan, profile, HAND)
    polled = HAND.replace(poll_initial_s=0.05, poll_max_s=0.4, price_per_miss=1.0)
    sim = simulate(plan, profile, polled)
    assert sim.requests["miss"] > 2  # stage 1 waits for activations, stage 0 for gradients, stop reads
    assert sim.iteration_s > instant.iteration_s  # found by the next read, not the moment it exists
    assert sim.cost_usd >= instant.cost_usd + sim.requests["miss"] - 1e-9
