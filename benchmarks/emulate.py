"""Emulate a serverless platform on this machine: funcpipe vs LambdaML, measured and simulated.

Real training on local Ray, where every worker (and the driver) reaches the
shared ``/dev/shm`` store through its own emulated link
(``throttled+file://...?up_mb_s=..&down_mb_s=..&latency_ms=..``): AWS Lambda's
structure, with its bandwidth and storage latency scaled down together with
the model (defaults: 70 MB/s / 4 = 17.5 MB/s, 30 ms / 3 = 10 ms), and a small
deep CNN (9 convolution blocks and 3 fully connected layers on 48x48 images,
5.2 M parameters = 20.7 MB, most of them in the first fully connected layer),
so that a whole run takes a few minutes.

Steps: profile the model here with one torch thread (``funcpipe.profile``);
describe the emulated platform (AWS Lambda's memory tiers and prices; every
tier one torch thread, i.e. speed 1.0 relative to the profile, and the scaled
link); plan funcpipe (``funcpipe.plan``, objective time) and find LambdaML's
best configuration (``funcpipe.baselines.lambdaml``, objective time), both
with at most ``--max-workers`` functions; train each for real with
``Trainer(backend="ray")`` and compare the measured seconds per iteration with
``funcpipe.simulate(plan, profile, platform)``.

On a 2-core machine at most 2 workers may compute at once without sharing a
core (each worker runs one torch thread), so ``--max-workers`` defaults to
the usable CPUs, at most 2. CPU contention that remains (the driver, Ray,
the workers' transfer threads, two workers sharing caches and memory
bandwidth) is measured, not removed: each stage's compute is timed alone and
compared with the profile and with the workers' own timers in the runs, the
same plans run again on unthrottled storage (the compute floor, against the
simulator on a free link), and the CPU time of the benchmark's processes, of
the rest of the machine and stolen by the hypervisor is read from ``/proc``.

Variants run interleaved, ``--repeats`` times, and every reported number is
a median. Writes ``benchmarks/results/emulate.json`` and ``emulate.md`` and
prints the tables. ``python benchmarks/emulate.py --help`` lists the options.

``python benchmarks/emulate.py --sleep-compute`` is the other mode (:mod:`benchmarks.emulate_scale`,
its options with ``--sleep-compute --help``): the paper models' plans at their own scale (20-60
functions) on threads, every layer's compute a sleep of its profiled time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch
from torch import nn

import funcpipe
from funcpipe import ModelProfile, Plan, Simulation, Trainer
from funcpipe.baselines import lambdaml
from funcpipe.errors import PlanInfeasible
from funcpipe.platforms import Platform, aws_lambda

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.overhead import _table, machine_info  # the same machine record and tables as overhead.py

log = logging.getLogger("funcpipe.benchmarks.emulate")

Batch = tuple[torch.Tensor, torch.Tensor]

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: The job: global batch 64 of 3x48x48 images, 10 classes, cross-entropy, SGD. At 48x48 one
#: thread's time per sample stays nearly flat from 4 to 64 samples, as the profile's
#: ``alpha + beta * b`` assumes; at 64x64, 64 samples' activations outgrow this CPU's L3 cache
#: and cost a third more per sample than 32 do.
GLOBAL_BATCH = 64
IMAGE = 48
CLASSES = 10
#: Distinct random global batches, cycled over by every variant in the same order.
NUM_BATCHES = 4
LEARNING_RATE = 0.01

#: AWS Lambda's per-function bandwidth and S3 latency, as funcpipe models them.
AWS_BANDWIDTH_MB_S = aws_lambda.BANDWIDTH_MB_S
AWS_LATENCY_MS = aws_lambda.LATENCY_S * 1000
#: Lambda's bandwidth and latency are divided by these by default. The model computes one
#: micro-batch in tens of milliseconds where the paper's take seconds: at S3's 30 ms, request
#: latency alone would decide most plans; a third of it stays a visible cost per request.
BANDWIDTH_FACTOR = 4.0
LATENCY_FACTOR = 3.0
EMULATED_NAME = "aws_lambda_emulated"
#: A link this fast costs nothing measurable: the simulator's compute-only floor.
UNLIMITED_MB_S = 1e9

#: The issue's targets: the simulator within 20% of the measurement; the same direction of the ratio.
TARGET_ERROR = 0.20


# -- the model and the data ----------------------------------------------------------------


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU())


def make_model(seed: int) -> nn.Sequential:
    """A small deep CNN as 12 layers: convolutions (most compute), then fully connected layers (most bytes)."""
    torch.manual_seed(seed)
    side = IMAGE // 16  # after four stride-2 convolutions
    return nn.Sequential(
        _conv(3, 32),  # 48x48
        _conv(32, 32),
        _conv(32, 64, 2),  # 24x24
        _conv(64, 64),
        _conv(64, 128, 2),  # 12x12
        _conv(128, 128),
        _conv(128, 256, 2),  # 6x6
        _conv(256, 256),
        _conv(256, 256, 2),  # 3x3
        nn.Sequential(nn.Flatten(), nn.Linear(256 * side * side, 1024), nn.ReLU()),
        nn.Sequential(nn.Linear(1024, 1024), nn.ReLU()),
        nn.Linear(1024, CLASSES),
    )


def make_batches(seed: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed + 1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 3, IMAGE, IMAGE, generator=generator),
            torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in range(NUM_BATCHES)
    ]


def sgd(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LEARNING_RATE)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target)


# -- the emulated platform -------------------------------------------------------------------


def emulated_platform(bandwidth_mb_s: float, latency_ms: float) -> Platform:
    """AWS Lambda as this machine emulates it: its tiers, prices and limits; one thread and the given link per function.

    Every tier gets speed 1.0 and 1 vCPU (a worker runs one torch thread, as the
    profile was measured) and ``bandwidth_mb_s`` both ways; storage requests
    pay ``latency_ms``. The memory tiers stay Lambda's: they only bound what a
    plan may hold (Ray does not enforce them), and this model fits the smallest.
    """
    base = funcpipe.platforms.get("aws_lambda")
    tiers = tuple(
        dataclasses.replace(t, vcpus=1.0, speed=1.0, uplink_mb_s=bandwidth_mb_s, downlink_mb_s=bandwidth_mb_s)
        for t in base.tiers
    )
    return base.replace(name=EMULATED_NAME, tiers=tiers, latency_s=latency_ms / 1000)


def unlimited(spec: Platform) -> Platform:
    """``spec`` with a free link (no transfer time, no latency): what the plan's compute alone takes."""
    return spec.with_link(uplink_mb_s=UNLIMITED_MB_S, downlink_mb_s=UNLIMITED_MB_S).replace(latency_s=0.0)


