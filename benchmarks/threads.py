"""How much a second vCPU speeds up the benchmark models, by micro-batch size.

    python benchmarks/threads.py [--models resnet101 bert_large ...] [--repeats 3]

A function tier with ``v`` vCPUs runs a stage at ``1 + e(b) (v - 1)`` times the
speed of the one-thread profile, where ``e(b)`` is the share of each further
vCPU that torch's intra-op parallelism actually uses at micro-batch size ``b``
(:meth:`funcpipe.platforms.Tier.speed_at`). This machine has 2 cores, so it
can show ``e(b)`` for a second thread: for each model, a slice of its layers
(a few blocks from the middle, where most of the time goes) runs forward and
backward at every batch size with 1 and with 2 torch threads, interleaved,
``--repeats`` times (wall clock, medians). ``e(b) = t1 / t2 - 1``.

The fit ``e(b) = e_max * b / (b + h)`` (least squares over a grid of ``h``) is
what :data:`funcpipe.platforms.base.PARALLEL_HALF_BATCH` and
:data:`funcpipe.platforms.base.PARALLEL_EFFICIENCY` record. What 3 to 6 vCPUs
give on a real function is not measurable here: those stay a documented
platform parameter (override a tier's ``speed`` and ``speed_half_batch`` with a
measurement on the platform itself).

Run it on an otherwise idle machine: with another process on the second core
``t2`` is as slow as ``t1``. Writes ``benchmarks/results/threads.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.models import build

RESULTS = Path(__file__).parent / "results"
SIZES = (1, 2, 4, 8, 16, 32, 64)
#: name -> the slice of layers timed (a few middle blocks of each model).
SLICES = {"resnet101": slice(12, 16), "amoebanet_d18": slice(8, 10), "bert_large": slice(10, 12)}


def step_s(layers: nn.Sequential, x: torch.Tensor, threads: int) -> float:
    """Wall seconds of one forward and backward of ``layers`` on ``x`` with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    for p in layers.parameters():
        p.grad = None
    x = x.detach().requires_grad_(x.is_floating_point())
    started = time.perf_counter()
    out = layers(x)
    out.float().sum().backward()
    return time.perf_counter() - started


def measure(name: str, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for b in SIZES:
        model, inputs, _, _ = build(name, batch=b)
        part = SLICES[name]
        torch.set_num_threads(2)
        with torch.no_grad():
            x = inputs
            for layer in list(model)[: part.start]:
                x = layer(x)
        layers = nn.Sequential(*list(model)[part])
        step_s(layers, x, 1), step_s(layers, x, 2)  # warm-up
        one, two = [], []
        for _ in range(repeats):
            one.append(step_s(layers, x, 1))
            two.append(step_s(layers, x, 2))
        t1, t2 = statistics.median(one), statistics.median(two)
        rows.append({"model": name, "batch": b, "one_thread_s": t1, "two_threads_s": t2,
                     "efficiency": t1 / t2 - 1})
        print(f"{name} b={b}: 1 thread {t1 * 1e3:.1f} ms, 2 threads {t2 * 1e3:.1f} ms, e={t1 / t2 - 1:.2f}",
              flush=True)
        del model, layers, x
    return rows


def fit(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """``(e_max, h)`` minimising the squared error of ``e_max * b / (b + h)`` over every row."""
    best: tuple[float, float, float] | None = None
    for i in range(1, 641):
        h = i / 10
        shape = [r["batch"] / (r["batch"] + h) for r in rows]
        e = [r["efficiency"] for r in rows]
        e_max = sum(s * y for s, y in zip(shape, e, strict=True)) / sum(s * s for s in shape)
        e_max = min(max(e_max, 0.0), 1.0)
        err = sum((e_max * s - y) ** 2 for s, y in zip(shape, e, strict=True))
        if best is None or err < best[0]:
            best = (err, e_max, h)
    assert best is not None
    return best[1], best[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SLICES), choices=list(SLICES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows = [row for name in args.models for row in measure(name, args.repeats)]
    e_max, h = fit(rows)
    per_model = {name: fit([r for r in rows if r["model"] == name]) for name in args.models}
    result = {
        "machine": {"cpus": os.cpu_count(), "cpu": host.processor() or host.machine(), "torch": torch.__version__,
                    "load_before": load_before, "load_after": os.getloadavg()[0]},
        "command": "python benchmarks/threads.py " + " ".join(sys.argv[1:]),
        "rows": rows, "fit": {"e_max": e_max, "half_batch": h},
        "fit_per_model": {k: {"e_max": v[0], "half_batch": v[1]} for k, v in per_model.items()},
        "wall_s": time.perf_counter() - started,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# A second vCPU's speed-up by micro-batch size",
        "",
        f"Command: `{result['command']}`; {os.cpu_count()} CPUs, torch {torch.__version__}, load average "
        f"{load_before:.2f} before, {result['machine']['load_after']:.2f} after; {result['wall_s']:.0f} s.",
        "",
        "Forward + backward of a slice of each model (" + ", ".join(
            f"{k} layers {SLICES[k].start}-{SLICES[k].stop - 1}" for k in args.models)
        + f"), wall clock, medians of {args.repeats} interleaved repeats. e = t1 / t2 - 1: the share of "
        "the second thread used.",
        "",
        "| model | " + " | ".join(f"b={b}" for b in SIZES) + " | fit e_max | fit h |",
        "|---|" + "---:|" * (len(SIZES) + 2),
    ]
    for name in args.models:
        es = {r["batch"]: r["efficiency"] for r in rows if r["model"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{es[b]:.2f}" for b in SIZES)
                     + f" | {per_model[name][0]:.2f} | {per_model[name][1]:.1f} |")
    lines += ["", f"Fit over every model: e(b) = {e_max:.2f} * b / (b + {h:.1f}).", ""]
    (RESULTS / "threads.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
