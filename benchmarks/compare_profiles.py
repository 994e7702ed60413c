"""Profiles of the Hugging Face BERT-Large and ResNet-101 beside the hand-written ``nn.Sequential`` ones.

    python benchmarks/compare_profiles.py [--models hf_bert_large hf_resnet101] [--sizes 1 2] [--rounds 2]

For each model of :data:`benchmarks.models.HF_MODELS`, profiles the Hugging Face
model (split into units by :func:`funcpipe.split.split`) and its hand-written
counterpart (``name[3:]``) in one run, with the same micro-batch sizes, rounds
and optimizer (``benchmarks/profile_models.py``'s: SGD with momentum for the
CNN, Adam for BERT), one after the other, and writes
``benchmarks/results/hf_models.json`` and ``.md``: units vs layers, parameters,
forward+backward seconds per sample, the bytes crossing every cut and held for
backward per sample, and the units whose bytes or time differ most.

Small sizes and few rounds so that it runs in minutes; the times are noisy at
that (one torch thread, thread CPU time). ``transformers`` is imported only
when a Hugging Face model is built (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.models import HF_MODELS, build, build_hf

import funcpipe
from funcpipe.profiler import ModelProfile

RESULTS = Path(__file__).parent / "results"

OPTIMIZERS = {
    "resnet101": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "bert_large": lambda p: torch.optim.Adam(p, lr=1e-4),
}

#: Rows of the per-unit table per model.
TABLE_ROWS = 8


def _summary(prof: ModelProfile, params: int, seconds: float, b: int) -> dict[str, Any]:
    layers = prof.layers
    return {
        "layers": len(layers),
        "parameters": params,
        "param_bytes": prof.param_bytes,
        "tied": [list(t) for t in prof.tied],
        "fwd_bwd_s_per_sample": sum(lp.forward_s(b) + lp.backward_s(b) for lp in layers) / b,
        "update_s": sum(lp.update_s for lp in layers),
        # Every cut's bytes (what crosses if the model is cut everywhere), and what the gradients weigh.
        "cut_bytes_per_sample": sum(lp.output_bytes_per_sample for lp in layers[:-1]),
        "cut_grad_bytes_per_sample": sum(lp.gradient_bytes_per_sample for lp in layers[:-1]),
        "held_bytes_per_sample": sum(lp.held_bytes_per_sample for lp in layers),
        "input_bytes_per_sample": prof.input_bytes_per_sample,
        "profiled_s": seconds,
        "per_layer": [
            {"name": lp.name, "fwd_bwd_s": lp.forward_s(b) + lp.backward_s(b),
             "output_bytes": lp.output_bytes_per_sample, "grad_bytes": lp.gradient_bytes_per_sample,
             "held_bytes": lp.held_bytes_per_sample, "param_bytes": lp.param_bytes}
            for lp in layers
        ],
    }


def _profile(model: torch.nn.Module, inputs: Any, targets: torch.Tensor, loss_fn: Any, optimizer: Any,
             sizes: tuple[int, ...], rounds: int, warmup: int) -> tuple[ModelProfile, float]:
    started = time.perf_counter()
    prof = funcpipe.profile(model, inputs, targets, loss_fn, micro_batch_sizes=sizes, optimizer=optimizer,
                            rounds=rounds, warmup=warmup, progress=False)
    return prof, time.perf_counter() - started


def compare(name: str, sizes: tuple[int, ...], rounds: int, warmup: int) -> dict[str, Any]:
    hand_name = name[3:]
    b = max(sizes)
    row: dict[str, Any] = {"model": name, "hand_written": hand_name}
    for key, make in (("hf", lambda: build_hf(name, batch=b)), ("hand", lambda: build(hand_name, batch=b))):
        model, inputs, targets, loss_fn = make()
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        prof, seconds = _profile(model, inputs, targets, loss_fn, OPTIMIZERS[hand_name], sizes, rounds, warmup)
        row[key] = _summary(prof, params, seconds, b)
        if key == "hf":
            row["hf"]["split"] = prof.machine.get("split")
        print(f"{name if key == 'hf' else hand_name}: {len(prof.layers)} layers, {params / 1e6:.1f} M parameters, "
              f"{row[key]['fwd_bwd_s_per_sample']:.3f} s forward+backward per sample; profiled in {seconds:.0f} s",
              flush=True)
        del model, inputs, targets, prof
        gc.collect()
    row["differences"] = _differences(row["hf"]["per_layer"], row["hand"]["per_layer"])
    return row


def _differences(hf: list[dict[str, Any]], hand: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The unit/layer pairs (by position) that differ most: in bytes first, then in time."""
    rows = []
    for i, (u, lay) in enumerate(zip(hf, hand, strict=False)):
        bytes_off = max(abs(u[k] - lay[k]) / max(lay[k], u[k], 1.0) for k in ("output_bytes", "grad_bytes",
                                                                                 "held_bytes", "param_bytes"))
        time_off = abs(u["fwd_bwd_s"] / lay["fwd_bwd_s"] - 1) if lay["fwd_bwd_s"] > 0 else 0.0
        rows.append({"index": i, "unit": u["name"], "layer": lay["name"], "bytes_rel": bytes_off, "time_rel": time_off,
                     "hf": u, "hand": lay})
    rows.sort(key=lambda r: (-round(r["bytes_rel"], 3), -r["time_rel"]))
    return sorted(rows[:TABLE_ROWS], key=lambda r: r["index"])