# -- planning ----------------------------------------------------------------------------------


def plan_summary(plan: Plan) -> str:
    stages = len(plan.balance)
    what = "1 stage" if stages == 1 else f"{stages} stages {list(plan.balance)}"
    return (
        f"{what} x replicas {list(plan.replicas)}, micro-batch {plan.micro_batch_size}, "
        f"{plan.sync}, {list(plan.memory_mb or ())} MB"
    )


def plan_funcpipe(
    profile: ModelProfile, spec: Platform, args: argparse.Namespace
) -> tuple[Plan, list[dict[str, Any]]]:
    """funcpipe's time-optimal plan of at most ``--max-workers`` functions.

    ``funcpipe.plan`` bounds stages and replicas per stage, not their product,
    so it is asked once per stage count ``s`` with ``max_replicas = W // s``
    (every plan it returns has at most ``W`` workers) and per micro-batch size;
    the fastest by the simulator wins (ties: the cheaper).
    """
    tried: list[dict[str, Any]] = []
    best: Plan | None = None
    for micro in args.micro_batch_sizes:
        for stages in range(1, min(args.max_workers, profile.num_layers) + 1):
            replicas = args.max_workers // stages
            try:
                candidate = funcpipe.plan(
                    profile, spec, global_batch_size=GLOBAL_BATCH, micro_batch_size=micro, objective="time",
                    max_stages=stages, max_replicas=replicas, time_limit_s=args.time_limit_s,
                )
            except PlanInfeasible as exc:
                tried.append({"micro_batch_size": micro, "max_stages": stages, "max_replicas": replicas,
                              "infeasible": str(exc)})
                continue
            assert candidate.predicted_iteration_s is not None and candidate.predicted_cost_usd is not None
            tried.append({"micro_batch_size": micro, "max_stages": stages, "max_replicas": replicas,
                          "plan": candidate.to_dict(), "predicted_iteration_s": candidate.predicted_iteration_s})
            if best is None or (candidate.predicted_iteration_s, candidate.predicted_cost_usd) < (
                best.predicted_iteration_s, best.predicted_cost_usd
            ):
                best = candidate
    if best is None:
        raise PlanInfeasible(f"no funcpipe plan of at most {args.max_workers} workers fits {spec.name}")
    return best, tried


