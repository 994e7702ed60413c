"""Measure the profiles of the paper's benchmark models on this machine.

    python benchmarks/profile_models.py [--models resnet101 bert_large ...] [--rounds 3] [--batch 64]

Profiles each model of ``benchmarks/models`` at ``funcpipe.profile``'s default
micro-batch sizes, the powers of two up to ``--batch`` (default 64, the
benchmarks' global batch), with one torch thread, and writes
``benchmarks/profiles/<model>.json``, which records the machine and the torch
version. The CNNs are profiled with SGD with momentum (their usual ImageNet
recipe), BERT-Large with Adam; the optimizer sets the state bytes per
parameter and the update time.

Run it on an otherwise idle machine: the planner's predictions are only as
good as these timings.

``--ties-only`` records in the existing profiles which layers share parameters
(``ModelProfile.tied``, from ``funcpipe.profiler.tied_parameters``), without
timing anything again: a tie changes no layer's time, output or parameter count
(each layer still holds the matrix), only what a stage holding both ends holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

import funcpipe
from funcpipe.profiler import tied_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.models import MODELS, build

PROFILES = Path(__file__).parent / "profiles"

OPTIMIZERS = {
    "resnet101": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "amoebanet_d18": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "amoebanet_d36": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "bert_large": lambda p: torch.optim.Adam(p, lr=1e-4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="the largest micro-batch size measured (default 64)")
    parser.add_argument("--out", type=Path, default=PROFILES, help="directory for the <model>.json profiles")
    parser.add_argument("--ties-only", action="store_true",
                        help="only record the models' tied parameters in the existing profiles")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ties_only:
        for name in args.models:
            path = args.out / f"{name}.json"
            model = build(name, batch=1)[0]
            tied = tied_parameters(model)
            dataclasses.replace(funcpipe.ModelProfile.load(path), tied=tied).save(path)
            print(f"{name}: tied {tied} -> {path}")
        return
    for name in args.models:
        started = time.perf_counter()
        model, inputs, targets, loss_fn = build(name, batch=args.batch)
        profile = funcpipe.profile(model, inputs, targets, loss_fn, optimizer=OPTIMIZERS[name],
                                   rounds=args.rounds, warmup=args.warmup, progress=True)
        path = args.out / f"{name}.json"
        profile.save(path)
        params = sum(lp.param_bytes for lp in profile.layers) / 4e6
        b = max(profile.micro_batch_sizes)
        step = sum(lp.forward_s(b) + lp.backward_s(b) for lp in profile.layers)
        print(f"{name}: {profile.num_layers} layers, {params:.1f} M parameters, {step:.2f} s forward+backward "
              f"per micro-batch of {b}; profiled in {time.perf_counter() - started:.0f} s -> {path}")
        del model


if __name__ == "__main__":
    main()
