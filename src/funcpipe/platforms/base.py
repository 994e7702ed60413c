"""The data that describes one serverless platform: tiers, links, prices, limits."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

from funcpipe.errors import ConfigError

__all__ = ["Platform", "Tier"]

#: Bytes in the MB of bandwidths (10**6) and in the MB of memory sizes (2**20).
MB_RATE = 1e6
MIB = 2**20

#: Resident memory of a function's process before any model, in MB (2**20 bytes): what
#: the function entry has resident when its init is done (Python, torch, the stage
#: worker and the function side's imports, an optimizer built once, the storage SDK),
#: the process that then runs every invocation. Measured by ``benchmarks/coldstart.py``
#: (``benchmarks/results/coldstart.md``): ``VmRSS`` after AWS Lambda's entry
#: (``awslambdaric`` and ``backends/aws_lambda/handler.py``, boto3's S3 model loaded)
#: was 303.5 MB (torch 2.13.0+cpu, Python 3.11.7), rounded up to a multiple of 10 MB;
#: Function Compute's entry (``server.py``, with oss2) is :data:`FC_RUNTIME_OVERHEAD_MB`.
#: It was 360 MB while the worker imported the whole package (the planner, ortools, tqdm,
#: yaml: 52 MB more), and 250 MB before that, from ``ru_maxrss`` of ``python -c "import torch"``.
#: A fresh local Ray host process (Ray's worker runtime, torch and the stage worker) has
#: more (333 MB when its first run began): Ray's runtime is not a function's.
TORCH_RUNTIME_OVERHEAD_MB = 310

#: :data:`TORCH_RUNTIME_OVERHEAD_MB` of Function Compute's entry (``backends/alibaba_fc/server.py``
#: with the OSS SDK, ``benchmarks/coldstart.py``): 315.8 MB resident after init, rounded up.
FC_RUNTIME_OVERHEAD_MB = 320

#: Share of each vCPU beyond the first that a stage's layers use at large micro-batches
#: (:meth:`Tier.speed_at` scales it down for small ones). Measured on this 2-core machine
#: (``benchmarks/threads.py``, ``benchmarks/results/threads.md``: forward + backward of
#: blocks of ResNet-101, AmoebaNet-D18 and BERT-Large, 1 vs 2 torch threads at micro-batch
#: sizes 1 ... 64): a second thread gave 0.29-1.02 of a thread, fitted by
#: ``e(b) = 0.68 b / (b + 0.3)``. The third to sixth vCPU of a large function (hyperthreads
#: on Lambda) are not measurable here and are taken to add less: 0.5 is a documented
#: platform parameter, ``benchmarks/paper.py`` reports the results' sensitivity to it
#: (x0.5 and x1.5), and users should replace a tier's ``speed`` and ``speed_half_batch``
#: with a measurement on the platform itself (``get(name, tiers=[...])`` or a spec file).
PARALLEL_EFFICIENCY = 0.5

#: The micro-batch size at which the multi-vCPU part of a tier's speed-up is half of
#: what it is at large micro-batches: the fit above (0.1-1.2 per model, 0.3 over all
#: three): intra-op parallelism already splits one sample's convolutions and matrix
#: products, so the speed-up hardly depends on the micro-batch size on this machine.
PARALLEL_HALF_BATCH = 0.3


def estimated_speed(vcpus: float, parallel_efficiency: float = PARALLEL_EFFICIENCY) -> float:
    """Speed at large micro-batches relative to one profiled thread: the first vCPU fully, each
    further one at ``parallel_efficiency``."""
    return min(vcpus, 1.0) + parallel_efficiency * max(0.0, vcpus - 1.0)


def estimated_tiers(
    memory_mb: Sequence[int], vcpus: Callable[[int], float], bandwidth_mb_s: float
) -> tuple[Tier, ...]:
    """Tiers of the given sizes, each with ``vcpus(size)``, :func:`estimated_speed` (and
    :data:`PARALLEL_HALF_BATCH`) and one bandwidth both ways."""
    return tuple(
        Tier(memory_mb=mb, vcpus=vcpus(mb), speed=estimated_speed(vcpus(mb)),
             uplink_mb_s=bandwidth_mb_s, downlink_mb_s=bandwidth_mb_s, speed_half_batch=PARALLEL_HALF_BATCH)
        for mb in memory_mb
    )


_TIER_HINTS = {
    "memory_mb": "the function size in MB, e.g. 2048",
    "vcpus": "the CPU share of a function of this size, e.g. 1.0",
    "speed": "compute speed relative to one profiled thread, e.g. 1.0",
    "uplink_mb_s": "upload bandwidth in 10**6 bytes/s, e.g. 70",
    "downlink_mb_s": "download bandwidth in 10**6 bytes/s, e.g. 70",
    "speed_half_batch": "the micro-batch size at which the speed-up beyond one vCPU is half its full value, "
                        "e.g. 4 (0: speed does not depend on the micro-batch size)",
}

_PLATFORM_HINTS = {
    "name": "a short name such as 'aws_lambda' or 'my_cluster'",
    "tiers": "one or more Tier(...) ascending by memory_mb",
    "latency_s": "seconds one storage request adds, e.g. 0.03 (0 is allowed)",
    "price_per_gb_s": "USD per GB-second of memory, e.g. 0.0000166667 (0 is allowed)",
    "price_per_vcpu_s": "USD per vCPU-second, 0 if the platform bills memory only",
    "price_per_invocation": "USD per invocation, e.g. 2e-07 (0 is allowed)",
    "price_per_put": "USD per storage write request, e.g. 5e-06 (0 is allowed)",
    "price_per_get": "USD per storage read request, e.g. 4e-07 (0 is allowed)",
    "lifetime_s": "the longest run of one invocation in seconds, e.g. 900; use 1e9 for no limit",
    "runtime_overhead_mb": "MB the Python/torch runtime takes before any model, e.g. 360",
    "async_payload_bytes": "the largest asynchronous invocation payload in bytes, e.g. 1048576",
    "storage": "the object store's scheme: 's3', 'oss' or 'file'",
    "price_per_list": "USD per storage LIST request, e.g. 5e-06 (0 is allowed)",
    "price_per_delete": "USD per storage DELETE request (one batch of keys), e.g. 0",
    "price_per_miss": "USD per read of an object not there yet (a 404), e.g. 4e-07 (0 is allowed)",
    "poll_initial_s": "seconds a worker first sleeps between reads of an object not there yet, e.g. 0.01",
    "poll_max_s": "the longest such sleep (it doubles up to this), e.g. 0.2",
    "billing_granularity_s": "the unit a call's duration is rounded up to when billed, e.g. 0.001 (1 ms)",
}


def _bad(owner: str, field: str, value: object, need: str, hints: dict[str, str]) -> ConfigError:
    hint = hints[field]
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:
            hint += "; a YAML number like 5e-6 is read as text, write 5.0e-6"
    return ConfigError(f"{owner}: {field} must be {need}, got {value!r}; hint: {hint}")


def _number(owner: str, field: str, value: object, hints: dict[str, str], *, positive: bool) -> float:
    """``value`` as a finite float, > 0 if ``positive`` else >= 0; ``ConfigError`` otherwise."""
    need = "a finite number " + ("> 0" if positive else ">= 0")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(owner, field, value, need, hints)
    number = float(value)
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise _bad(owner, field, value, need, hints)
    return number


def _integer(owner: str, field: str, value: object, hints: dict[str, str], *, positive: bool) -> int:
    """``value`` as an int (integral floats allowed), > 0 if ``positive`` else >= 0."""
    need = "a whole number " + ("> 0" if positive else ">= 0")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (positive and value == 0):
        raise _bad(owner, field, value, need, hints)
    return value


@dataclasses.dataclass(frozen=True)
class Tier:
    """One function size a platform offers (and funcpipe may deploy).

    Attributes:
        memory_mb: memory of the function, MB as the platform bills it (2**20 bytes).
        vcpus: CPU share the platform gives a function of this size.
        speed: compute speed relative to one thread of the profiling machine
            (2.0 = layers run in half the profiled time), at large micro-batches.
        uplink_mb_s: upload bandwidth to storage, 10**6 bytes per second.
        downlink_mb_s: download bandwidth from storage, 10**6 bytes per second.
        speed_half_batch: the micro-batch size at which the part of ``speed`` beyond
            one (what the further vCPUs add) is half what it is at large micro-batches
            (:meth:`speed_at`); 0 (the default): ``speed`` at every micro-batch size.

    Every figure must be positive and finite, ``speed_half_batch`` >= 0 (``ConfigError`` otherwise).
    """

    memory_mb: int
    vcpus: float
    speed: float
    uplink_mb_s: float
    downlink_mb_s: float
    speed_half_batch: float = 0.0

    def __post_init__(self) -> None:
        owner = f"tier {self.memory_mb!r} MB"
        object.__setattr__(self, "memory_mb", _integer(owner, "memory_mb", self.memory_mb, _TIER_HINTS, positive=True))
        for field in ("vcpus", "speed", "uplink_mb_s", "downlink_mb_s"):
            value = _number(owner, field, getattr(self, field), _TIER_HINTS, positive=True)
            object.__setattr__(self, field, value)
        object.__setattr__(self, "speed_half_batch",
                           _number(owner, "speed_half_batch", self.speed_half_batch, _TIER_HINTS, positive=False))

    def speed_at(self, micro_batch_size: int) -> float:
        """Speed at ``micro_batch_size``: ``1 + (speed - 1) * b / (b + speed_half_batch)`` above one,
        ``speed`` itself at or below one (a function of one vCPU or less has no parallelism to lose)."""
        if self.speed <= 1.0 or self.speed_half_batch == 0:
            return self.speed
        b = micro_batch_size
        return 1.0 + (self.speed - 1.0) * b / (b + self.speed_half_batch)

    def at_batch(self, micro_batch_size: int) -> Tier:
        """This tier with its speed at ``micro_batch_size`` fixed (``speed_half_batch`` 0)."""
        return dataclasses.replace(self, speed=self.speed_at(micro_batch_size), speed_half_batch=0.0)


@dataclasses.dataclass(frozen=True)
class Platform:
    """A serverless platform as plain data; see ``funcpipe.platforms.get``.

    Attributes:
        name: ``"aws_lambda"``, ``"alibaba_fc"``, ``"local"`` or a user's own.
        tiers: the function sizes, ascending by memory.
        latency_s: time one storage request adds to its transfer.
        price_per_gb_s: USD per GB-second of function memory (GB = 1024 MB).
        price_per_vcpu_s: USD per vCPU-second (Function Compute bills vCPU apart; Lambda 0).
        price_per_invocation: USD per function invocation.
        price_per_put: USD per storage write request.
        price_per_get: USD per storage read request.
        lifetime_s: longest a function may run per invocation.
        runtime_overhead_mb: memory the function's runtime (Python, torch) takes
            before any model state.
        async_payload_bytes: largest asynchronous invocation payload.
        storage: the object store its workers use (``"s3"``, ``"oss"``, ``"file"``).
        price_per_list: USD per LIST request (LambdaML polls with them).
        price_per_delete: USD per DELETE request (a batch of up to 1,000 keys).
        price_per_miss: USD per read of an object that is not there yet (a poll that
            finds nothing: S3 bills 404s, OSS bills no failed request).
        poll_initial_s, poll_max_s: a worker's back-off while an object is not there
            yet: it reads, sleeps ``poll_initial_s``, reads, sleeps twice as long, ...
            up to ``poll_max_s`` (the storage adapter's own; the simulator counts the
            polls and the delay until the read that finds the object). Both 0 (the
            default): polling is not modelled (an object is found the moment it exists).

    Construction validates every field (``ConfigError`` naming the field, the
    value and a hint); ``tiers`` given as a list becomes a tuple.
    """

    name: str
    tiers: tuple[Tier, ...]
    latency_s: float
    price_per_gb_s: float
    price_per_vcpu_s: float
    price_per_invocation: float
    price_per_put: float
    price_per_get: float
    lifetime_s: float
    runtime_overhead_mb: int
    async_payload_bytes: int
    storage: str
    price_per_list: float = 0.0
    price_per_delete: float = 0.0
    price_per_miss: float = 0.0
    poll_initial_s: float = 0.0
    poll_max_s: float = 0.0
    billing_granularity_s: float = 0.001

    def __post_init__(self) -> None:
        owner = f"platform {self.name!r}"
        for field in ("name", "storage"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise _bad(owner, field, value, "a non-empty string", _PLATFORM_HINTS)
        tiers = self.tiers
        if isinstance(tiers, list):
            tiers = tuple(tiers)
        if not isinstance(tiers, tuple) or not tiers:
            raise _bad(owner, "tiers", tiers, "a non-empty tuple of Tier", _PLATFORM_HINTS)
        for tier in tiers:
            if not isinstance(tier, Tier):
                raise ConfigError(
                    f"{owner}: tiers must hold Tier objects, got {tier!r}; "
                    "hint: Tier(memory_mb=..., vcpus=..., speed=..., uplink_mb_s=..., downlink_mb_s=...), "
                    "or describe tiers as mappings in a spec file for funcpipe.platforms.load"
                )
        memories = [t.memory_mb for t in tiers]
        if any(a >= b for a, b in itertools.pairwise(memories)):
            raise ConfigError(
                f"{owner}: tiers must be strictly ascending by memory_mb, got {memories} MB; "
                f"hint: list each size once, smallest first: {sorted(set(memories))}"
            )
        object.__setattr__(self, "tiers", tiers)
        for field in ("latency_s", "price_per_gb_s", "price_per_vcpu_s", "price_per_invocation",
                      "price_per_put", "price_per_get", "price_per_list", "price_per_delete", "price_per_miss",
                      "poll_initial_s"):
            object.__setattr__(self, field, _number(owner, field, getattr(self, field), _PLATFORM_HINTS,
                                                    positive=False))
        object.__setattr__(self, "poll_max_s", max(self.poll_initial_s, _number(
            owner, "poll_max_s", self.poll_max_s, _PLATFORM_HINTS, positive=False)))
        object.__setattr__(self, "lifetime_s",
                           _number(owner, "lifetime_s", self.lifetime_s, _PLATFORM_HINTS, positive=True))
        object.__setattr__(self, "billing_granularity_s", _number(
            owner, "billing_granularity_s", self.billing_granularity_s, _PLATFORM_HINTS, positive=True))
        object.__setattr__(self, "runtime_overhead_mb",
                           _integer(owner, "runtime_overhead_mb", self.runtime_overhead_mb, _PLATFORM_HINTS,
                                    positive=False))
        object.__setattr__(self, "async_payload_bytes",
                           _integer(owner, "async_payload_bytes", self.async_payload_bytes, _PLATFORM_HINTS,
                                    positive=True))

    def tier(self, memory_mb: int) -> Tier:
        """The tier of ``memory_mb``; ``ConfigError`` naming the tiers if there is none."""
        for tier in self.tiers:
            if tier.memory_mb == memory_mb:
                return tier
        raise ConfigError(
            f"{self.name} has no tier of {memory_mb!r} MB; its tiers: {[t.memory_mb for t in self.tiers]} MB; "
            "hint: pick one of those, or add the size with platform.replace(tiers=...) or a spec file"
        )

    def billed_s(self, seconds: float) -> float:
        """The seconds the platform bills a call that ran ``seconds``: rounded up to
        :attr:`billing_granularity_s` (a call of exactly whole units is not rounded further)."""
        unit = self.billing_granularity_s
        units = seconds / unit
        whole = round(units)
        return (whole if abs(units - whole) < 1e-9 else math.ceil(units)) * unit

    def price_per_s(self, tier: Tier) -> float:
        """USD one running function of ``tier`` costs per second (memory and vCPU)."""
        return tier.memory_mb / 1024 * self.price_per_gb_s + tier.vcpus * self.price_per_vcpu_s

    def replace(self, **changes: Any) -> Platform:
        """A copy with ``changes`` applied and validated; ``ConfigError`` on an unknown field."""
        known = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ConfigError(
                f"platform {self.name!r} has no field(s) {unknown}; known fields: {known}; "
                "hint: per-tier figures (speed, bandwidth) go through tiers=... or with_link()"
            )
        return dataclasses.replace(self, **changes)

    def with_link(self, *, uplink_mb_s: float | None = None, downlink_mb_s: float | None = None) -> Platform:
        """A copy whose every tier has this upload and/or download bandwidth (10**6 bytes/s), e.g. measured."""
        changes: dict[str, Any] = {}
        if uplink_mb_s is not None:
            changes["uplink_mb_s"] = uplink_mb_s
        if downlink_mb_s is not None:
            changes["downlink_mb_s"] = downlink_mb_s
        if not changes:
            return self
        return self.replace(tiers=tuple(dataclasses.replace(t, **changes) for t in self.tiers))