# -- measuring -----------------------------------------------------------------------------------


def _jiffies() -> float:
    return float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def _tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of process ``root`` and every live descendant, from ``/proc``.

    Ray's processes (GCS, raylet, the workers) descend from the driver that
    started them, so this is what the benchmark itself uses.
    """
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    tick = _jiffies()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        seconds[pid] = (int(fields[11]) + int(fields[12])) / tick
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(seconds.get(pid, 0.0) for pid in tree)


def cpu_snapshot() -> dict[str, float]:
    """All CPUs' busy, steal and total jiffies (``/proc/stat``) and this process tree's CPU seconds.

    Empty where ``/proc`` is not available.
    """
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        ours = _tree_cpu_s(os.getpid())
    except (OSError, ValueError):
        return {}
    fields += [0.0] * (8 - len(fields))
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return {
        "busy": user + nice + system + irq + softirq,
        "steal": steal,
        "total": user + nice + system + idle + iowait + irq + softirq + steal,
        "ours_s": ours,
        "wall": time.monotonic(),
    }


def cpu_share(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Cores in use between two :func:`cpu_snapshot`: by this benchmark, by other processes, stolen."""
    if not before or not after or after["total"] <= before["total"]:
        return {}
    cpus = os.cpu_count() or 1
    total = after["total"] - before["total"]
    busy = cpus * (after["busy"] - before["busy"]) / total
    ours = (after["ours_s"] - before["ours_s"]) / (after["wall"] - before["wall"])
    return {
        "busy_cores": busy,
        "our_cores": ours,
        "other_cores": max(0.0, busy - ours),
        "steal_cores": cpus * (after["steal"] - before["steal"]) / total,
    }


@dataclasses.dataclass
class Variant:
    """One system's plan, run on one storage (throttled or not)."""

    name: str
    system: str
    plan: Plan
    simulation: Simulation
    throttled: bool
    storage_dir: Path
    storage_url: str
    trainer: Trainer | None = None


def make_variant(
    name: str, system: str, plan: Plan, simulation: Simulation, *, throttled: bool, args: argparse.Namespace
) -> Variant:
    storage_dir = Path(tempfile.mkdtemp(prefix=f"funcpipe-emulate-{name.replace('/', '-')}-", dir=args.storage_dir))
    url = storage_dir.as_uri()
    if throttled:
        bw, lat = f"{args.bandwidth_mb_s:g}", f"{args.latency_ms:g}"
        url = f"throttled+{url}?up_mb_s={bw}&down_mb_s={bw}&latency_ms={lat}"
    return Variant(name, system, plan, simulation, throttled, storage_dir, url)


def run_fit(variant: Variant, batches: Sequence[Batch], iterations: int, seed: int) -> dict[str, Any]:
    """One fit of ``iterations``; the first iteration also pays for launching, so it is kept apart."""
    if variant.trainer is None:
        variant.trainer = Trainer(
            make_model(seed), loss_fn, sgd, variant.plan, backend="ray", storage=variant.storage_url, timeout_s=300.0
        )
    before = cpu_snapshot()
    started = time.perf_counter()
    history = variant.trainer.fit(list(batches), iterations=iterations, progress=False)
    wall = time.perf_counter() - started
    share = cpu_share(before, cpu_snapshot())
    if len(history) != iterations:
        raise RuntimeError(f"{variant.name}: fit ran {len(history)} iterations, expected {iterations}")
    steady = history.seconds[1:] or history.seconds
    return {
        "wall_s": wall,
        "seconds": [round(s, 6) for s in history.seconds],
        "median_s": statistics.median(steady),
        "losses": [round(v, 5) for v in history.losses],
        "stages": history.stage_summary(),
        **share,
    }


def measured_compute(stages: list[dict[str, float]]) -> list[float]:
    """Per stage, the seconds a worker computed per iteration (forward, backward, update)."""
    return [row["compute_s"] + row["update_s"] for row in stages]


