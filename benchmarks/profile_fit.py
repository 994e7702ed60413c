"""How well a profile predicts a whole model's time at micro-batch sizes 16 and 64.

    python benchmarks/profile_fit.py [--models resnet101 amoebanet_d18 ...] [--rounds 3] [--warmup 1]
                                     [--check 16 64] [--save-profiles]

For each benchmark model, side by side in one run, on one torch thread and the
thread's CPU clock (as ``funcpipe.profile`` times):

1. the old default profile: micro-batch sizes 1, 2, 4, times the linear fit
   ``alpha + beta * b``;
2. the new default: powers of two up to 64 (``funcpipe.profile`` without
   ``micro_batch_sizes``), times interpolated piecewise linearly;
3. the same new profile without the checked size (``new, size left out``):
   16 interpolated between 8 and 32, 64 extrapolated from 16 and 32 — the
   error at a size it did not measure;
4. the reference: the whole model's forward and backward (loss included) run
   as one graph at each checked size, the median of ``--rounds`` timed rounds.
   Where that graph's activations (the profile's held bytes times ``b``) do not
   fit ``--memory-gb``, the reference is an independent layer-by-layer profile
   at those sizes (and 1), and the table says so.

A profile predicts ``sum(forward_s(b) + backward_s(b))`` over the layers; the
error is ``predicted / measured - 1``. Writes ``benchmarks/results/profile_fit.
{json,md}`` (the models already there and not run again are kept); with
``--save-profiles`` also the new profiles to ``benchmarks/profiles/<model>.json``
(the optimizers of ``profile_models.py``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import funcpipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.models import MODELS, build
from benchmarks.profile_models import OPTIMIZERS, PROFILES

RESULTS = Path(__file__).parent / "results"
OLD_SIZES = (1, 2, 4)


def predicted(profile: funcpipe.ModelProfile, b: int) -> float:
    return sum(lp.forward_s(b) + lp.backward_s(b) for lp in profile.layers)


def without(profile: funcpipe.ModelProfile, b: int) -> funcpipe.ModelProfile:
    """The profile as if size ``b`` had not been measured."""
    layers = []
    for lp in profile.layers:
        assert lp.measured_sizes is not None and lp.forward_measured_s is not None
        assert lp.backward_measured_s is not None
        keep = [i for i, size in enumerate(lp.measured_sizes) if size != b]
        layers.append(dataclasses.replace(
            lp, measured_sizes=tuple(lp.measured_sizes[i] for i in keep),
            forward_measured_s=tuple(lp.forward_measured_s[i] for i in keep),
            backward_measured_s=tuple(lp.backward_measured_s[i] for i in keep),
        ))
    sizes = tuple(size for size in profile.micro_batch_sizes if size != b)
    return dataclasses.replace(profile, layers=tuple(layers), micro_batch_sizes=sizes)


def whole_model_seconds(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Any,
                        b: int, rounds: int, warmup: int) -> float:
    """Median thread-CPU seconds of the whole model's forward and backward at ``b`` samples, one thread."""
    model = copy.deepcopy(model)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds = []
    try:
        x, y = inputs[:b].clone(), targets[:b].clone()
        for r in range(warmup + rounds):
            started = time.thread_time()
            loss_fn(model(x), y).backward()
            elapsed = time.thread_time() - started
            if r >= warmup:
                seconds.append(elapsed)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(seconds)


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model, inputs, targets, loss_fn = build(name, batch=max(args.batch, *args.check))
    options = {"optimizer": OPTIMIZERS[name], "rounds": args.rounds, "warmup": args.warmup}
    started = time.perf_counter()
    old = funcpipe.profile(model, inputs, targets, loss_fn, micro_batch_sizes=OLD_SIZES, **options)
    old_s = time.perf_counter() - started
    print(f"{name}: old profile {OLD_SIZES} in {old_s:.0f} s", flush=True)
    started = time.perf_counter()
    new = funcpipe.profile(model, inputs, targets, loss_fn, progress=True, **options)
    new_s = time.perf_counter() - started
    print(f"{name}: new profile {new.micro_batch_sizes} in {new_s:.0f} s", flush=True)
    if args.save_profiles:
        new.save(PROFILES / f"{name}.json")
        print(f"{name}: saved {PROFILES / f'{name}.json'}", flush=True)

    held = sum(lp.held_bytes_per_sample for lp in new.layers)
    checks = []
    layered: funcpipe.ModelProfile | None = None
    for b in args.check:
        started = time.perf_counter()
        if held * b <= args.memory_gb * 1e9:
            reference, measured = "whole model", whole_model_seconds(model, inputs, targets, loss_fn, b,
                                                                      args.rounds, args.warmup)
        else:
            if layered is None:  # at the sizes that do not fit, and 1 (a profile measures two sizes at least)
                sizes = tuple(sorted({1, *(c for c in args.check if held * c > args.memory_gb * 1e9)}))
                layered = funcpipe.profile(model, inputs, targets, loss_fn, micro_batch_sizes=sizes, **options)
            reference, measured = "layer by layer", predicted(layered, b)
        print(f"{name}: measured {measured:.3f} s at b={b} ({reference}) in {time.perf_counter() - started:.0f} s",
              flush=True)
        row: dict[str, Any] = {"b": b, "reference": reference, "measured_s": measured}
        for key, profile in (("old", old), ("new", new), ("new_left_out", without(new, b))):
            seconds = predicted(profile, b)
            row[f"{key}_s"] = seconds
            row[f"{key}_error_pct"] = 100 * (seconds / measured - 1)
        checks.append(row)
    return {
        "model": name,
        "command": " ".join(sys.argv[1:]),
        "layers": new.num_layers,
        "old_sizes": list(old.micro_batch_sizes),
        "new_sizes": list(new.micro_batch_sizes),
        "old_profile_s": old_s,
        "new_profile_s": new_s,
        "held_gb_at_64": held * 64 / 1e9,
        "machine": {key: new.machine[key] for key in ("cpu", "torch", "clock")},
        "checks": checks,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Profile fit: predicted vs measured whole-model forward+backward time",
        "",
        "`python benchmarks/profile_fit.py`, one run per model (the commands below). One torch thread, "
        "thread CPU clock, the median of the timed rounds after the warm-up ones; "
        f"{results['machine']['cpu']}, torch {results['machine']['torch']}.",
        "",
        "*old*: the former default, sizes 1, 2, 4 and the linear fit `alpha + beta * b`. *new*: the new "
        "default, powers of two up to 64, interpolated piecewise linearly. *new, size left out*: the new "
        "profile without the checked size (16 interpolated between 8 and 32; 64 extrapolated from 16 and 32). "
        "Error = predicted / measured - 1. *reference*: how the measured time was taken (the whole model as "
        "one graph; or, where its activations exceed `--memory-gb`, an independent layer-by-layer profile "
        "at that size). A size missing for a model was not checked in its run.",
        "",
        "| model | b | measured s | reference | old s | old error | new s | new error | "
        "new, size left out | left-out error |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["models"]:
        for c in row["checks"]:
            lines.append(
                f"| {row['model']} | {c['b']} | {c['measured_s']:.3f} | {c['reference']} | {c['old_s']:.3f} | "
                f"{c['old_error_pct']:+.1f}% | {c['new_s']:.3f} | {c['new_error_pct']:+.1f}% | "
                f"{c['new_left_out_s']:.3f} | {c['new_left_out_error_pct']:+.1f}% |"
            )
    lines += ["", "| model | layers | old sizes | profiled in | new sizes | profiled in | command |",
              "|---|---:|---|---:|---|---:|---|"]
    for row in results["models"]:
        lines.append(
            f"| {row['model']} | {row['layers']} | {', '.join(map(str, row['old_sizes']))} | "
            f"{row['old_profile_s']:.0f} s | {', '.join(map(str, row['new_sizes']))} | {row['new_profile_s']:.0f} s | "
            f"`{row.get('command', '')}` |"
        )
    lines += ["", "Profiling time is wall time on a shared 2-core machine, with `--rounds` timed rounds after "
              "`--warmup` per size (a round at size b costs about b samples' forward and backward)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet101", "amoebanet_d18"], choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--check", type=int, nargs="+", default=[16, 64], help="sizes to check (default 16 64)")
    parser.add_argument("--batch", type=int, default=64, help="samples the new profile may measure (default 64)")
    parser.add_argument("--memory-gb", type=float, default=12.0,
                        help="largest activations the whole-model reference may hold (default 12)")
    parser.add_argument("--save-profiles", action="store_true", help="also write benchmarks/profiles/<model>.json")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "profile_fit.json"
    rows = []
    for name in args.models:
        rows.append(run_model(name, args))
        kept = json.loads(path.read_text())["models"] if path.exists() else []  # read late: runs may overlap
        kept = [row for row in kept if row["model"] not in args.models]
        order = list(MODELS)
        results = {
            "machine": rows[-1]["machine"],
            "models": sorted([*kept, *rows], key=lambda row: order.index(row["model"])),
        }
        path.write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / "profile_fit.md").write_text(markdown(results))
        print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
