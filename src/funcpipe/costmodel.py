"""Cost model: what a plan costs on a platform, in seconds, bytes and dollars.

Everything here is a closed formula of the profile, the platform and the
plan. The planner (:mod:`funcpipe.planner`) encodes the same formulas as
CP-SAT constraints; the simulator (:mod:`funcpipe.simulator`) replays the
schedule event by event and is the reference both are checked against.

Transfers follow the storage model of :class:`funcpipe.storage.ThrottledStorage`:
a request of ``x`` bytes holds the function's link for ``x / bandwidth`` and
then pays the platform's latency; one function's uploads share its uplink and
its downloads share its downlink.

**Iteration time.** For stage ``s`` with ``d`` replicas, ``n = ceil(M / d)``
micro-batches on its replica 0 (the most; replica 0 also runs micro-batch 0)
and ``n_min = floor(M / d)`` on its least busy one, the 1F1B window ``k``
(:func:`funcpipe.schedule.in_flight`, at most ``n``), per-micro-batch forward
``f`` and backward ``g`` at the tier's speed, the update ``upd``, and the
transfer times ``dn_in`` (input), ``dn_tgt`` (target, last stage), ``dn_grad``
(output gradient, not last), ``up_out`` (output, not last), ``up_gin`` (input
gradient, not first), the formula is a max-plus recursion over the pipeline
(``'`` marks stage ``s+1``, ``[s-1]`` the stage before)::

    A = H[s-1] + f[s-1] + up_out[s-1]  (A = 0 for stage 0)    first input in storage
    H = A + dn_in + dn_tgt                                     first forward can start
    F0 = max(H + n f + i, A + n (dn_in + dn_tgt) + f)          replica 0's last forward
         i = 0 (GPipe, or the last stage), max(0, n - k) g (1F1B: the backwards before it)
    F  = max(F0, U[s-1] + dn_in + f)                           any replica's (the last wave)
         (F0 = F with one replica)
    U0 = max(H + f + n up_out, F0 + up_out),  U = max(U0, F + up_out)   last activation up
    G  = S' + up_gin' + dn_grad                                micro-batch 0's gradient arrives
         S' = max(B0', U0') (GPipe), B0' (1F1B)                    (its upload, queued)
    B0 = H + f + g (last stage), else                          micro-batch 0's backward ends
         max(H + f, G, F0) + g                                     (GPipe)
         max(H + f, G, H + k f, A + k (dn_in + dn_tgt) + f) + g    (1F1B: the window's forwards)
    E  = max(H + n (f + g), F + g, A + n (dn_in + dn_grad + dn_tgt) + g,    last backward ends
             and, not last:
             max(F0, G) + n g (GPipe) or G + n g (1F1B),
             E' + up_gin' + dn_grad + g,
             X' + dn_grad + g,     X' = max(B0', U0') + n' up_gin'                  (GPipe)
                                   X' = max(B0' + n' up_gin',
                                            H' + f' + n' (up_out' + up_gin'))      (1F1B)
             G + (n - 1) dn_grad + g,
             and, 1F1B, not last: the steady phase and the window's cycles, below)
    end = max(E + upd, E + up_gin,
              and with replicas and parameters (sync_bounds):
              E + up_gin + after_upload + upd,
              E + after_backward + upd,
              E_min + up_gin + after_all + upd)
          + up_report (last stage: the driver's report goes up after the update)
        E_min = max(H + n_min (f + g), A + n_min (dn_in + dn_grad + dn_tgt) + g)
    iteration = max over s of end

1F1B's own terms for a stage that is not last use the stage and the next one
only (and the windows ``k``, ``k'``). From one backward of replica 0 to the
next, a forward runs (in the steady phase) and the next output gradient
downloads (it is posted after the backward), so with ``σ = max(f, dn_grad)``::

    steady = B0 + (n - 1) g + max(0, n - k) σ + min(n - 1, k - 1) dn_grad

The window: micro-batch ``m``'s forward runs after micro-batch ``m - k d``'s
backward on the same replica, and the next stage runs ``m``'s backward after
its forward of ``m + (k' - 1) d'``; so with ``δ = k d - (k' - 1) d'``,
``L = M - 1 - (k' - 1) d'`` and the round trip through the next stage
``C = f + up_out + dn_in' + dn_tgt' + f' + g' + up_gin' + dn_grad + g``,
backward ``m`` ends at least ``C`` after backward ``m - δ`` for every
``δ <= m <= L``. With ``L = c δ + r``, ``after(m) = (n_ρ - 1 - ⌊m / d⌋)
(g + dn_grad)`` (the later backwards of ``m``'s replica ``ρ``, which owns
``n_ρ``) and ``k_ρ = min(k, n_ρ)``::

    chain_0 = B0 + c C + after(c δ)
    chain_L = first + i g + j σ + (i - j) dn_grad + c C + after(L)
        first = B0 if r mod d = 0 else H + C,  i = ⌊r / d⌋,  j = min(i, max(0, n_ρ(r) - k_ρ(r)))

Every term is the length of a chain of tasks, transfers and waits that the
simulated iteration contains (on compute threads, uplinks and downlinks of a
stage and its neighbours), so the formula is never above the simulator. It is
exact for one stage with one replica under both schedules (1F1B there is
gradient accumulation), and for one stage with any replicas under the
four-phase all-reduce or with two under the pipelined one; with more replicas
the pipelined all-reduce is a lower bound (the order in which its pieces are
fetched over several connections is what it leaves out). The planner re-ranks
its best candidates with the simulator.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from funcpipe.errors import ConfigError, PlanInfeasible
from funcpipe.plans import Plan
from funcpipe.platforms.base import MB_RATE, MIB, Platform, Tier
from funcpipe.profiler import ModelProfile
from funcpipe.protocol import REPORT_BYTES, SYNC_IN_FLIGHT_BYTES, owned, piece_count, replica_of

__all__ = [
    "Held",
    "StageCost",
    "SyncBounds",
    "cost_per_iteration",
    "formula_iteration_s",
    "held",
    "memory_terms",
    "requests_per_iteration",
    "stage_costs",
    "stage_memory_bytes",
    "sync_bounds",
    "sync_s",
]

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
        output_bytes: what one micro-batch sends on (0 for the last stage).
        input_grad_bytes: the gradient one micro-batch sends back to the stage
            before (0 for stage 0): of the input's values that carry one
            (:attr:`funcpipe.LayerProfile.gradient_bytes_per_sample`).
        output_grad_bytes: the gradient one micro-batch gets back from the stage
            after (0 for the last stage).
        target_bytes: one micro-batch's targets (last stage only, else 0).
        param_bytes: bytes of the stage's trainable parameters.
        memory_bytes: what one replica needs: runtime, weights, gradients,
            optimizer state, activations held for backward, buffered messages and
            all-reduce buffers.
        tied: ``(other stage, bytes)`` for parameters the stage shares with another
            stage (:attr:`funcpipe.ModelProfile.tied`, e.g. BERT's decoder and
            embedding in the last and first stage): each holds a copy, and after its
            own all-reduce its replica 0 uploads the copy's gradient, which every
            replica of the other stage downloads and adds before the update.
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
    input_grad_bytes: float
    output_grad_bytes: float
    target_bytes: float
    param_bytes: int
    memory_bytes: int
    tied: tuple[tuple[int, int], ...] = ()

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
        input_grad_bytes = 0.0 if s == 0 else profile.layers[layers.start - 1].gradient_bytes_per_sample * b
        output_grad_bytes = 0.0 if s == last else profiles[-1].gradient_bytes_per_sample * b
        target_bytes = profile.target_bytes_per_sample * b if s == last else 0.0
        params = sum(p.param_bytes for p in profiles) - _tied_within(profile, layers)[0]
        needed = stage_memory_bytes(profile, platform, plan, s)
        if plan.memory_mb is not None:
            tier = platform.tier(plan.memory_mb[s])
            if needed > tier.memory_mb * MIB:
                raise PlanInfeasible(
                    f"stage {s} (layers {layers.start}-{layers.stop - 1}, {d} replica(s)) needs "
                    f"{needed / MIB:.0f} MB per function under schedule {plan.schedule!r} but its tier has "
                    f"{tier.memory_mb} MB; hint: "
                    + _fit_hint(profile, platform, plan, s, tier.memory_mb * MIB,
                                "a larger tier, more replicas, fewer layers in the stage or smaller micro-batches")
                )
        else:
            fitting = [t for t in platform.tiers if needed <= t.memory_mb * MIB]
            if not fitting:
                raise PlanInfeasible(
                    f"stage {s} (layers {layers.start}-{layers.stop - 1}, {d} replica(s)) needs "
                    f"{needed / MIB:.0f} MB per function under schedule {plan.schedule!r}, more than the "
                    f"largest tier of {platform.name} ({platform.tiers[-1].memory_mb} MB); hint: "
                    + _fit_hint(profile, platform, plan, s, platform.tiers[-1].memory_mb * MIB,
                                "cut it into more stages, or use more replicas or smaller micro-batches")
                )
            tier = fitting[0]
        speed = tier.speed_at(b)
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
                input_grad_bytes=input_grad_bytes,
                output_grad_bytes=output_grad_bytes,
                target_bytes=target_bytes,
                param_bytes=params,
                memory_bytes=needed,
                tied=_tied_across(profile, plan, s),
            )
        )
    return tuple(stages)


def _tied_within(profile: ModelProfile, layers: range) -> tuple[int, float]:
    """Parameter and optimizer-state bytes counted twice among ``layers`` (both ends of a tie inside)."""
    params, state = 0, 0.0
    for i, j, n in profile.tied:
        if i in layers and j in layers:
            params += n
            later = profile.layers[j]
            state += later.optimizer_bytes * n / later.param_bytes if later.param_bytes else 0.0
    return params, state


def _tied_across(profile: ModelProfile, plan: Plan, stage: int) -> tuple[tuple[int, int], ...]:
    """``(other stage, bytes)`` of the ties between ``stage`` and another stage of ``plan``."""
    owner = plan.layer_stages()
    out: dict[int, int] = {}
    for i, j, n in profile.tied:
        a, b = owner[i], owner[j]
        if a != b and stage in (a, b):
            other = b if stage == a else a
            out[other] = out.get(other, 0) + n
    return tuple(sorted(out.items()))


def _fit_hint(profile: ModelProfile, platform: Platform, plan: Plan, stage: int, capacity: float, usual: str) -> str:
    """The hint of a stage that does not fit ``capacity`` bytes: 1F1B when that fits, else ``usual``."""
    if plan.schedule != "gpipe":
        return usual
    one_f_one_b = dataclasses.replace(plan, schedule="1f1b")
    needed = stage_memory_bytes(profile, platform, one_f_one_b, stage)
    if needed > capacity:
        return usual
    n = -(-plan.num_micro_batches // plan.replicas[stage])
    k = one_f_one_b.in_flight(stage)
    return (
        f"schedule='1f1b' keeps {k} micro-batch(es) of this stage in flight instead of {n} and needs "
        f"{needed / MIB:.0f} MB, which fits; or {usual}"
    )


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
    grad = 0.0 if last else profiles[-1].gradient_bytes_per_sample
    target = profile.target_bytes_per_sample if last else 0.0
    d = plan.replicas[stage]
    n = -(-plan.num_micro_batches // d)
    twice, twice_state = _tied_within(profile, layers)
    return memory_bytes(
        platform,
        param_bytes=sum(p.param_bytes for p in profiles) - twice,
        optimizer_bytes=sum(p.optimizer_bytes for p in profiles) - twice_state,
        held_bytes=sum(p.held_bytes_per_sample for p in profiles) * b,
        input_bytes=before * b,
        output_bytes=output * b,
        target_bytes=target * b,
        replicas=d,
        counts=held(plan.schedule, last=last, micro_batches=n, in_flight=plan.in_flight(stage)),
        grad_bytes=grad * b,
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
    grad_bytes: float | None = None,
) -> int:
    """Memory one replica of a stage needs, in bytes: :func:`memory_terms`, rounded up."""
    needed: float = memory_terms(
        platform, param_bytes=param_bytes, optimizer_bytes=optimizer_bytes, held_bytes=held_bytes,
        input_bytes=input_bytes, output_bytes=output_bytes, target_bytes=target_bytes, replicas=replicas,
        activations=counts.activations, inputs=counts.inputs, grads=counts.grads, targets=counts.targets,
        grad_bytes=grad_bytes,
    )
    return math.ceil(needed)


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
    grad_bytes: Any = None,
) -> Any:
    """Memory one replica of a stage needs, in bytes, before rounding up.

    ``grad_bytes`` is one output gradient's (the gradient a micro-batch gets back,
    :attr:`StageCost.output_grad_bytes`); ``None``: ``output_bytes``.

    Runtime overhead, weights and gradients (``2 P``), optimizer state ``O``; a
    workspace of ``P + O``; per micro-batch whose activations are alive, what
    autograd saves for backward and the stage's output; the inputs, output
    gradients and targets the schedule buffers (:func:`held`). With ``d > 1``
    replicas, the all-reduce's buffers: ``P / d + F``. The gradient is flattened
    into one buffer that takes the gradients' place (each copied in and freed) and
    summed in place (:func:`funcpipe.collectives.all_reduce`), so what it adds is
    what is in flight: the four-phase algorithm one chunk (``P / d``, encoded for
    its upload or downloaded), the pipelined one a piece per connection (at most
    ``F`` = :data:`funcpipe.protocol.SYNC_IN_FLIGHT_BYTES`, 24 MiB, while pieces are
    at most 4 MiB, and under ``P / d`` beyond). The larger of the two algorithms'
    is charged (the planner picks the algorithm per stage); the sum of both
    bounds is the margin. Measured in ``benchmarks/allreduce_memory.py``. Not
    charged: the moment the flattening holds one parameter's gradient twice (the
    largest parameter's bytes, which the profile does not give; covered by the
    ``P / d`` term while that parameter is under ``1/d`` of the stage's), and
    shares downloaded faster than they are added (the pipelined algorithm queues
    every share's download; the adds run at memory speed, far above a function's
    downlink).

    The workspace is the largest of what the phases outside the backwards add to the
    weights, gradients and state (measured in ``benchmarks/memory.py``): the checkpoint
    a replica writes serializes the weights and the optimizer state (``P + O`` bytes,
    while the gradients, ``P``, are freed); the optimizer's step makes temporaries of
    up to about ``P`` (Adam's foreach step) while the gradients are alive; loading the
    stage holds its signed blob (``P``) beside the weights it unpickles. A sum rather
    than their maximum, so that the planner's programs keep it linear.

    A workspace of one micro-batch's saved tensors (``held_bytes``) besides: what a
    forward or backward makes and frees within a layer, on top of what is alive. A
    forward's intermediates that autograd does not save, the backward's gradients
    of the saved tensors (each the size of its tensor, freed once used). Measured on
    the ResNet of ``benchmarks/memory.py`` (micro-batches of 8 at 160x160, each
    bottleneck alone): 3 to 34 MB over its saved tensors during the forward, 15 to
    53 MB during the backward (its weight gradients included), up to about the
    layer's saved bytes; their sum over the stage's layers bounds the largest and
    is linear.

    Only sums, products and a division by ``replicas`` (at least 1): every
    argument may be a float or a numpy array (the planner's programs evaluate it
    over every stage, tier and replica count at once, with the same operations in
    the same order), and it is linear in each
    count (the 1F1B window of :mod:`funcpipe.planner.dp` relies on it).
    """
    synced = (replicas > 1) * 1.0
    if grad_bytes is None:
        grad_bytes = output_bytes
    sync_buffers = synced * (param_bytes / replicas + SYNC_IN_FLIGHT_BYTES)
    return (
        platform.runtime_overhead_mb * MIB
        + 2 * param_bytes
        + optimizer_bytes
        + (param_bytes + optimizer_bytes)
        + held_bytes
        + sync_buffers
        + activations * (held_bytes + output_bytes)
        + inputs * input_bytes
        + grads * grad_bytes
        + targets * target_bytes
    )


@dataclasses.dataclass(frozen=True)
class SyncBounds:
    """Lower bounds on one stage's all-reduce, each counted from its own starting point (:func:`sync_bounds`).

    Attributes:
        after_upload: seconds from the moment the replica that finishes its backwards
            last has also uploaded its last input gradient (its all-reduce uploads queue
            behind it) to the stage's last replica being done.
        after_backward: seconds from that replica's last backward (its all-reduce
            downloads start there, while its uplink may still be busy).
        after_all: seconds from the moment *every* replica has uploaded its last input
            gradient (0 where no such bound is used).
    """

    after_upload: float
    after_backward: float
    after_all: float


def sync_bounds(param_bytes: float, replicas: int, tier: Tier, latency_s: float, algorithm: str) -> SyncBounds:
    """Lower bounds on the all-reduce of ``param_bytes`` among ``replicas`` on ``tier``, as the simulator runs it.

    Four-phase: the phases follow one another on the replica's own threads:
    ``(d-1)`` chunk uploads, ``(d-1)`` downloads, one upload, ``(d-1)`` downloads.

    Pipelined, with ``q`` pieces per chunk (:func:`funcpipe.protocol.piece_count`),
    pieces of ``π = P / (d q)`` bytes, ``u = π / up + lat`` and ``dn = π / down + lat``:
    each replica uploads ``(d-1) q`` chunk pieces and then ``q`` merged pieces, one after
    the other, and downloads ``2 (d-1) q`` pieces over :data:`funcpipe.protocol.FETCH_CONNECTIONS`
    connections sharing its downlink. From the last replica's last input-gradient upload:

    * ``d q u + dn``: its uploads, then a peer fetches its last merged piece;
    * ``((d-1) q + 1) u + 2 dn``: its last chunk piece goes to its last peer, who fetches
      it, uploads its merged piece, which comes back down;
    * ``u + 2 P / (d down) + lat``: a peer downloads its ``2 q`` pieces after the first is up.

    From its last backward (its fetches start then): ``2 (d-1)/d P / down + lat`` (its
    downlink) and ``(d-1)/2 q lat + (d-1)/(2d) P / down`` (its connections' latencies).
    From the moment every replica has uploaded its last input gradient (every peer's
    stream starts no earlier): ``max(d q u, (d-1) q u + u + dn) + (d-1) π / down + lat``
    (the last merged pieces of all peers, fetched after the last is up),
    ``u + 2 (d-1)/d P / down + lat`` and ``((d-1) q + 1) u + (d-1)/d P / down + lat``
    (the merged half after every peer's chunk stream).
    """
    d = replicas
    if d <= 1 or param_bytes <= 0:
        return SyncBounds(0.0, 0.0, 0.0)
    up = tier.uplink_mb_s * MB_RATE
    down = tier.downlink_mb_s * MB_RATE
    lat = latency_s
    if algorithm == "four_phase":
        chunk = param_bytes / d
        phases = (
            (d - 1) * (chunk / up + lat)
            + (d - 1) * (chunk / down + lat)
            + (chunk / up + lat)
            + (d - 1) * (chunk / down + lat)
        )
        return SyncBounds(phases, 0.0, 0.0)
    q = piece_count(int(param_bytes), d)
    piece = param_bytes / d / q
    u = piece / up + lat
    dn = piece / down + lat
    after_upload = max(d * q * u + dn, ((d - 1) * q + 1) * u + 2 * dn, u + 2 / d * param_bytes / down + lat)
    after_backward = max(2 * (d - 1) / d * param_bytes / down + lat,
                         (d - 1) / 2 * q * lat + (d - 1) / (2 * d) * param_bytes / down)
    after_all = max(
        max(d * q * u, (d - 1) * q * u + u + dn) + (d - 1) * piece / down + lat,
        u + 2 * (d - 1) / d * param_bytes / down + lat,
        ((d - 1) * q + 1) * u + (d - 1) / d * param_bytes / down + lat,
    )
    return SyncBounds(after_upload, after_backward, after_all)


def sync_s(param_bytes: float, replicas: int, tier: Tier, latency_s: float, algorithm: str) -> float:
    """Seconds the formula gives one all-reduce after the last input-gradient upload (:func:`sync_bounds`).

    The formula also bounds it from the last backward and from every replica's
    last upload: this alone is the four-phase algorithm's exact time and a lower
    bound on the pipelined one.
    """
    return sync_bounds(param_bytes, replicas, tier, latency_s, algorithm).after_upload


def formula_iteration_s(stages: Sequence[StageCost], platform: Platform, plan: Plan, *,
                        windows: bool = True) -> float:
    """Iteration seconds by the closed formula (see the module docstring): a lower bound on the simulator's.

    With ``windows=False``, 1F1B's terms that depend on the windows ``k`` (the forwards
    that follow backwards, the window's forwards before the first backward, the steady
    phase and the window's cycles) are left out: a lower bound on the formula, and the
    one the planner's programs minimise exactly (a stage's window depends on the workers
    after it, which a left-to-right program does not know yet; the planner re-ranks
    their plans by this formula whole and by the simulator). GPipe has no such terms.
    """
    lat = platform.latency_s
    count = len(stages)
    m_total = plan.num_micro_batches
    gpipe = plan.schedule == "gpipe"
    dn_in = [st.down_s(st.input_bytes, lat) for st in stages]
    dn_tgt = [st.down_s(st.target_bytes, lat) if st.stage == count - 1 else 0.0 for st in stages]
    dn_grad = [st.down_s(st.output_grad_bytes, lat) if st.stage < count - 1 else 0.0 for st in stages]
    up_out = [st.up_s(st.output_bytes, lat) if st.stage < count - 1 else 0.0 for st in stages]
    up_gin = [st.up_s(st.input_grad_bytes, lat) if st.stage > 0 else 0.0 for st in stages]
    f = [st.forward_s for st in stages]
    g = [st.backward_s for st in stages]
    n = [st.micro_batches for st in stages]  # replica 0's count, the most
    d = [st.replicas for st in stages]
    k = [min(plan.in_flight(s), n[s]) for s in range(count)]  # 1F1B window of replica 0

    # Forward: replica 0 runs micro-batch 0 first and owns the most micro-batches. fw0/uo0
    # are its last forward / activation upload; fw/uo those of any replica (the wave of
    # the last micro-batch may reach another replica).
    a = [0.0] * count  # first input of the stage in storage
    h = [0.0] * count  # first forward can start
    fw0 = [0.0] * count
    fw = [0.0] * count
    uo0 = [0.0] * count
    uo = [0.0] * count
    for s in range(count):
        if s:
            a[s] = h[s - 1] + f[s - 1] + up_out[s - 1]
        h[s] = a[s] + dn_in[s] + dn_tgt[s]
        # 1F1B: replica 0's last forward follows all but k of its backwards.
        interleaved = max(0, n[s] - k[s]) * g[s] if windows and not gpipe and s < count - 1 else 0.0
        fw0[s] = max(h[s] + n[s] * f[s] + interleaved, a[s] + n[s] * (dn_in[s] + dn_tgt[s]) + f[s])
        fw[s] = max(fw0[s], uo[s - 1] + dn_in[s] + f[s]) if s else fw0[s]
        if d[s] == 1:
            fw0[s] = fw[s]
        if s < count - 1:
            uo0[s] = max(h[s] + f[s] + n[s] * up_out[s], fw0[s] + up_out[s])
            uo[s] = max(uo0[s], fw[s] + up_out[s])

    # Backward: micro-batch 0's backward at a stage that is not last waits for its gradient,
    # which under GPipe queues behind the next stage's activations on its uplink.
    b0 = [0.0] * count  # micro-batch 0's backward ends
    grad0 = [0.0] * count  # micro-batch 0's output gradient has arrived (not last)
    for s in reversed(range(count)):
        if s == count - 1:
            b0[s] = h[s] + f[s] + g[s]
            continue
        sent = max(b0[s + 1], uo0[s + 1]) if gpipe else b0[s + 1]
        grad0[s] = sent + up_gin[s + 1] + dn_grad[s]
        # GPipe: all of replica 0's forwards; 1F1B: its window's (and their inputs' downloads).
        w = k[s] if windows else 1
        window = max(h[s] + w * f[s], a[s] + w * (dn_in[s] + dn_tgt[s]) + f[s])
        before = fw0[s] if gpipe else window
        b0[s] = max(h[s] + f[s], before, grad0[s]) + g[s]

    e = [0.0] * count  # the last backward of any replica ends
    for s in reversed(range(count)):
        e[s] = max(
            h[s] + n[s] * (f[s] + g[s]),
            fw[s] + g[s],
            a[s] + n[s] * (dn_in[s] + dn_grad[s] + dn_tgt[s]) + g[s],
        )
        if s == count - 1:
            continue
        nx = s + 1
        # The next stage's uplink carries its input gradients (and, before them, its activations).
        if gpipe:
            uplink = max(b0[nx], uo0[nx]) + n[nx] * up_gin[nx]
        else:
            uplink = max(b0[nx] + n[nx] * up_gin[nx], h[nx] + f[nx] + n[nx] * (up_out[nx] + up_gin[nx]))
        e[s] = max(
            e[s],
            (max(fw0[s], grad0[s]) if gpipe else grad0[s]) + n[s] * g[s],
            e[nx] + up_gin[nx] + dn_grad[s] + g[s],
            uplink + dn_grad[s] + g[s],
            grad0[s] + (n[s] - 1) * dn_grad[s] + g[s],
        )
        if windows and not gpipe:
            e[s] = max(e[s], _one_f_one_b_e(
                s, stages, plan, m_total, b0[s], h[s], k[s], f, g, dn_in, dn_tgt, dn_grad, up_out, up_gin))

    end_max = 0.0
    for s, st in enumerate(stages):
        end = max(e[s] + st.update_s, e[s] + up_gin[s])
        if d[s] > 1 and st.param_bytes > 0:  # the simulator skips an empty all-reduce
            sync = sync_bounds(st.param_bytes, d[s], st.tier, lat, plan.stage_sync(s))
            # Every replica's last backward ends no earlier than e_min (the fewest micro-batches).
            n_min = m_total // d[s]
            e_min = max(h[s] + n_min * (f[s] + g[s]), a[s] + n_min * (dn_in[s] + dn_grad[s] + dn_tgt[s]) + g[s])
            end = max(
                end,
                e[s] + up_gin[s] + sync.after_upload + st.update_s,
                e[s] + sync.after_backward + st.update_s,
                e_min + up_gin[s] + sync.after_all + st.update_s,
            )
        if s == count - 1:  # the report for the driver goes up after the update
            end += st.up_s(REPORT_BYTES, lat)
        end_max = max(end_max, end)
    return end_max


def _one_f_one_b_e(
    s: int,
    stages: Sequence[StageCost],
    plan: Plan,
    m_total: int,
    b0: float,
    h: float,
    k: int,
    f: Sequence[float],
    g: Sequence[float],
    dn_in: Sequence[float],
    dn_tgt: Sequence[float],
    dn_grad: Sequence[float],
    up_out: Sequence[float],
    up_gin: Sequence[float],
) -> float:
    """1F1B's own bounds on the last backward of stage ``s`` (not the last stage); see the module docstring."""
    d, n, nx = stages[s].replicas, stages[s].micro_batches, s + 1
    step = max(f[s], dn_grad[s])  # backward to backward in the steady phase: a forward, or the next gradient
    # Replica 0: its first backward, then every backward after the one before it; the next
    # output gradient is posted after each backward, and in the steady phase a forward runs.
    steady = b0 + (n - 1) * g[s] + max(0, n - k) * step + min(n - 1, k - 1) * dn_grad[s]
    # The window: micro-batch m's backward follows the forward of m + δ, δ = k d - (k'-1) d', and
    # waits for its round trip through the next stage (which runs its backward of m after its
    # forward of m + (k'-1) d'); so backward m ≥ backward m - δ + C.
    d1 = stages[nx].replicas
    k1 = plan.in_flight(nx)
    delta = k * d - (k1 - 1) * d1
    last = m_total - 1 - (k1 - 1) * d1  # the last micro-batch whose backward waits so
    if last < 0 or delta <= 0:
        return steady
    trip = f[s] + up_out[s] + dn_in[nx] + dn_tgt[nx] + f[nx] + g[nx] + up_gin[nx] + dn_grad[s] + g[s]

    def own(m: int) -> int:
        """Micro-batches of the replica that runs ``m``."""
        return len(owned(replica_of(m, d), d, m_total))

    def after(m: int) -> float:
        """The backwards of ``m``'s replica after ``m``'s, each after its gradient's download."""
        return (own(m) - 1 - m // d) * (g[s] + dn_grad[s])

    cycles, start = divmod(last, delta)
    # From micro-batch 0's backward up the chain 0, δ, 2δ, ...
    chain_0 = b0 + cycles * trip + after(cycles * delta)
    # Up the chain that ends at `last`: from `start`, on the replica that runs it.
    first = b0 if replica_of(start, d) == 0 else h + trip
    steps = start // d
    k_start = min(plan.in_flight(s), own(start))
    steady_steps = min(steps, max(0, own(start) - k_start))
    reach = first + steps * g[s] + steady_steps * step + (steps - steady_steps) * dn_grad[s]
    chain_last = reach + cycles * trip + after(last)
    return max(steady, chain_0, chain_last)


def requests_per_iteration(stages: Sequence[StageCost], plan: Plan, *, fed: bool = True) -> tuple[int, int]:
    """Storage ``(writes, reads)`` of one iteration: messages, all-reduce pieces and reports.

    The driver writes each micro-batch's input and target; every boundary
    carries an activation and a gradient per micro-batch; each replica of a
    synced stage writes ``d q`` pieces and reads ``2 (d-1) q`` (four-phase:
    ``d`` and ``2 (d-1)``); each last-stage replica writes a report the driver reads.
    Without ``fed`` the workers hold their data (``simulate(..., runtime="lambdaml")``): no
    inputs or targets. Polls for objects not there yet are not counted.
    """
    m = plan.num_micro_batches
    boundaries = len(stages) - 1
    driver = 2 * m if fed else 0  # inputs and targets (none when every worker holds its data)
    writes = driver + 2 * m * boundaries
    reads = driver + 2 * m * boundaries
    for st in stages:
        d = st.replicas
        if d > 1 and st.param_bytes > 0:
            q = 1 if plan.stage_sync(st.stage) == "four_phase" else piece_count(st.param_bytes, d)
            writes += d * d * q
            reads += d * 2 * (d - 1) * q
    for st in stages:  # a tie across stages: replica 0 writes the gradient, the other stage's replicas read it
        for other, _ in st.tied:
            writes += 1
            reads += stages[other].replicas
    writes += stages[-1].replicas
    reads += stages[-1].replicas
    return writes, reads


def cost_per_iteration(
    iteration_s: float, stages: Sequence[StageCost], plan: Plan, platform: Platform, *, requests: bool = True
) -> float:
    """Dollars one iteration costs: functions billed for the whole iteration, plus requests.

    Every function runs for the whole iteration (it waits for its peers, and
    the platform bills waiting), so compute is ``iteration_s * sum(price of
    each replica's tier)``. Invocations are spread over the iterations one
    invocation lives (the lifetime limit), storage requests are counted per
    iteration. ``requests=False`` leaves the requests out (the simulator counts them itself,
    polls included: :attr:`funcpipe.Simulation.requests`).
    """
    compute = iteration_s * sum(st.replicas * platform.price_per_s(st.tier) for st in stages)
    writes, reads = requests_per_iteration(stages, plan) if requests else (0, 0)
    per_invocation = max(1, math.floor(platform.lifetime_s / max(iteration_s, 1e-9)))
    invocations = sum(st.replicas for st in stages) * platform.price_per_invocation / per_invocation
    return compute + writes * platform.price_per_put + reads * platform.price_per_get + invocations