def solo_compute(plan: Plan, batch: Batch, seed: int, rounds: int) -> list[float]:
    """Per stage, the seconds one worker's compute of an iteration takes here, alone, with one thread.

    What a stage worker computes per iteration (its ``ceil(M / d)`` micro-batches:
    forwards, backwards in the worker's order, the loss on the last stage, one
    SGD step), in this process while nothing else of the benchmark runs; the
    median of ``rounds`` timed rounds after one untimed one. Against the profile
    it shows the profile's error; against the workers' own timers in a run, the
    contention of workers running at the same time.
    """
    model = make_model(seed)
    x, y = batch
    b, last = plan.micro_batch_size, plan.num_stages - 1
    micro_x = list(torch.split(x, b))
    micro_y = list(torch.split(y, b))
    scale = b / plan.global_batch_size
    seconds = []
    inputs = micro_x
    for s in range(plan.num_stages):
        layers = plan.layer_range(s)
        stage = model[layers.start : layers.stop]
        optimizer = sgd(stage.parameters())
        mine = range(0, plan.num_micro_batches, plan.replicas[s])  # replica 0's micro-batches
        with torch.no_grad():
            outputs = [stage(h) for h in inputs]
        grads = [torch.randn_like(out) for out in outputs]
        times = []
        for _ in range(rounds + 1):
            started = time.perf_counter()
            if s == last:
                for m in mine:
                    out = stage(inputs[m].detach().requires_grad_(s > 0))
                    torch.autograd.backward(loss_fn(out, micro_y[m]) * scale)
            else:
                held = [stage(inputs[m].detach().requires_grad_(s > 0)) for m in mine]
                for out, m in zip(held, mine, strict=True):
                    torch.autograd.backward(out, grads[m])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
        seconds.append(statistics.median(times[1:]))
        inputs = outputs
    return seconds