def _kb(nbytes: float) -> str:
    return f"{nbytes / 1024:,.1f}"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Hugging Face models vs the hand-written ones: profiles side by side",
        "",
        f"`python benchmarks/compare_profiles.py {results['command']}`: micro-batch sizes "
        f"{', '.join(map(str, results['sizes']))}; {results['rounds']} timed round(s) after {results['warmup']} "
        f"warm-up one(s) per size; one torch thread, thread CPU time; {m['cpu']}, torch {m['torch']}, transformers "
        f"{results['transformers']}; {results['conditions']}.",
        "",
        "Times are per sample at the largest size, the sum over the layers of forward + backward (the last "
        "layer's includes the loss). *cut bytes*: what crosses all the cuts per sample (every value crossing "
        "a unit's boundary: ids, masks and sizes included), *grad*: what of it carries a gradient back; "
        "*held*: what autograd saves for backward per sample.",
        "",
        "| model | layers | parameters | fwd+bwd s/sample | cut KB/sample | grad KB/sample | held KB/sample | "
        "input KB/sample | profiled in |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["models"]:
        for key, name in (("hf", row["model"]), ("hand", row["hand_written"])):
            s = row[key]
            lines.append(
                f"| {name} | {s['layers']} | {s['parameters']:,} | {s['fwd_bwd_s_per_sample']:.3f} | "
                f"{_kb(s['cut_bytes_per_sample'])} | {_kb(s['cut_grad_bytes_per_sample'])} | "
                f"{_kb(s['held_bytes_per_sample'])} | {_kb(s['input_bytes_per_sample'])} | {s['profiled_s']:.0f} s |"
            )
    for row in results["models"]:
        lines += [
            "",
            f"## {row['model']} ({row['hf']['split']}) vs {row['hand_written']}: the units that differ most",
            "",
            "By position; KB per sample, seconds per micro-batch of the largest size.",
            "",
            "| # | unit | layer | out KB hf / hand | grad KB hf / hand | held KB hf / hand | params MB hf / hand | "
            "fwd+bwd s hf / hand |",
            "|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for d in row["differences"]:
            u, h = d["hf"], d["hand"]
            lines.append(
                f"| {d['index']} | {d['unit']} | {d['layer']} | {_kb(u['output_bytes'])} / {_kb(h['output_bytes'])} | "
                f"{_kb(u['grad_bytes'])} / {_kb(h['grad_bytes'])} | {_kb(u['held_bytes'])} / {_kb(h['held_bytes'])} | "
                f"{u['param_bytes'] / 2**20:.2f} / {h['param_bytes'] / 2**20:.2f} | "
                f"{u['fwd_bwd_s']:.4f} / {h['fwd_bwd_s']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(HF_MODELS), choices=list(HF_MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--conditions", default="a shared 2-core machine",
                        help="what the machine was doing, for the report")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import transformers

    sizes = tuple(sorted(set(args.sizes)))
    rows = [compare(name, sizes, args.rounds, args.warmup) for name in args.models]
    machine = funcpipe.profiler._machine(args.rounds, args.warmup)
    results = {
        "command": " ".join(sys.argv[1:]),
        "sizes": list(sizes),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "conditions": f"{args.conditions}, niceness {os.nice(0)}, load average {os.getloadavg()[0]:.2f} at the end",
        "transformers": transformers.__version__,
        "machine": machine,
        "models": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hf_models.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "hf_models.md").write_text(markdown(results))
    print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
