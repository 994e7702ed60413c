"""benchmarks/emulate_scale.py's pieces that need no timing: the synthetic model, scaling, request classification."""

from __future__ import annotations

import pytest
import torch
from benchmarks import emulate_scale

import funcpipe
from funcpipe import Plan, protocol
from funcpipe.profiler import LayerProfile, ModelProfile
from funcpipe.storage.counting import Request


def _layer(params: int, out: float) -> LayerProfile:
    return LayerProfile(
        name="x", forward_alpha_s=0.0, forward_beta_s=0.0, backward_alpha_s=0.0, backward_beta_s=0.0,
        param_bytes=params, optimizer_bytes=params, update_s=0.0, output_bytes_per_sample=out,
        held_bytes_per_sample=0.0,
    )


def _profile() -> ModelProfile:
    layers = (_layer(4_000_000, 4096.0), _layer(0, 2048.0), _layer(40_000_000, 40.0))
    return ModelProfile(layers, input_bytes_per_sample=1024.0, target_bytes_per_sample=8.0)


def _plan() -> Plan:
    return Plan.manual([2, 1], replicas=[2, 3], micro_batch_size=2, global_batch_size=12,
                       memory_mb=[10240, 10240])


def test_the_sleep_model_holds_and_sends_the_profiled_bytes_times_k() -> None:
    profile, plan = _profile(), _plan()
    model = emulate_scale.sleep_model(profile, plan, funcpipe.platforms.get("aws_lambda"), 0.5)
    assert [protocol.gradient_bytes(layer.parameters()) for layer in model] == [2_000_000, 0, 20_000_000]
    x, y = emulate_scale.sleep_batches(profile, 0.5, 1)[0]
    assert x.shape == (64, 128) and y.shape == (64, 1)
    out = model(x[:2])
    assert out.shape == (2, 5)  # 40 bytes × 0.5 = 5 float32 per sample
    emulate_scale.free_loss(out, y[:2]).backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert [(layer.first_in_stage, layer.last_in_stage) for layer in model] == [(True, False), (False, True),
                                                                              (True, True)]


def test_scaling_keeps_every_transfer_and_the_piece_count() -> None:
    profile, plan = _profile(), _plan()
    spec = funcpipe.platforms.get("aws_lambda")
    k = 0.25
    scaled = emulate_scale.scaled_profile(profile, k)
    assert scaled.param_bytes == pytest.approx(k * profile.param_bytes)
    with emulate_scale.PieceBytes(k):
        emulated = funcpipe.simulate(plan, scaled, emulate_scale.scaled_spec(spec, k)).iteration_s
        inside = protocol.piece_count(int(k * 40_000_000), 3)
    # float32 elements round the bytes: within microseconds
    assert emulated == pytest.approx(funcpipe.simulate(plan, profile, spec).iteration_s, rel=1e-5)
    assert inside == protocol.piece_count(40_000_000, 3) > 1
    assert protocol.piece_count(int(k * 40_000_000), 3) < inside  # restored outside the block


def test_scale_for_fits_the_budget() -> None:
    profile, plan = _profile(), _plan()
    need = emulate_scale.estimated_bytes(profile, plan)
    assert emulate_scale.scale_for(profile, plan, 2 * need) == 1.0
    k = emulate_scale.scale_for(profile, plan, need / 10)
    assert 0.05 < k <= 0.1


def test_requests_are_classified_by_iteration_kind_and_client() -> None:
    log = emulate_scale.RequestLog()
    key = "job/a0/i00000003/act.s1.r0.m2"
    log(Request("GET", key, False, 0, 1, "funcpipe-stage 1 replica 0_0"))
    log(Request("PUT", key, None, 10, 1, "funcpipe-stage 0 replica 0_0"))
    log(Request("GET", key, True, 10, 1, "funcpipe-stage 1 replica 0_0"))
    log(Request("GET", "job/a0/stop.from00000000", False, 0, 1, "funcpipe-stage 1 replica 0_0"))
    log(Request("DELETE", "job/a0/i00000002/input.s0.r0.m0", None, 0, 5, "MainThread"))
    counts = log.per_iteration(range(3, 4), total_iterations=2)
    assert counts["ops"] == {"PUT": 1, "GET": 1, "GET_miss": 1.5, "HEAD": 0, "LIST": 0, "DELETE": 0}
    assert counts["by_kind"]["stop"] == {"GET_miss": 0.5}
    assert counts["by_who"] == {"worker": {"PUT": 1, "GET": 1, "GET_miss": 1.5}}
    delays = log.read_delays(range(3, 4))
    assert list(delays) == ["act"] and delays["act"]["waited"] == 1


def test_effective_poll_is_raised_to_half_the_latency() -> None:
    assert emulate_scale.effective_poll("s3", 0.03) == (0.015, 0.2)
    assert emulate_scale.effective_poll("memory", 0.03) == (0.015, 0.015)


def test_options() -> None:
    args = emulate_scale.parse_args(["--models", "bert_large", "--systems", "lambdaml", "--scale", "0.1"])
    assert args.models == ["bert_large"] and args.systems == ["lambdaml"] and args.scale == 0.1
    with pytest.raises(SystemExit):
        emulate_scale.parse_args(["--models", "vgg"])
    assert torch.get_num_threads() >= 1