# -- the benchmark ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    torch.set_num_threads(1)
    spec = emulated_platform(args.bandwidth_mb_s, args.latency_ms)
    floor_spec = unlimited(spec)
    model = make_model(args.seed)
    batches = make_batches(args.seed)
    lambdaml_sizes = {GLOBAL_BATCH // d for d in range(1, args.max_workers + 1) if GLOBAL_BATCH % d == 0}
    sizes = sorted(set(args.micro_batch_sizes) | lambdaml_sizes)
    log.info("profiling at micro-batch sizes %s", sizes)
    started = time.perf_counter()
    x, y = batches[0]
    profile = funcpipe.profile(model, x, y, loss_fn, micro_batch_sizes=sizes, optimizer=sgd)
    profile_s = time.perf_counter() - started
    log.info("profiled in %.1f s", profile_s)

    started = time.perf_counter()
    fp_plan, fp_tried = plan_funcpipe(profile, spec, args)
    lm_plan = lambdaml(profile, spec, global_batch_size=GLOBAL_BATCH, objective="time", max_workers=args.max_workers)
    planning_s = time.perf_counter() - started
    systems: list[tuple[str, str, Plan]] = [("funcpipe", "funcpipe", fp_plan), ("lambdaml", "LambdaML", lm_plan)]
    # LambdaML's best may use fewer functions than allowed. Its configuration with all of
    # them also runs (not in the ratio): it checks the simulator's four-phase all-reduce.
    w = args.max_workers
    if lm_plan.num_workers < w and GLOBAL_BATCH % w == 0 and not args.no_extra:
        extra = Plan((profile.num_layers,), (w,), GLOBAL_BATCH // w, GLOBAL_BATCH, None, "four_phase")
        systems.append((f"lambdaml-{w}", f"LambdaML, {w} workers (not its best)", extra))
    log.info("planned in %.1f s: %s", planning_s, "; ".join(f"{n}: {plan_summary(p)}" for n, _, p in systems))
    solo = {name: solo_compute(plan, batches[0], args.seed, args.solo_rounds) for name, _, plan in systems}
    log.info("compute alone, per stage: %s", solo)

    variants: list[Variant] = []
    samples: list[dict[str, Any]] = []
    warmup: dict[str, dict[str, Any]] = {}
    cpus = _usable_cpus()
    try:
        for name, system, plan in systems:
            sim = funcpipe.simulate(plan, profile, spec)
            plan = sim.plan  # memory filled in
            variants.append(make_variant(name, system, plan, sim, throttled=True, args=args))
            if not args.no_floor:
                floor = funcpipe.simulate(plan, profile, floor_spec)
                variants.append(make_variant(f"{name}/unthrottled", system, plan, floor, throttled=False, args=args))
        log.info("starting Ray (num_cpus=%d)", cpus)
        if not ray.is_initialized():
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
        for variant in variants:
            warmup[variant.name] = run_fit(variant, batches, args.warmup_iterations, args.seed)
            log.info("warm-up fit of %s: %.1f s", variant.name, warmup[variant.name]["wall_s"])
        for repeat in range(args.repeats):
            shift = repeat % len(variants)  # rotate, so no variant always follows the same one
            for variant in variants[shift:] + variants[:shift]:
                sample = run_fit(variant, batches, args.iterations, args.seed)
                samples.append({"variant": variant.name, "repeat": repeat, **sample})
                log.info("repeat %d %-22s median %.3f s/it (simulated %.3f)", repeat, variant.name,
                         sample["median_s"], variant.simulation.iteration_s)
    finally:
        for variant in variants:
            shutil.rmtree(variant.storage_dir, ignore_errors=True)

    rows: dict[str, dict[str, Any]] = {}
    for variant in variants:
        mine = [s for s in samples if s["variant"] == variant.name]
        sim = variant.simulation
        measured = statistics.median(s["median_s"] for s in mine)
        stage_compute = [statistics.median(measured_compute(s["stages"])[i] for s in mine)
                         for i in range(variant.plan.num_stages)]
        row: dict[str, Any] = {
            "system": variant.system,
            "throttled": variant.throttled,
            "plan": variant.plan.to_dict(),
            "plan_summary": plan_summary(variant.plan),
            "workers": variant.plan.num_workers,
            "measured_s": measured,
            "measured_per_repeat_s": [s["median_s"] for s in mine],
            "simulated_s": sim.iteration_s,
            "error": (sim.iteration_s - measured) / measured,
            "simulated_stages": [dataclasses.asdict(st) for st in sim.stages],
            "measured_compute_s": stage_compute,
            "simulated_compute_s": [st.compute_s for st in sim.stages],
            "compute_slowdown": [m / st.compute_s - 1 if st.compute_s > 0 else 0.0
                                 for m, st in zip(stage_compute, sim.stages, strict=True)],
            # The simulated share of the iteration the busiest stage spends computing.
            "simulated_compute_share": max(st.compute_s for st in sim.stages) / sim.iteration_s,
            "busy_cores": _median_of(mine, "busy_cores"),
            "our_cores": _median_of(mine, "our_cores"),
            "other_cores": _median_of(mine, "other_cores"),
            "steal_cores": _median_of(mine, "steal_cores"),
        }
        rows[variant.name] = row
    for name, row in rows.items():
        row["solo_compute_s"] = solo[name.partition("/")[0]]
        floor = rows.get(f"{name}/unthrottled")
        if floor is not None:
            # What the simulator misses, split: overheads and contention the unthrottled run
            # shows (measured floor over simulated compute), and what is left for the links.
            row["floor_gap_s"] = floor["measured_s"] - floor["simulated_s"]
            row["link_gap_s"] = (row["measured_s"] - row["simulated_s"]) - row["floor_gap_s"]

    fp, lm = rows["funcpipe"], rows["lambdaml"]
    ratio_measured = fp["measured_s"] / lm["measured_s"]
    ratio_simulated = fp["simulated_s"] / lm["simulated_s"]
    throttled = [row for row in rows.values() if row["throttled"]]
    targets = {
        "error_limit": TARGET_ERROR,
        "errors": {name: row["error"] for name, row in rows.items() if row["throttled"]},
        "error_met": all(abs(row["error"]) <= TARGET_ERROR for row in throttled),
        "ratio_measured": ratio_measured,
        "ratio_simulated": ratio_simulated,
        "direction_met": (ratio_measured < 1) == (ratio_simulated < 1) and ratio_measured != 1,
    }
    return {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {
            "layers": repr(model),
            "num_layers": len(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "parameter_bytes": profile.param_bytes,
            "input": [3, IMAGE, IMAGE],
            "global_batch": GLOBAL_BATCH,
            "loss": "cross_entropy",
            "optimizer": f"SGD(lr={LEARNING_RATE})",
        },
        "platform": {
            "name": spec.name,
            "from": "aws_lambda",
            "bandwidth_mb_s": args.bandwidth_mb_s,
            "bandwidth_factor": AWS_BANDWIDTH_MB_S / args.bandwidth_mb_s,
            "latency_ms": args.latency_ms,
            "tiers_mb": [t.memory_mb for t in spec.tiers],
            "speed": 1.0,
        },
        "profile": profile.to_dict(),
        "profile_s": profile_s,
        "planning_s": planning_s,
        "funcpipe_candidates": fp_tried,
        "ray_num_cpus": cpus,
        "warmup": warmup,
        "rows": rows,
        "targets": targets,
        "samples": samples,
    }


def _median_of(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if key in s]
    return statistics.median(values) if values else None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- reporting ---------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render_markdown(machine: dict[str, Any], report: dict[str, Any], command: str) -> str:
    r = report
    rows, targets, opts, pf, model = r["rows"], r["targets"], r["options"], r["platform"], r["model"]
    latency_note = ""
    if pf["latency_ms"]:
        latency_note = f" (Lambda's {AWS_LATENCY_MS:g} ms / {AWS_LATENCY_MS / pf['latency_ms']:.3g})"
    out = [
        "# funcpipe vs LambdaML on an emulated platform",
        "",
        f"Machine: {machine['cpu_count']} CPUs ({machine['cpus_usable']} usable, {machine['cpu_model']}), "
        f"load average {machine['load_average_1min_at_start']:.2f} at start, "
        f"{machine['load_average_1min_at_end']:.2f} at end; Python {machine['python']}, "
        f"torch {machine['torch']}, Ray {machine['ray']}, funcpipe {machine['funcpipe']} "
        f"(commit {machine['git_commit'] or '?'}); {machine['date']}.",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {model['num_layers']}-layer CNN on {model['input'][1]}x{model['input'][2]} images "
        f"(9 conv blocks, 3 fully connected layers), {model['parameters']:,} parameters "
        f"({model['parameter_bytes'] / 1e6:.1f} MB); global batch {model['global_batch']}, "
        f"{model['loss']}, {model['optimizer']}; profiled here with one torch thread in {r['profile_s']:.0f} s.",
        "",
        f"Platform `{pf['name']}`: AWS Lambda's memory tiers and prices; {pf['latency_ms']:g} ms storage "
        f"latency{latency_note} and {pf['bandwidth_mb_s']:g} MB/s per function each way (Lambda's "
        f"{AWS_BANDWIDTH_MB_S:g} MB/s / {pf['bandwidth_factor']:.3g}); every tier speed 1.0 (one torch thread, "
        f"as profiled). Each worker and the driver reach `/dev/shm` through their own "
        f"`throttled+file://...?up_mb_s={pf['bandwidth_mb_s']:g}&down_mb_s={pf['bandwidth_mb_s']:g}"
        f"&latency_ms={pf['latency_ms']:g}` link. At most {opts['max_workers']} workers per system "
        f"(Ray `num_cpus={r['ray_num_cpus']}`, one torch thread and one CPU per worker). funcpipe: "
        f"`funcpipe.plan(objective=\"time\")` over micro-batch sizes {opts['micro_batch_sizes']}; LambdaML: "
        f"`funcpipe.baselines.lambdaml(objective=\"time\", max_workers={opts['max_workers']})`.",
        "",
        f"Measured: `Trainer(backend=\"ray\")`, a warm-up fit of {opts['warmup_iterations']} iterations, then "
        f"{opts['repeats']} interleaved fits of {opts['iterations']} iterations per variant; per fit the median "
        "of `History.seconds` without the first iteration (which pays for launching), then the median over "
        "fits. Simulated: `funcpipe.simulate(plan, profile, platform)`. Error = (simulated - measured) / "
        "measured.",
        "",
    ]
    table = []
    for row in rows.values():
        if not row["throttled"]:
            continue
        table.append([
            row["system"], row["plan_summary"], f"{row['measured_s']:.3f}", f"{row['simulated_s']:.3f}",
            _pct(row["error"]),
        ])
    ratio_m, ratio_s = targets["ratio_measured"], targets["ratio_simulated"]
    table.append(["**funcpipe / LambdaML**", "", f"**{ratio_m:.2f}**", f"**{ratio_s:.2f}**",
                  _pct((ratio_s - ratio_m) / ratio_m)])
    out += [
        _table(["system", "plan", "measured s/iter", "simulated s/iter", "error"], table),
        "",
    ]
    errors = targets["errors"]
    worst = max(errors, key=lambda n: abs(errors[n]))
    out += [
        f"Target 1, the simulator within {TARGET_ERROR:.0%} of every measurement: "
        f"**{'met' if targets['error_met'] else 'not met'}** (largest error {_pct(errors[worst])}, {worst}"
        + ("" if targets["error_met"] else f"; missed by {abs(errors[worst]) * 100 - TARGET_ERROR * 100:.1f} points")
        + ").",
        "",
        f"Target 2, the measured funcpipe/LambdaML ratio in the simulated direction: "
        f"**{'met' if targets['direction_met'] else 'not met'}** (measured {ratio_m:.2f}, simulated {ratio_s:.2f}: "
        f"funcpipe {'faster' if ratio_m < 1 else 'slower'} measured, {'faster' if ratio_s < 1 else 'slower'} "
        "simulated).",
        "",
    ]
    for name, error in errors.items():
        row = rows[name]
        if abs(error) <= TARGET_ERROR or "floor_gap_s" not in row:
            continue
        out += [
            f"{name} misses by {abs(error) * 100 - TARGET_ERROR * 100:.1f} points: measured - simulated = "
            f"{row['measured_s'] - row['simulated_s']:+.3f} s per iteration, of which {row['floor_gap_s']:+.3f} s "
            "shows in the unthrottled run too (profile error and contention: the per-stage compute below) and "
            f"{row['link_gap_s']:+.3f} s only on the emulated links.",
            "",
        ]
    out += [
        "What the simulator does not model: the one storage request every worker makes at the start of "
        f"each iteration for the driver's stop object ({opts['latency_ms']:g} ms here, on the critical path); "
        "polling: a read posted before its object exists finds it only at the next poll, up to one request "
        f"latency plus one poll interval later ({opts['latency_ms']:g} + {opts['latency_ms'] / 2:g} ms for a "
        "throttled store), and waiting workers check for the driver's abort object once a second; and the "
        "CPU that serialisation, Python and Ray take beside the profiled layers.",
        "",
        "## Where the time goes, and the contention that remains",
        "",
        "Per variant: \"unthrottled\" runs the same plan on bare `file://` storage in `/dev/shm`, against "
        "the simulator on a free link: the compute floor, plus the overheads no link causes (serialisation, "
        "polling, Python, Ray, the driver). \"compute share\" is the simulated share of the iteration the "
        "busiest stage computes. CPU use during the timed fits (launch and checkpoint included), in cores "
        f"of {machine['cpu_count']}: \"ours\" is this benchmark's process tree (driver, Ray, workers; "
        "`/proc/<pid>/stat`), \"others\" the rest of the machine's busy time (`/proc/stat`), \"stolen\" the "
        "hypervisor's steal time.",
        "",
    ]
    detail = [
        [name, f"{row['measured_s']:.3f}", f"{row['simulated_s']:.3f}", _pct(row["error"]),
         f"{row['simulated_compute_share']:.0%}", _cores(row["our_cores"]), _cores(row["other_cores"]),
         _cores(row["steal_cores"])]
        for name, row in rows.items()
    ]
    out += [
        _table(["variant", "measured s/it", "simulated s/it", "error", "compute share (sim.)", "cores: ours",
                "others", "stolen"], detail),
        "",
        "Per stage, seconds of compute per iteration of one worker (forward, backward, update): by the "
        "profile (what the simulator uses); measured alone (the same work in the driver process before Ray "
        "starts, one thread, nothing else of the benchmark running); and by the workers' own timers in the "
        "runs. \"profile error\" = profile / alone - 1; \"co-run slowdown\" = in the throttled run / alone - "
        "1: what workers computing at the same time (and the driver, Ray, the transfer threads) cost each "
        "other on this machine's shared cores, caches and memory bandwidth; \"simulator's error\" = profile / "
        "in the throttled run - 1, the two together.",
        "",
    ]
    compute_rows = []
    for name, row in rows.items():
        if not row["throttled"]:
            continue
        floor = rows.get(f"{name}/unthrottled")
        for stage, (sim_s, solo_s, run_s) in enumerate(
            zip(row["simulated_compute_s"], row["solo_compute_s"], row["measured_compute_s"], strict=True)
        ):
            compute_rows.append([
                name, str(stage), f"{sim_s:.3f}", f"{solo_s:.3f}", f"{run_s:.3f}",
                "-" if floor is None else f"{floor['measured_compute_s'][stage]:.3f}",
                _pct(sim_s / solo_s - 1), _pct(run_s / solo_s - 1), _pct(sim_s / run_s - 1),
            ])
    out += [
        _table(["system", "stage", "profile s", "alone s", "in run s", "in unthrottled run s", "profile error",
                "co-run slowdown", "simulator's error"], compute_rows),
        "",
    ]
    gaps = [
        [name, f"{row['measured_s'] - row['simulated_s']:+.3f}", f"{row['floor_gap_s']:+.3f}",
         f"{row['link_gap_s']:+.3f}"]
        for name, row in rows.items() if "floor_gap_s" in row
    ]
    if gaps:
        out += [
            "What the simulator misses per iteration (s), split: the part the unthrottled run shows too "
            "(contention and overheads without a link) and the rest (the emulated links, polling for objects):",
            "",
            _table(["variant", "measured - simulated", "of it: unthrottled gap", "of it: link gap"], gaps),
            "",
        ]
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth-factor", type=float, default=BANDWIDTH_FACTOR,
                        help=f"divide AWS Lambda's {AWS_BANDWIDTH_MB_S:g} MB/s by this (default: %(default)s)")
    parser.add_argument("--bandwidth-mb-s", type=float, default=None,
                        help="per-function bandwidth each way, MB/s (overrides --bandwidth-factor)")
    parser.add_argument("--latency-ms", type=float, default=AWS_LATENCY_MS / LATENCY_FACTOR,
                        help=f"storage latency per request, ms (default: AWS Lambda's {AWS_LATENCY_MS:g} / "
                        f"{LATENCY_FACTOR:g} = %(default)g)")
    parser.add_argument("--max-workers", type=int, default=min(2, _usable_cpus()),
                        help="most functions per system (default: usable CPUs, at most 2: %(default)s)")
    parser.add_argument("--micro-batch-sizes", default="4,8,16",
                        help="funcpipe's micro-batch sizes to plan for, comma-separated (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=12, help="iterations per timed fit (default: %(default)s)")
    parser.add_argument("--warmup-iterations", type=int, default=2,
                        help="iterations of each variant's warm-up fit (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved timed fits per variant (default: %(default)s)")
    parser.add_argument("--time-limit-s", type=float, default=5.0,
                        help="funcpipe.plan's time limit per call (default: %(default)s)")
    parser.add_argument("--solo-rounds", type=int, default=3,
                        help="timed rounds of each stage's compute alone, in the driver (default: %(default)s)")
    parser.add_argument("--no-floor", action="store_true", help="skip the unthrottled runs")
    parser.add_argument("--no-extra", action="store_true",
                        help="skip LambdaML with all --max-workers when its best uses fewer")
    parser.add_argument("--storage-dir", default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
                        help="parent of the storage directories (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                        help="where to write emulate.json and emulate.md (default: benchmarks/results)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args(argv)
    try:
        args.micro_batch_sizes = sorted({int(v) for v in args.micro_batch_sizes.split(",") if v.strip()})
    except ValueError:
        parser.error(f"--micro-batch-sizes takes comma-separated integers, got {args.micro_batch_sizes!r}")
    if not args.micro_batch_sizes or any(GLOBAL_BATCH % m or m < 1 for m in args.micro_batch_sizes):
        parser.error(f"--micro-batch-sizes must divide the global batch {GLOBAL_BATCH}")
    for name in ("iterations", "warmup_iterations", "repeats", "max_workers", "solo_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (the first iteration of a fit is not timed)")
    if args.bandwidth_mb_s is None:
        if args.bandwidth_factor <= 0:
            parser.error("--bandwidth-factor must be > 0")
        args.bandwidth_mb_s = AWS_BANDWIDTH_MB_S / args.bandwidth_factor
    if args.bandwidth_mb_s <= 0 or args.latency_ms < 0 or args.time_limit_s <= 0:
        parser.error("--bandwidth-mb-s and --time-limit-s must be > 0 and --latency-ms >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if "--sleep-compute" in given:  # the paper plans' scale, compute replaced by sleeps: its own options
        from benchmarks import emulate_scale

        given.remove("--sleep-compute")
        return emulate_scale.main(given)
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python benchmarks/emulate.py", *given])
    machine = machine_info()
    started = time.perf_counter()
    try:
        report = run(args)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    elapsed = time.perf_counter() - started
    try:
        machine["load_average_1min_at_end"] = os.getloadavg()[0]
    except OSError:
        machine["load_average_1min_at_end"] = float("nan")
    report = {"machine": machine, "command": command, "elapsed_s": elapsed, **report}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "emulate.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    markdown = render_markdown(machine, report, command) + f"\nTotal benchmark time: {elapsed:.0f} s.\n"
    (args.output_dir / "emulate.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {args.output_dir / 'emulate.json'} and {args.output_dir / 'emulate.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
