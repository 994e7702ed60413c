"""The simulator against timelines worked out by hand, span by span."""

from __future__ import annotations

import pytest

from funcpipe import Plan, PlanInfeasible, simulate
from funcpipe.platforms import Platform, Tier
from funcpipe.profiler import LayerProfile, ModelProfile

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
    profile = ModelProfile((layer(1.0, 2.0, params=400 * 2**20),), input_bytes_per_sample=1e5,
                           target_bytes_per_sample=1e5)
    sim = simulate(Plan.manual([1], micro_batch_size=1, global_batch_size=2), profile, two_tiers)
    # 100 MB runtime + 2 x 400 MB weights and gradients: 900 MB fits 1024; with a replica's
    # all-reduce buffers (2 x 400 MB more) it does not fit at all.
    assert sim.plan.memory_mb == (1024,)
    with pytest.raises(PlanInfeasible, match="needs 1700 MB"):
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
