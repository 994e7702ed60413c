"""Cost model: what a plan costs on a platform, in seconds, bytes and dollars.

Everything here is a closed formula of the profile, the platform and the
plan. The planner (:mod:`funcpipe.planner`) encodes the same formulas as
CP-SAT constraints; the simulator (:mod:`funcpipe.simulator`) replays the
schedule event by event and is the reference both are checked against.

Transfers follow the storage model of :class:`funcpipe.storage.ThrottledStorage`:
a request of ``x`` bytes holds the function's link for ``x / bandwidth`` and
then pays the platform's latency; one function's uploads share its uplink and
its downloads share its downlink.

**Iteration time.** For stage ``s`` with ``n`` micro-batches per worker,
per-micro-batch forward ``f`` and backward ``g`` at the tier's speed, and the
transfer times ``dn_in`` (input), ``dn_tgt`` (target, last stage),
``dn_grad`` (output gradient), ``up_out`` (output), ``up_gin`` (input
gradient), the formula is a max-plus recursion over the pipeline (times of
the worker with the most micro-batches)::

    A[0] = 0                                   first input of stage s available
    H[s] = A[s] + dn_in + dn_tgt               first forward can start
    A[s+1] = H[s] + f + up_out
    F[s] = max(H + n f,                        own compute
               F[s-1] + up_out[s-1] + dn_in + f,          last micro-batch's wave
               H[s-1] + f[s-1] + n[s-1] up_out[s-1] + dn_in + f,  upstream uplink
               A + n (dn_in + dn_tgt) + f)                own downlink
    G[s] = B0[s+1] + up_gin[s+1] + dn_grad       first gradient's arrival (not last)
    B0[s] = max(H + f, F, G) + g  (not last), H + f + g  (last)   end of the first backward
    E[s] = max(H + n (f + g),  F + g,           end of the last backward
               max(F, G) + n g                      (not last: GPipe order),
               E[s+1] + up_gin[s+1] + dn_grad + g   (not last),
               H[s+1] + f[s+1] + n[s+1] (up_out + up_gin)[s+1] + dn_grad + g  (not last),
               B0[s+1] + n[s+1] up_gin[s+1] + dn_grad + g  (not last: next stage's gradient uplink),
               G + n dn_grad + g  (not last: own gradient downlink),
               A + n (dn_in + dn_grad + dn_tgt) + g)
    end[s] = max(E + upd, E + up_gin, E + up_gin + sync + upd  (replicas > 1))
             + up_report  (last stage: the driver's report goes up after the update)
    iteration = max over s of end[s]

It is a set of lower bounds on the critical paths through the compute,
uplink and downlink of each stage, and is exact for a single stage and for
balanced pipelines; the simulator catches what it misses, and the planner
re-ranks its best candidates with the simulator.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from funcpipe.collectives import PIECE_BYTES, piece_count
from funcpipe.errors import ConfigError, PlanInfeasible
from funcpipe.plan import Plan
from funcpipe.platforms.base import MB_RATE, MIB, Platform, Tier
from funcpipe.profiler import ModelProfile

__all__ = [
    "FETCH_CONNECTIONS",
    "REPORT_BYTES",
    "Held",
    "StageCost",
    "cost_per_iteration",
    "formula_iteration_s",
    "held",
    "memory_terms",
    "requests_per_iteration",
    "stage_costs",
    "stage_memory_bytes",
    "sync_s",
]

#: Bytes of the per-iteration report the last stage writes for the driver.
REPORT_BYTES = 64

#: Parallel download connections of a worker's all-reduce (as in :mod:`funcpipe.worker`).
FETCH_CONNECTIONS = 4


@dataclasses.dataclass(frozen=True)
class StageCost:
    """One stage of a plan, priced on one platform tier. Times are seconds, sizes bytes.

    Attributes:
        stage: the stage index.
        layers: the model layers the stage owns.
        tier: the function size each replica runs on.
        replicas: data-parallel degree.
        micro_batches: most micro-batches one replica runs per iteration, ``ceil(M / replicas)``.
        forward_s, backward_s: one micro-batch at the tier's speed (the last stage's
            backward includes the loss).
        update_s: one optimizer step over the stage's parameters.
        input_bytes: what one micro-batch brings in (stage 0: the model input).
        output_bytes: what one micro-batch sends on (0 for the last stage); its
            gradient comes back at the same size.
        target_bytes: one micro-batch's targets (last stage only, else 0).
        param_bytes: bytes of the stage's trainable parameters.
        memory_bytes: what one replica needs: runtime, weights, gradients,
            optimizer state, activations held for backward, buffered messages and
            all-reduce buffers.
    """

    stage: int
    layers: range
    tier: Tier
    replicas: int
    micro_batches: int
    forward_s: float
    backward_s: float
    update_s: float
    input_bytes: float
    output_bytes: float
    target_bytes: float
    param_bytes: int
    memory_bytes: int

    def up_s(self, nbytes: float, latency_s: float) -> float:
        """Seconds one upload of ``nbytes`` takes from this stage."""
        return nbytes / (self.tier.uplink_mb_s * MB_RATE) + latency_s

    def down_s(self, nbytes: float, latency_s: float) -> float:
        """Seconds one download of ``nbytes`` takes into this stage."""
        return nbytes / (self.tier.downlink_mb_s * MB_RATE) + latency_s


def stage_costs(profile: ModelProfile, platform: Platform, plan: Plan) -> tuple[StageCost, ...]:
    """Price every stage of ``plan`` on ``platform``.

    A plan without ``memory_mb`` gets, per stage, the smallest tier its replicas fit.

    Raises:
        ConfigError: the plan does not cut this profile's layers, or names a memory
            size the platform does not offer.
        PlanInfeasible: a stage does not fit its memory (or any tier).
    """
    if sum(plan.balance) != profile.num_layers:
        raise ConfigError(
            f"the plan cuts {sum(plan.balance)} layers (balance {list(plan.balance)}) but the "
            f"profile has {profile.num_layers}; hint: plan and profile must describe the same model"
        )
    b = plan.micro_batch_size
    m = plan.num_micro_batches
    last = plan.num_stages - 1
    stages = []
    for s in range(plan.num_stages):
        layers = plan.layer_range(s)
        profiles = profile.layers[layers.start : layers.stop]
        d = plan.replicas[s]
        n = -(-m // d)
        before = profile.input_bytes_per_sample if s == 0 else profile.layers[layers.start - 1].output_bytes_per_sample
        input_bytes = before * b
        output_bytes = 0.0 if s == last else profiles[-1].output_bytes_per_sample * b
        target_bytes = profile.target_bytes_per_sample * b if s == last else 0.0
        params = sum(p.param_bytes for p in profiles)
        needed = stage_memory_bytes(profile, platform, plan, s)
        if plan.memory_mb is not None:
            tier = platform.tier(plan.memory_mb[s])
            if needed > tier.memory_mb * MIB:
                raise PlanInfeasible(
                    f"stage {s} (layers {layers.start}-{layers.stop - 1}, {d} replica(s)) needs "
                    f"{needed / MIB:.0f} MB per function but its tier has {tier.memory_mb} MB; hint: "
                    "a larger tier, more replicas, fewer layers in the stage or smaller micro-batches"
                )
        else:
            fitting = [t for t in platform.tiers if needed <= t.memory_mb * MIB]
            if not fitting:
                raise PlanInfeasible(
                    f"stage {s} (layers {layers.start}-{layers.stop - 1}) needs {needed / MIB:.0f} MB per "
                    f"function, more than the largest tier of {platform.name} "
                    f"({platform.tiers[-1].memory_mb} MB); hint: cut it into more stages"
                )
            tier = fitting[0]
        speed = tier.speed
        stages.append(
            StageCost(
                stage=s,
                layers=layers,
                tier=tier,
                replicas=d,
                micro_batches=n,
                forward_s=sum(p.forward_s(b) for p in profiles) / speed,
                backward_s=sum(p.backward_s(b) for p in profiles) / speed,
                update_s=sum(p.update_s for p in profiles) / speed,
                input_bytes=input_bytes,
                output_bytes=output_bytes,
                target_bytes=target_bytes,
                param_bytes=params,
                memory_bytes=needed,
            )
        )
    return tuple(stages)


@dataclasses.dataclass(frozen=True)
class Held:
    """What one replica of a stage holds at its peak, in micro-batches (:func:`held`).

    Attributes:
        activations: micro-batches whose activations (autograd's saved tensors and the
            stage's output) are alive: forward done, backward not.
        inputs: input micro-batches downloaded or kept for backward.
        grads: output gradients downloaded ahead of their backward (0 on the last stage).
        targets: target micro-batches downloaded (last stage only).
    """

    activations: int
    inputs: int
    grads: int
    targets: int


def held(schedule: str, *, last: bool, micro_batches: int, in_flight: int) -> Held:
    """What one replica holds at its peak under ``schedule`` (:mod:`funcpipe.schedule`).

    ``micro_batches`` is the replica's count ``n``, ``in_flight`` its 1F1B window ``k``
    (:func:`funcpipe.schedule.in_flight`). GPipe prefetches the whole iteration: ``n``
    inputs (and targets, or output gradients), and ``n`` activations on a stage that is
    not the last (whose backward follows each forward). 1F1B holds ``k`` activations,
    ``k + 1`` inputs and one output gradient; the last stage ``k = 1`` and two inputs and
    targets.
    """
    n, k = micro_batches, min(in_flight, micro_batches)
    if schedule == "gpipe":
        return Held(1, n, 0, n) if last else Held(n, n, n, 0)
    if last:
        return Held(min(n, 1), min(n, 2), 0, min(n, 2))
    return Held(k, min(n, k + 1), min(n, 1), 0)


def stage_memory_bytes(profile: ModelProfile, platform: Platform, plan: Plan, stage: int) -> int:
    """Memory one replica of ``plan``'s stage ``stage`` needs, in bytes (:func:`memory_bytes` of its layers)."""
    layers = plan.layer_range(stage)
    profiles = profile.layers[layers.start : layers.stop]
    b = plan.micro_batch_size
    last = stage == plan.num_stages - 1
    before = profile.input_bytes_per_sample if stage == 0 else profile.layers[layers.start - 1].output_bytes_per_sample
    output = 0.0 if last else profiles[-1].output_bytes_per_sample
    target = profile.target_bytes_per_sample if last else 0.0
    d = plan.replicas[stage]
    n = -(-plan.num_micro_batches // d)
    return memory_bytes(
        platform,
        param_bytes=sum(p.param_bytes for p in profiles),
        optimizer_bytes=sum(p.optimizer_bytes for p in profiles),
        held_bytes=sum(p.held_bytes_per_sample for p in profiles) * b,
        input_bytes=before * b,
        output_bytes=output * b,
        target_bytes=target * b,
        replicas=d,
        counts=held(plan.schedule, last=last, micro_batches=n, in_flight=plan.in_flight(stage)),
    )


def memory_bytes(
    platform: Platform,
    *,
    param_bytes: float,
    optimizer_bytes: float,
    held_bytes: float,
    input_bytes: float,
    output_bytes: float,
    target_bytes: float,
    replicas: int,
    counts: Held,
) -> int:
    """Memory one replica of a stage needs, in bytes: :func:`memory_terms`, rounded up."""
    return int(math.ceil(memory_terms(
        platform, param_bytes=param_bytes, optimizer_bytes=optimizer_bytes, held_bytes=held_bytes,
        input_bytes=input_bytes, output_bytes=output_bytes, target_bytes=target_bytes, replicas=replicas,
        activations=counts.activations, inputs=counts.inputs, grads=counts.grads, targets=counts.targets,
    )))


def memory_terms(
    platform: Platform,
    *,
    param_bytes: Any,
    optimizer_bytes: Any,
    held_bytes: Any,
    input_bytes: Any,
    output_bytes: Any,
    target_bytes: Any,
    replicas: Any,
    activations: Any,
    inputs: Any,
    grads: Any,
    targets: Any,
) -> Any:
    """Memory one replica of a stage needs, in bytes, before rounding up.

    Runtime overhead, weights and gradients (``2 P``), optimizer state; per
    micro-batch whose activations are alive, what autograd saves for backward
    and the stage's output; the inputs, output gradients and targets the
    schedule buffers (:func:`held`). With replicas, the all-reduce holds the
    flat gradient and the result (``2 P`` more).

    Only sums and products: every argument may be a float or a numpy array (the
    planner's programs evaluate it over every stage, tier and replica count at
    once, with the same operations in the same order), and it is linear in each
    count (the 1F1B window of :mod:`funcpipe.planner.dp` relies on it).
    """
    synced = (replicas > 1) * 1.0
    return (
        platform.runtime_overhead_mb * MIB
        + 2 * param_bytes
        + optimizer_bytes
        + synced * (2 * param_bytes)
        + activations * (held_bytes + output_bytes)
        + inputs * input_bytes
        + grads * output_bytes
        + targets * target_bytes
    )


def sync_s(param_bytes: float, replicas: int, tier: Tier, latency_s: float, algorithm: str) -> float:
    """Seconds the formula gives one all-reduce of ``param_bytes`` among ``replicas``.

    Pipelined: ``replicas * q`` uploads (``q`` pieces per chunk) carry ``P``
    bytes in all; ``2 (d-1) q`` downloads carry ``2 (d-1)/d P`` over
    :data:`FETCH_CONNECTIONS` connections whose latencies overlap; upload and
    download overlap. Four-phase: four phases one after the other.
    """
    d = replicas
    if d <= 1 or param_bytes <= 0:
        return 0.0
    up = tier.uplink_mb_s * MB_RATE
    down = tier.downlink_mb_s * MB_RATE
    if algorithm == "four_phase":
        chunk = param_bytes / d
        return (
            (d - 1) * (chunk / up + latency_s)
            + (d - 1) * (chunk / down + latency_s)
            + (chunk / up + latency_s)
            + (d - 1) * (chunk / down + latency_s)
        )
    q = piece_count(int(param_bytes), d)
    upload = param_bytes / up + d * q * latency_s
    download = max(
        2 * (d - 1) / d * param_bytes / down + latency_s,
        (d - 1) / 2 * q * latency_s + (d - 1) / (2 * d) * param_bytes / down,
    )
    # Fill and drain: the first piece goes up before anyone can fetch it, the last
    # merged piece comes down after its upload. (A piece is at most PIECE_BYTES.)
    piece = min(param_bytes / d, PIECE_BYTES)
    return max(upload, download) + piece / up + piece / down + 2 * latency_s


def formula_iteration_s(stages: Sequence[StageCost], platform: Platform, plan: Plan) -> float:
    """Iteration seconds by the closed formula (see the module docstring)."""
    lat = platform.latency_s
    count = len(stages)
    dn_in = [st.down_s(st.input_bytes, lat) for st in stages]
    dn_tgt = [st.down_s(st.target_bytes, lat) if st.stage == count - 1 else 0.0 for st in stages]
    dn_grad = [st.down_s(st.output_bytes, lat) if st.stage < count - 1 else 0.0 for st in stages]
    up_out = [st.up_s(st.output_bytes, lat) if st.stage < count - 1 else 0.0 for st in stages]
    up_gin = [st.up_s(st.input_bytes, lat) if st.stage > 0 else 0.0 for st in stages]
    f = [st.forward_s for st in stages]
    g = [st.backward_s for st in stages]
    n = [st.micro_batches for st in stages]

    a = [0.0] * count  # first input of the stage in storage
    h = [0.0] * count  # first forward can start
    fw = [0.0] * count  # last forward ends
    uo = [0.0] * count  # last activation uploaded (the gradients queue behind it)
    for s in range(count):
        if s:
            a[s] = h[s - 1] + f[s - 1] + up_out[s - 1]
        h[s] = a[s] + dn_in[s] + dn_tgt[s]
        fw[s] = max(h[s] + n[s] * f[s], a[s] + n[s] * (dn_in[s] + dn_tgt[s]) + f[s])
        if s:
            fw[s] = max(fw[s], uo[s - 1] + dn_in[s] + f[s])
        if s < count - 1:
            uo[s] = max(h[s] + f[s] + n[s] * up_out[s], fw[s] + up_out[s])
    # GPipe: micro-batch 0's backward at a stage that is not last waits for all the
    # stage's forwards; its gradient then waits for the activations queued on the uplink
    # before it, and travels down. 1F1B: it waits only for its own forward and its gradient
    # (the rest of the stage's forwards interleave with its backwards).
    gpipe = plan.schedule == "gpipe"
    b0 = [0.0] * count  # first backward ends
    grad0 = [0.0] * count  # first gradient arrives
    for s in reversed(range(count)):
        if s == count - 1:
            b0[s] = h[s] + f[s] + g[s]
        else:
            sent = max(b0[s + 1], uo[s + 1]) if gpipe else b0[s + 1]
            grad0[s] = sent + up_gin[s + 1] + dn_grad[s]
            b0[s] = max(h[s] + f[s], fw[s] if gpipe else 0.0, grad0[s]) + g[s]
    e = [0.0] * count  # last backward ends
    for s in reversed(range(count)):
        e[s] = max(
            h[s] + n[s] * (f[s] + g[s]),
            fw[s] + g[s],
            a[s] + n[s] * (dn_in[s] + dn_grad[s] + dn_tgt[s]) + g[s],
        )
        if s < count - 1:
            nx = s + 1
            # The next stage's uplink carries all its activations and input gradients; its
            # last input gradient is for this stage's last backward.
            uplink = (max(b0[nx], uo[nx]) + n[nx] * up_gin[nx] if gpipe
                      else max(b0[nx] + n[nx] * up_gin[nx], h[nx] + f[nx] + n[nx] * (up_out[nx] + up_gin[nx])))
            e[s] = max(
                e[s],
                (max(fw[s], grad0[s]) if gpipe else grad0[s]) + n[s] * g[s],
                e[nx] + up_gin[nx] + dn_grad[s] + g[s],
                uplink + dn_grad[s] + g[s],
                grad0[s] + n[s] * dn_grad[s] + g[s],
            )
    end_max = 0.0
    for s, st in enumerate(stages):
        end = max(e[s] + st.update_s, e[s] + up_gin[s])
        if st.replicas > 1:
            sync = sync_s(st.param_bytes, st.replicas, st.tier, lat, plan.stage_sync(s))
            end = max(end, e[s] + up_gin[s] + sync + st.update_s)
        if s == count - 1:  # the report for the driver goes up after the update
            end += st.up_s(REPORT_BYTES, lat)
        end_max = max(end_max, end)
    return end_max


def requests_per_iteration(stages: Sequence[StageCost], plan: Plan) -> tuple[int, int]:
    """Storage ``(writes, reads)`` of one iteration: messages, all-reduce pieces and reports.

    The driver writes each micro-batch's input and target; every boundary
    carries an activation and a gradient per micro-batch; each replica of a
    synced stage writes ``d q`` pieces and reads ``2 (d-1) q`` (four-phase:
    ``d`` and ``2 (d-1)``); each last-stage replica writes a report the driver reads.
    Polls for objects not there yet are not counted.
    """
    m = plan.num_micro_batches
    boundaries = len(stages) - 1
    writes = 2 * m + 2 * m * boundaries
    reads = 2 * m + 2 * m * boundaries
    for st in stages:
        d = st.replicas
        if d > 1 and st.param_bytes > 0:
            q = 1 if plan.stage_sync(st.stage) == "four_phase" else piece_count(st.param_bytes, d)
            writes += d * d * q
            reads += d * 2 * (d - 1) * q
    writes += stages[-1].replicas
    reads += stages[-1].replicas
    return writes, reads


def cost_per_iteration(
    iteration_s: float, stages: Sequence[StageCost], plan: Plan, platform: Platform
) -> float:
    """Dollars one iteration costs: functions billed for the whole iteration, plus requests.

    Every function runs for the whole iteration (it waits for its peers, and
    the platform bills waiting), so compute is ``iteration_s * sum(price of
    each replica's tier)``. Invocations are spread over the iterations one
    invocation lives (the lifetime limit), storage requests are counted per
    iteration.
    """
    compute = iteration_s * sum(st.replicas * platform.price_per_s(st.tier) for st in stages)
    writes, reads = requests_per_iteration(stages, plan)
    per_invocation = max(1, math.floor(platform.lifetime_s / max(iteration_s, 1e-9)))
    invocations = sum(st.replicas for st in stages) * platform.price_per_invocation / per_invocation
    return compute + writes * platform.price_per_put + reads * platform.price_per_get + invocations
