"""How fast CP-SAT solves the planner's program, up to a 100-layer profile.

Synthetic profiles (20, 30 and 100 layers) shaped like a deep CNN (activations shrink and
parameters grow with depth, with per-layer noise), on AWS Lambda's 8 memory
tiers, up to 8 stages and 8 replicas per stage, global batch 64 in
micro-batches of 4. For each objective: the dynamic program's wall time alone
(:mod:`funcpipe.planner.dp`, the formula's proven optimum, or "-" when it ran out of
its share of the limit), CP-SAT's status, gap and wall time of one solve with a
10 s limit (the program included, whose plan and bound it starts from), then the whole ``funcpipe.plan`` call (solve,
re-ranking by the simulator) and its predicted seconds and dollars.

    python benchmarks/planner.py [--time-limit 10] [--layers 20 30 100]

Writes ``benchmarks/results/planner.json`` and ``planner.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import random
import time
from pathlib import Path

import funcpipe
from funcpipe.planner import DP_LIMIT_S, DP_SHARE, _Search, _undominated
from funcpipe.planner.model import Objective
from funcpipe.profiler import LayerProfile, ModelProfile

RESULTS = Path(__file__).parent / "results"


def synthetic_profile(layers: int, seed: int = 0) -> ModelProfile:
    """A deep-CNN-like profile: activation size falls and parameter size rises with depth."""
    rng = random.Random(seed)
    out = []
    for i in range(layers):
        depth = i / max(1, layers - 1)
        params = int(rng.uniform(0.6, 1.4) * (0.3e6 + 9e6 * depth))
        activation = rng.uniform(0.6, 1.4) * (1.6e6 * (1 - depth) + 0.1e6)
        out.append(LayerProfile(
            name=f"block{i}", forward_alpha_s=0.0005, forward_beta_s=rng.uniform(0.004, 0.012),
            backward_alpha_s=0.001, backward_beta_s=rng.uniform(0.008, 0.024), param_bytes=params,
            optimizer_bytes=2 * params, update_s=params / 2e9, output_bytes_per_sample=activation,
            held_bytes_per_sample=3 * activation,
        ))
    return ModelProfile(tuple(out), input_bytes_per_sample=3 * 224 * 224 * 4, target_bytes_per_sample=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--layers", type=int, nargs="+", default=[20, 30, 100])
    args = parser.parse_args()
    spec = funcpipe.platforms.get("aws_lambda")
    kwargs = {"global_batch_size": 64, "micro_batch_size": 4, "max_stages": 8, "max_replicas": 8}
    rows = []
    for layers, (name, weight) in itertools.product(args.layers, (("time", 1.0), ("cost", 0.0))):
        profile = synthetic_profile(layers)
        search = _Search.create(profile, spec, memory_mb=None, sync="pipelined", **kwargs)  # type: ignore[arg-type]
        problem = search.problem
        if weight >= 1:
            problem = dataclasses.replace(problem, tiers=_undominated(problem.tiers))
        started = time.perf_counter()
        proven = search.formula_bound(problem, Objective(weight), None, min(DP_SHARE * args.time_limit, DP_LIMIT_S))
        dp_wall = time.perf_counter() - started
        started = time.perf_counter()
        solution = search.solve(Objective(weight), None, None, (), args.time_limit)
        wall = time.perf_counter() - started
        assert solution is not None
        started = time.perf_counter()
        plan = funcpipe.plan(profile, spec, objective=name, time_limit_s=args.time_limit, **kwargs)  # type: ignore[arg-type]
        plan_wall = time.perf_counter() - started
        row = {
            "layers": layers,
            "objective": name,
            "dp_seconds": dp_wall if proven is not None else None,
            "dp_bound": proven[1] if proven is not None else None,
            "cpsat_status": solution.status,
            "cpsat_gap": solution.gap,
            "cpsat_seconds": wall,
            "formula_iteration_s": solution.iteration_s,
            "plan_seconds": plan_wall,
            "plan_balance": list(plan.balance),
            "plan_replicas": list(plan.replicas),
            "plan_memory_mb": list(plan.memory_mb or ()),
            "predicted_iteration_s": plan.predicted_iteration_s,
            "predicted_cost_usd": plan.predicted_cost_usd,
        }
        rows.append(row)
        dp_text = f"{dp_wall:.2f} s" if proven is not None else f"gave up after {dp_wall:.1f} s"
        print(f"{layers:>3} layers, {name:>4}: DP {dp_text}; CP-SAT {solution.status} gap {solution.gap:.2%} "
              f"in {wall:.1f} s; "
              f"funcpipe.plan {plan_wall:.1f} s -> {plan.num_stages} stages {list(plan.replicas)} replicas, "
              f"{plan.predicted_iteration_s:.3f} s and ${plan.predicted_cost_usd:.5f} per iteration")
    result = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "tiers": len(spec.tiers), "max_stages": 8, "max_replicas": 8,
        "time_limit_s": args.time_limit, "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "planner.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"Planner solve speed: synthetic profiles of {', '.join(map(str, args.layers))} layers, AWS Lambda's "
        f"{len(spec.tiers)} tiers, up to 8 stages "
        f"and 8 replicas, batch 64 / micro-batch 4, {os.cpu_count()} cores, {args.time_limit:g} s limit.",
        "",
        "| layers | objective | DP s | CP-SAT status | gap | CP-SAT s (DP included) | plan() s | stages "
        "| predicted s/iter | predicted $/iter |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layers']} | {row['objective']} | "
            f"{'-' if row['dp_seconds'] is None else format(row['dp_seconds'], '.2f')} | "
            f"{row['cpsat_status']} | {row['cpsat_gap']:.2%} | "
            f"{row['cpsat_seconds']:.1f} | "
            f"{row['plan_seconds']:.1f} | {len(row['plan_balance'])} | {row['predicted_iteration_s']:.3f} | "
            f"{row['predicted_cost_usd']:.5f} |"
        )
    (RESULTS / "planner.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
