"""benchmarks/emulate.py's pieces that need no Ray and no timing: platform, planning, CPU accounting."""

from __future__ import annotations

import argparse

import pytest
from benchmarks import emulate

import funcpipe
from funcpipe import Plan
from funcpipe.profiler import LayerProfile, ModelProfile


def _profile() -> ModelProfile:
    layer = LayerProfile(
        name="x", forward_alpha_s=0.001, forward_beta_s=0.002, backward_alpha_s=0.002, backward_beta_s=0.004,
        param_bytes=4_000_000, optimizer_bytes=0, update_s=0.001, output_bytes_per_sample=4096.0,
        held_bytes_per_sample=8192.0,
    )
    return ModelProfile((layer,) * 6, input_bytes_per_sample=4096.0, target_bytes_per_sample=8.0)


def test_emulated_platform_keeps_lambdas_tiers_with_one_thread_and_the_scaled_link() -> None:
    spec = emulate.emulated_platform(17.5, 30.0)
    lam = funcpipe.platforms.get("aws_lambda")
    assert [t.memory_mb for t in spec.tiers] == [t.memory_mb for t in lam.tiers]
    assert {(t.speed, t.vcpus, t.uplink_mb_s, t.downlink_mb_s) for t in spec.tiers} == {(1.0, 1.0, 17.5, 17.5)}
    assert spec.latency_s == pytest.approx(0.03)
    assert spec.price_per_gb_s == lam.price_per_gb_s


def test_unlimited_link_leaves_only_compute() -> None:
    profile = _profile()
    plan = Plan.manual([6], micro_batch_size=4, global_batch_size=8, memory_mb=1024)
    spec = emulate.unlimited(emulate.emulated_platform(17.5, 30.0))
    compute = sum(2 * (lp.forward_s(4) + lp.backward_s(4)) + lp.update_s for lp in profile.layers)
    assert funcpipe.simulate(plan, profile, spec).iteration_s == pytest.approx(compute, rel=1e-6)


def test_funcpipe_plans_use_at_most_max_workers() -> None:
    spec = emulate.emulated_platform(17.5, 30.0)
    args = argparse.Namespace(micro_batch_sizes=[4], max_workers=3, time_limit_s=2.0)
    plan, tried = emulate.plan_funcpipe(_profile(), spec, args)
    assert plan.num_workers <= 3
    assert {(t["max_stages"], t["max_replicas"]) for t in tried} == {(1, 3), (2, 1), (3, 1)}
    assert plan.predicted_iteration_s == min(t["predicted_iteration_s"] for t in tried if "plan" in t)


def test_cpu_share_splits_ours_from_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emulate.os, "cpu_count", lambda: 2)
    before = {"busy": 0.0, "steal": 0.0, "total": 0.0, "ours_s": 10.0, "wall": 100.0}
    # 10 s on 2 CPUs = 2000 jiffies at 100 Hz: 1.5 cores busy, 0.1 stolen; the benchmark used 1.0 core.
    after = {"busy": 1500.0, "steal": 100.0, "total": 2000.0, "ours_s": 20.0, "wall": 110.0}
    share = emulate.cpu_share(before, after)
    assert share == pytest.approx({"busy_cores": 1.5, "our_cores": 1.0, "other_cores": 0.5, "steal_cores": 0.1})
    assert emulate.cpu_share({}, after) == {}


def test_options_scale_lambdas_bandwidth() -> None:
    args = emulate.parse_args(["--bandwidth-factor", "7"])
    assert args.bandwidth_mb_s == pytest.approx(10.0)
    assert args.latency_ms == pytest.approx(10.0)  # Lambda's 30 ms / 3
    assert emulate.parse_args(["--bandwidth-mb-s", "5"]).bandwidth_mb_s == 5.0
    with pytest.raises(SystemExit):
        emulate.parse_args(["--micro-batch-sizes", "5"])
