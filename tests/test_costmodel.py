"""The cost model's closed formulas against values worked out by hand."""

from __future__ import annotations

import pytest

from funcpipe import Plan, costmodel
from funcpipe.platforms import Tier
from funcpipe.profiler import ModelProfile
from tests.test_simulator import HAND, layer

LINK = Tier(memory_mb=1024, vcpus=1.0, speed=1.0, uplink_mb_s=100.0, downlink_mb_s=100.0)  # 10**8 bytes/s
P = 64 * 2**20


def test_pipelined_sync_counts_pieces() -> None:
    # Two replicas: chunks of 32 MiB in 8 pieces of 4 MiB. Upload: P bytes + 2 x 8 requests;
    # download: P bytes (2(d-1)/d = 1) + one latency; plus one piece up and one down, and
    # two latencies, to fill and drain the pipeline.
    upload = P / 1e8 + 2 * 8 * 0.01
    fill = 2 * (4 * 2**20) / 1e8 + 2 * 0.01
    assert costmodel.sync_s(P, 2, LINK, 0.01, "pipelined") == pytest.approx(upload + fill)


def test_four_phase_sync_is_four_phases() -> None:
    chunk = P / 2 / 1e8 + 0.01  # one 32 MiB chunk, either way
    assert costmodel.sync_s(P, 2, LINK, 0.01, "four_phase") == pytest.approx(4 * chunk)


def test_no_sync_without_replicas_or_parameters() -> None:
    assert costmodel.sync_s(P, 1, LINK, 0.01, "pipelined") == 0.0
    assert costmodel.sync_s(0, 4, LINK, 0.01, "pipelined") == 0.0


def test_memory_of_a_replica() -> None:
    # 100 MB runtime, 2 x 10 MB weights and gradients, 20 MB optimizer state, 2 x 10 MB of
    # all-reduce buffers (replicas), and 3 micro-batches of 1 MB held + 0.5 MB of messages.
    needed = costmodel.memory_bytes(
        HAND, param_bytes=10 * 2**20, optimizer_bytes=20 * 2**20, held_bytes=2**20, message_bytes=2**19,
        micro_batches=3, replicas=2,
    )
    assert needed == (100 + 20 + 20 + 20) * 2**20 + 3 * (2**20 + 2**19)


def test_requests_of_an_iteration() -> None:
    # 4 micro-batches, 2 stages: the driver writes 4 inputs and 4 targets, the boundary
    # carries 4 activations and 4 gradients; stage 0's two replicas each write 2 x 1 pieces
    # and read 2 x 1; the last stage's one replica writes a report that the driver reads.
    profile = ModelProfile((layer(0.1, 0.2, params=1000, out=10.0), layer(0.1, 0.2)), 10.0, 8.0)
    plan = Plan.manual([1, 1], replicas=[2, 1], micro_batch_size=1, global_batch_size=4, memory_mb=1024)
    stages = costmodel.stage_costs(profile, HAND, plan)
    assert costmodel.requests_per_iteration(stages, plan) == (8 + 8 + 4 + 1, 8 + 8 + 4 + 1)
