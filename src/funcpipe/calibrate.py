"""Calibration: measure a platform's tiers on the user's own account and write a platform file.

``funcpipe calibrate aws_lambda --tiers 1024 2048 --storage s3://bucket/prefix``
invokes the deployed function of each tier once (one after the other) with
:class:`funcpipe.probe.Probe`, which measures a matmul at a few micro-batch
sizes and torch thread counts and single PUTs and GETs of a few sizes against
the storage, and returns the figures in its status. From them the driver fits
the platform's fields:

- ``speed`` and ``speed_half_batch`` of each tier: at each micro-batch size ``b``
  the ratio ``r(b)`` of the tier's GFLOP/s (at its best thread count) to this
  driver's at one thread, measured with the CPU clock as :func:`funcpipe.profile`
  times layers; fitted by least squares to :meth:`funcpipe.platforms.Tier.speed_at`
  (``1 + (speed - 1) b / (b + h)`` for a speed above one, else a constant). The
  ratio holds for profiles taken on this driver's machine; it is a matmul's, not
  the model's layers'.
- ``uplink_mb_s`` / ``downlink_mb_s`` of each tier: ``seconds = a + bytes / bandwidth``
  fitted by least squares to the median PUT / GET of each size; ``latency_s`` (one figure for the
  platform): the median over the tiers of the mean of the two intercepts ``a``.

:class:`Calibration` holds the measurements and writes them as a YAML platform
file: a comment header (when, where, the raw figures), ``base: <platform>``
and the fitted fields, which :func:`funcpipe.platforms.load` (and so
``funcpipe plan --platform FILE`` and ``simulate``) reads. Its tiers are the
measured ones only, each with the base's ``vcpus``; prices and limits stay the base's.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import statistics
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from funcpipe import platforms, probe
from funcpipe.errors import BackendError, ConfigError, FunctionNotDeployed
from funcpipe.executors.base import Resources
from funcpipe.executors.serverless import ServerlessExecutor
from funcpipe.platforms import alibaba_fc, aws_lambda
from funcpipe.platforms.base import MB_RATE

__all__ = ["DEFAULT_BATCH_SIZES", "DEFAULT_OBJECT_BYTES", "Calibration", "TierMeasurement", "calibrate", "fit_line",
           "fit_speed"]

#: Micro-batch sizes the matmul is measured at.
DEFAULT_BATCH_SIZES = (1, 4, 16, 64)
#: Object sizes of the storage transfers: 64 KB, 1 MB, 8 MB (2**10 bytes a KB).
DEFAULT_OBJECT_BYTES = (64 * 2**10, 2**20, 8 * 2**20)
DEFAULT_REPEATS = 3
#: Seconds each matmul measurement runs at least.
DEFAULT_MIN_TIME_S = 0.2



def _lambda_size(mb: int) -> bool:
    return 128 <= mb <= aws_lambda.MAX_MEMORY_MB


def _fc_size(mb: int) -> bool:
    return 128 <= mb <= alibaba_fc.MEMORY_TIERS_MB[-1] and mb % 64 == 0


#: The memory sizes each platform allows a function (``funcpipe deploy`` checks the same) and its vCPUs per size.
_LIMITS: dict[str, tuple[str, Callable[[int], bool], Callable[[int], float]]] = {
    "aws_lambda": ("128 to 10240 MB", _lambda_size, aws_lambda.vcpus),
    "alibaba_fc": ("a multiple of 64 MB from 128 to 32768 MB", _fc_size, alibaba_fc.vcpus),
}
#: A fitted half-batch is one of these (micro-batch sizes; 0: the speed does not depend on it).
_HALF_BATCH_GRID = (0.0, *(0.05 * 2 ** (k / 2) for k in range(25)))


@dataclasses.dataclass(frozen=True)
class TierMeasurement:
    """What the probe measured in the function of one tier.

    Attributes:
        memory_mb: the tier.
        vcpus: the platform's vCPUs of the tier (written to the file).
        host: the function's CPU, cores, cgroup quota, torch version (:func:`funcpipe.probe.host_info`).
        matmul: ``{"batch", "threads", "gflops"}`` per micro-batch size and thread count.
        transfers: ``{"bytes", "put_s", "get_s", ...}`` per object size (``put_s`` / ``get_s``: one per repeat).
    """

    memory_mb: int
    vcpus: float
    host: dict[str, Any]
    matmul: tuple[dict[str, Any], ...]
    transfers: tuple[dict[str, Any], ...]

    def best_gflops(self) -> dict[int, tuple[float, int]]:
        """Per micro-batch size: the best GFLOP/s and the thread count that gave it."""
        best: dict[int, tuple[float, int]] = {}
        for row in self.matmul:
            b, g, t = int(row["batch"]), float(row["gflops"]), int(row["threads"])
            if b not in best or g > best[b][0]:
                best[b] = (g, t)
        return dict(sorted(best.items()))

    def link(self, direction: str) -> tuple[float, float]:
        """``(latency_s, bandwidth_mb_s)`` of ``"put"`` or ``"get"``: :func:`fit_line` through each size's median
        seconds (a request that stalled once does not tilt the line)."""
        points = [(float(row["bytes"]), statistics.median(row[f"{direction}_s"])) for row in self.transfers]
        try:
            latency, per_byte = fit_line(points)
        except ConfigError as exc:
            raise BackendError(
                f"tier {self.memory_mb} MB: the {direction.upper()}s give no bandwidth ({exc}); hint: measure "
                "larger objects (--object-kb)"
            ) from None
        return latency, 1.0 / per_byte / MB_RATE


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The measurements of one ``calibrate`` run, the fields fitted to them, and the platform file.

    Attributes:
        base: the built-in platform the file starts from (``aws_lambda`` or ``alibaba_fc``).
        measured_at: when (UTC, ISO 8601).
        functions: the functions invoked, ``{memory_mb}`` standing for the tier.
        storage: the storage URL the transfers went to, without its query.
        driver: this machine's :func:`funcpipe.probe.host_info` and ``"gflops"``: micro-batch size ->
            GFLOP/s at one thread (CPU clock).
        tiers: what each tier measured, ascending by memory.
    """

    base: str
    measured_at: str
    functions: str
    storage: str
    driver: dict[str, Any]
    tiers: tuple[TierMeasurement, ...]

    def speed(self, tier: TierMeasurement) -> tuple[float, float]:
        """``(speed, speed_half_batch)`` of ``tier`` relative to the driver (:func:`fit_speed`)."""
        driver = {int(b): float(g) for b, g in self.driver["gflops"].items()}
        ratios = {b: g / driver[b] for b, (g, _) in tier.best_gflops().items() if b in driver}
        return fit_speed(ratios)

    def latency_s(self) -> float:
        """The platform's ``latency_s``: the median over tiers of the mean PUT and GET intercepts."""
        return statistics.median((t.link("put")[0] + t.link("get")[0]) / 2 for t in self.tiers)

    def fields(self) -> dict[str, Any]:
        """The platform file's fields: ``base``, ``latency_s`` and the measured ``tiers``."""
        tiers = []
        for tier in self.tiers:
            speed, half = self.speed(tier)
            tiers.append({
                "memory_mb": tier.memory_mb, "vcpus": _round(tier.vcpus), "speed": _round(speed),
                "speed_half_batch": _round(half), "uplink_mb_s": _round(tier.link("put")[1]),
                "downlink_mb_s": _round(tier.link("get")[1]),
            })
        return {"base": self.base, "latency_s": _round(self.latency_s()), "tiers": tiers}

    def platform(self) -> platforms.Platform:
        """The platform the file describes."""
        fields = self.fields()
        return platforms.get(fields.pop("base"), **fields)

    def to_yaml(self) -> str:
        """The platform file: a comment header with the raw figures, then :meth:`fields`."""
        driver = self.driver
        lines = [
            f"# funcpipe calibrate {self.base}, measured {self.measured_at}",
            f"# functions {self.functions}; storage {self.storage}",
            f"# driver (profiles taken here compare with these speeds): {driver['cpu']}, torch {driver['torch']}, "
            "1 thread, CPU clock",
            "# speed: a tier's matmul GFLOP/s (its best thread count) / the driver's, a sample being "
            f"{probe.ROWS_PER_SAMPLE} rows of {probe.WIDTH} times a {probe.WIDTH} x {probe.WIDTH} weight, "
            "fitted to Tier.speed_at",
            "# links: seconds = latency + bytes / bandwidth fitted to each size's median PUT / GET; "
            "latency_s: median over tiers",
            "# measured GFLOP/s at micro-batch " + ", ".join(str(b) for b in sorted(driver["gflops"], key=int)) + ":",
            "#   driver: " + ", ".join(f"{float(g):.1f}" for _, g in sorted(driver["gflops"].items(),
                                                                            key=lambda kv: int(kv[0]))),
        ]
        for tier in self.tiers:
            host = tier.host
            quota = f", quota {host['cpu_quota']:g} vCPU" if host.get("cpu_quota") else ""
            best = tier.best_gflops()
            up, down = tier.link("put"), tier.link("get")
            lines.append(
                f"#   {tier.memory_mb} MB ({host['cpu']}, {host['cpu_count']} cores{quota}): "
                + ", ".join(f"{g:.1f} ({t} thr)" for g, t in best.values())
                + f"; PUT {up[1]:.1f} MB/s + {up[0] * 1e3:.1f} ms, GET {down[1]:.1f} MB/s + {down[0] * 1e3:.1f} ms"
            )
        threads = sorted({t for tier in self.tiers for _, t in tier.best_gflops().values()})
        if max(threads) > 1:
            lines.append(
                f"# the best thread counts were {', '.join(map(str, threads))}: a worker runs "
                "Trainer(threads_per_worker=...) torch threads (default 1)"
            )
        body: str = yaml.safe_dump(self.fields(), sort_keys=False)
        return "\n".join(lines) + "\n" + body

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_yaml` to ``path`` (a .yaml or .yml file)."""
        where = str(path)
        if not where.lower().endswith((".yaml", ".yml")):
            raise ConfigError(f"the calibrated platform file {where!r} must end in .yaml or .yml; hint: rename it")
        try:
            Path(where).write_text(self.to_yaml(), encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write the platform file {where!r}: {exc.strerror or exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The raw measurements and the fitted fields, JSON-able."""
        return {
            "base": self.base, "measured_at": self.measured_at, "functions": self.functions, "storage": self.storage,
            "driver": self.driver, "tiers": [dataclasses.asdict(t) for t in self.tiers], "fields": self.fields(),
        }


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(a, c)`` of ``y = a + c x`` by least squares over ``points``, ``a`` >= 0 (else a line through 0).

    Raises:
        ConfigError: fewer than two distinct ``x``, or the slope is not positive.
    """
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        raise ConfigError(f"a line needs two distinct sizes, got {sorted(set(xs))}")
    mx, my = statistics.fmean(xs), statistics.fmean(y for _, y in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    if intercept < 0:
        intercept, slope = 0.0, sum(x * y for x, y in points) / sum(x * x for x in xs)
    if not slope > 0:
        raise ConfigError(f"the time does not grow with the size (slope {slope:.3g} s per byte)")
    return intercept, slope


def fit_speed(ratios: Mapping[int, float]) -> tuple[float, float]:
    """``(speed, speed_half_batch)`` of :meth:`~funcpipe.platforms.Tier.speed_at` closest to ``ratios``.

    ``ratios``: micro-batch size -> measured speed. Least squares over a grid of
    half-batches (0: one speed at every size, the mean); for each, the best
    ``speed`` in closed form, kept if above one (below one ``speed_at`` is constant).
    """
    if not ratios or any(not (math.isfinite(r) and r > 0) for r in ratios.values()):
        raise ConfigError(f"speed ratios must be positive numbers per micro-batch size, got {dict(ratios)}")
    sizes = sorted(ratios)
    best: tuple[float, float, float] | None = None  # residual, speed, half
    for half in _HALF_BATCH_GRID:
        shares = [b / (b + half) for b in sizes]
        if half == 0:
            speed = statistics.fmean(ratios[b] for b in sizes)
        else:
            extra = sum(f * (ratios[b] - 1) for f, b in zip(shares, sizes, strict=True)) / sum(f * f for f in shares)
            speed = 1 + extra
            if speed <= 1:
                continue
        model = [speed if half == 0 else 1 + (speed - 1) * f for f in shares]
        residual = sum((m - ratios[b]) ** 2 for m, b in zip(model, sizes, strict=True))
        if best is None or residual < best[0] - 1e-12:
            best = (residual, speed, half)
    assert best is not None  # half 0 always gives one
    return best[1], best[2]


def calibrate(
    backend: ServerlessExecutor | str,
    storage: str,
    tiers: Sequence[int] | None = None,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    object_bytes: Sequence[int] = DEFAULT_OBJECT_BYTES,
    repeats: int = DEFAULT_REPEATS,
    min_time_s: float = DEFAULT_MIN_TIME_S,
) -> Calibration:
    """Run the probe in the deployed function of each tier, one after the other, and fit the platform's fields.

    Args:
        backend: an :class:`~funcpipe.backends.AWSLambda` or :class:`~funcpipe.backends.AlibabaFC`, or
            ``"aws_lambda"`` / ``"alibaba_fc"`` (configured from the environment).
        storage: where the transfers are timed (``s3://...`` on Lambda, ``oss://...`` on FC); the probe's
            objects are deleted afterwards.
        tiers: memory sizes in MB whose functions ``funcpipe deploy`` created (default: the platform's).
        batch_sizes, object_bytes, repeats, min_time_s: the benchmark's micro-batch sizes, object sizes in
            bytes (at least two), PUTs and GETs per size, and seconds per matmul measurement.

    Raises:
        ConfigError: a bad tier, size or backend.
        FunctionNotDeployed: a tier has no function; the message names the deploy command for it.
        WorkerFailed: the probe failed in the function.
    """
    executor = _executor(backend)
    try:
        base = platforms.get(executor.name)
        memory = _check_tiers(executor.name, base, tiers)
        _check_benchmark(batch_sizes, object_bytes, repeats, min_time_s)
        executor.check_storage(storage)
        _, _, vcpus = _LIMITS[executor.name]
        run = f"funcpipe-calibrate/{uuid.uuid4().hex[:12]}"
        measured = []
        for mb in memory:
            known = next((t for t in base.tiers if t.memory_mb == mb), None)
            tier_vcpus = known.vcpus if known is not None else vcpus(mb)
            threads = _thread_counts(tier_vcpus)
            handle = executor.launch(probe.Probe, storage, f"{run}/{mb}", name=f"calibration probe {mb} MB",
                                     resources=Resources(memory_mb=mb))
            try:
                future = handle.call("run", list(batch_sizes), threads, list(object_bytes), repeats, min_time_s)
            except FunctionNotDeployed as exc:
                raise FunctionNotDeployed(exc.function, exc.where, _deploy_command(executor, mb)) from exc
            try:
                result = future.result()
            finally:
                handle.release()
            measured.append(_measurement(mb, tier_vcpus, result))
        # The driver last (a tier not deployed fails first): the speeds are relative to it, at one thread and on
        # the CPU clock, as profiles are taken.
        driver = {**probe.host_info(), "gflops": {
            b: probe.matmul_gflops(b, 1, min_time_s=min_time_s, clock=time.thread_time) for b in batch_sizes
        }}
        return Calibration(
            base=executor.name,
            measured_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            functions=f"{executor.function_prefix}-{{memory_mb}} on {executor.platform_label}" + _region(executor),
            storage=_without_query(storage),
            driver=driver,
            tiers=tuple(measured),
        )
    finally:
        if isinstance(backend, str):
            executor.shutdown()


def _executor(backend: ServerlessExecutor | str) -> ServerlessExecutor:
    if isinstance(backend, ServerlessExecutor):
        if backend.name not in _LIMITS:
            raise ConfigError(f"calibrate knows the platforms {sorted(_LIMITS)}, not backend {backend.name!r}")
        return backend
    if backend not in _LIMITS:
        raise ConfigError(
            f"calibrate measures {' or '.join(sorted(_LIMITS))}, got {backend!r}; hint: a local machine needs no "
            "calibration (its profile is measured where it runs)"
        )
    from funcpipe.executors import get_executor

    executor = get_executor(backend)
    assert isinstance(executor, ServerlessExecutor)
    return executor


def _check_tiers(name: str, base: platforms.Platform, tiers: Sequence[int] | None) -> list[int]:
    if tiers is None:
        return [t.memory_mb for t in base.tiers]
    allowed, fits, _ = _LIMITS[name]
    values = list(tiers) if isinstance(tiers, Sequence) and not isinstance(tiers, str) else [tiers]
    bad = [t for t in values if isinstance(t, bool) or not isinstance(t, int) or not fits(t)]
    if bad or not values:
        raise ConfigError(
            f"calibration tiers must be memory sizes of {allowed} on {name}, got {values!r} (bad: {bad!r}); "
            f"hint: the tiers `funcpipe deploy {name}` created, e.g. --tiers "
            + " ".join(str(t.memory_mb) for t in base.tiers[:2])
        )
    repeated = sorted({t for t in values if values.count(t) > 1})
    if repeated:
        raise ConfigError(f"calibration tiers {values} name {repeated} more than once; hint: each tier once")
    return sorted(values)


def _check_benchmark(batch_sizes: Sequence[int], object_bytes: Sequence[int], repeats: int, min_time_s: float) -> None:
    def whole(values: Sequence[int]) -> bool:
        return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)

    if not whole(batch_sizes):
        raise ConfigError(f"calibration batch sizes must be whole numbers >= 1, got {list(batch_sizes)!r}")
    if not whole(object_bytes) or len(set(object_bytes)) < 2:
        raise ConfigError(
            f"calibration object sizes must be at least two different sizes >= 1 byte, got {list(object_bytes)!r}; "
            "hint: a line through PUT/GET seconds needs two sizes, e.g. 64 KB and 8 MB"
        )
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"calibration repeats must be a whole number >= 1, got {repeats!r}")
    if not (isinstance(min_time_s, int | float) and math.isfinite(min_time_s) and min_time_s > 0):
        raise ConfigError(f"calibration min_time_s must be a positive number of seconds, got {min_time_s!r}")


def _thread_counts(vcpus: float) -> list[int]:
    """1, 2, 4, ... below the tier's vCPUs rounded up, and that count."""
    top = max(1, math.ceil(vcpus - 1e-9))
    counts = {top}
    t = 1
    while t < top:
        counts.add(t)
        t *= 2
    return sorted(counts)


def _deploy_command(executor: ServerlessExecutor, memory_mb: int) -> str:
    prefix = "" if executor.function_prefix == "funcpipe-worker" else f" --prefix {executor.function_prefix}"
    return f"{executor.deploy_command} --tiers {memory_mb}{prefix}"


def _measurement(memory_mb: int, vcpus: float, result: Any) -> TierMeasurement:
    """The probe's result, checked (it came from a function)."""
    try:
        host = dict(result["host"])
        matmul = tuple({"batch": int(r["batch"]), "threads": int(r["threads"]), "gflops": float(r["gflops"])}
                       for r in result["matmul"])
        transfers = tuple({**r, "bytes": int(r["bytes"]), "put_s": [float(s) for s in r["put_s"]],
                           "get_s": [float(s) for s in r["get_s"]]} for r in result["transfers"])
        missing = [key for key in ("cpu", "cpu_count", "torch") if key not in host]
        if missing:
            raise KeyError(", ".join(missing))
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendError(
            f"the calibration probe of tier {memory_mb} MB returned {str(result)[:120]!r}, not its measurements "
            f"({type(exc).__name__}: {exc}); hint: deploy the driver's funcpipe version"
        ) from None
    if not matmul or not transfers or any(not (r["gflops"] > 0 and math.isfinite(r["gflops"])) for r in matmul):
        raise BackendError(f"the calibration probe of tier {memory_mb} MB measured nothing usable: {result!r:.200}")
    return TierMeasurement(memory_mb, vcpus, host, matmul, transfers)


def _region(executor: ServerlessExecutor) -> str:
    region = getattr(executor, "region", None)
    return f" {region}" if isinstance(region, str) else ""


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path


def _round(value: float) -> float:
    """Four significant digits: the measurements are not more precise."""
    return float(f"{value:.4g}")
