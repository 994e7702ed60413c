"""The FuncPipe paper's comparison: funcpipe vs LambdaML, by the simulator.

    python benchmarks/paper.py [--models resnet101 ...] [--platforms aws_lambda alibaba_fc]
                               [--time-limit 20] [--update]

For each benchmark model (profiles in ``benchmarks/profiles/``, measured by
``benchmarks/profile_models.py``) on AWS Lambda + S3 and Function Compute + OSS,
at global batch 64:

* funcpipe's time-optimal and cost-optimal plans (``funcpipe.plan`` with its defaults:
  micro-batch size, schedule and per-stage all-reduce chosen);
* the same with the FuncPipe paper's configuration fixed (micro-batch 4, GPipe,
  pipelined all-reduce), as the earlier versions of this benchmark planned;
* LambdaML's best configuration under the same objectives (``funcpipe.baselines.lambdaml``:
  whole model per function, four-phase scatter-reduce, any worker count), or "does not fit";
* one function training the whole batch by gradient accumulation
  (``funcpipe.baselines.accumulation``: any micro-batch size and tier);
* the speed-up (LambdaML's fastest seconds / funcpipe's fastest) and the cost saving
  (1 - funcpipe's cheapest dollars / LambdaML's cheapest), and where funcpipe's plan is
  itself a single function, a note that the gain is not the pipeline's;
* an ablation of funcpipe's time-optimal plan: without the download/compute/upload
  overlap (the same plan, simulated without it), with the four-phase scatter-reduce
  instead of the pipelined one (re-planned), and with one memory tier for all stages
  (re-planned on each tier, the best kept);
* the cost–time frontier (``funcpipe.pareto``) with LambdaML's configurations.

Every figure is the simulator's prediction per iteration. Writes
``benchmarks/results/paper.json``, ``paper.md`` and ``paper_<model>_<platform>.png`` /
``paper_bars.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import funcpipe
from funcpipe import costmodel
from funcpipe.baselines import accumulation, lambdaml
from funcpipe.errors import PlanInfeasible, PlanTimeout
from funcpipe.plans import Plan

HERE = Path(__file__).parent
PROFILES = HERE / "profiles"
RESULTS = HERE / "results"
MODELS = ("resnet101", "amoebanet_d18", "amoebanet_d36", "bert_large")
PLATFORMS = ("aws_lambda", "alibaba_fc")
GLOBAL_BATCH = 64
#: The FuncPipe paper's configuration: micro-batches of 4 under GPipe, funcpipe's all-reduce.
PAPER_CONFIG: dict[str, Any] = {"micro_batch_size": 4, "schedule": "gpipe", "sync": "pipelined"}
#: The paper's claims (Liu et al., arXiv 2204.13561, abstract): speed-up and cost saving over LambdaML.
PAPER_SPEEDUP = (1.3, 2.2)
PAPER_SAVING = (0.07, 0.77)


def summary(plan: Plan | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    return {
        "balance": list(plan.balance), "replicas": list(plan.replicas), "memory_mb": list(plan.memory_mb or ()),
        "sync": plan.sync if isinstance(plan.sync, str) else list(plan.sync),
        "micro_batch_size": plan.micro_batch_size, "schedule": plan.schedule,
        "seconds": plan.predicted_iteration_s, "dollars": plan.predicted_cost_usd,
        "solver_status": plan.solver_status, "solver_gap": plan.solver_gap, "solve_s": plan.solve_s,
    }


def compare(name: str, spec: funcpipe.platforms.Platform, limit: float, profiles: Path) -> dict[str, Any]:
    profile = funcpipe.ModelProfile.load(profiles / f"{name}.json")
    kwargs: dict[str, Any] = {"global_batch_size": GLOBAL_BATCH, "progress": False}
    started = time.perf_counter()
    fastest = funcpipe.plan(profile, spec, objective="time", time_limit_s=limit, **kwargs)
    cheapest = funcpipe.plan(profile, spec, objective="cost", time_limit_s=limit, **kwargs)
    paper_fastest = funcpipe.plan(profile, spec, objective="time", time_limit_s=limit, **PAPER_CONFIG, **kwargs)
    paper_cheapest = funcpipe.plan(profile, spec, objective="cost", time_limit_s=limit, **PAPER_CONFIG, **kwargs)
    try:
        lm_fastest: Plan | None = lambdaml(profile, spec, global_batch_size=GLOBAL_BATCH, objective="time")
        lm_cheapest: Plan | None = lambdaml(profile, spec, global_batch_size=GLOBAL_BATCH, objective="cost")
        lm_note = ""
    except PlanInfeasible as exc:
        lm_fastest = lm_cheapest = None
        lm_note = str(exc)
    try:
        acc_fastest: Plan | None = accumulation(profile, spec, global_batch_size=GLOBAL_BATCH, objective="time")
        acc_cheapest: Plan | None = accumulation(profile, spec, global_batch_size=GLOBAL_BATCH, objective="cost")
    except PlanInfeasible:
        acc_fastest = acc_cheapest = None
    assert fastest.predicted_iteration_s is not None and cheapest.predicted_cost_usd is not None

    # Ablation of the time-optimal plan.
    no_overlap = funcpipe.simulate(fastest, profile, spec, overlap=False).iteration_s
    try:
        four_phase: Plan | None = funcpipe.plan(profile, spec, objective="time", time_limit_s=limit,
                                                sync="four_phase", **kwargs)
    except PlanTimeout:  # reported as missing, never silently replaced
        four_phase = None
    one_tier: Plan | None = None
    for tier in spec.tiers:
        try:
            candidate = funcpipe.plan(profile, spec, objective="time", time_limit_s=limit / 4,
                                      memory_mb=tier.memory_mb, **kwargs)
        except (PlanInfeasible, PlanTimeout):  # the tier is too small, or no plan of it found in time
            continue
        if one_tier is None or candidate.predicted_iteration_s < one_tier.predicted_iteration_s:  # type: ignore[operator]
            one_tier = candidate
    frontier = funcpipe.pareto(profile, spec, time_limit_s=2 * limit, **kwargs)

    row: dict[str, Any] = {
        "model": name, "platform": spec.name, "layers": profile.num_layers,
        "parameters_m": sum(lp.param_bytes for lp in profile.layers) / 4e6,
        "funcpipe_fastest": summary(fastest), "funcpipe_cheapest": summary(cheapest),
        "paper_config_fastest": summary(paper_fastest), "paper_config_cheapest": summary(paper_cheapest),
        "lambdaml_fastest": summary(lm_fastest), "lambdaml_cheapest": summary(lm_cheapest),
        "accumulation_fastest": summary(acc_fastest), "accumulation_cheapest": summary(acc_cheapest),
        "lambdaml_note": lm_note,
        "ablation_seconds": {
            "funcpipe": fastest.predicted_iteration_s,
            "no_overlap": no_overlap,
            "four_phase": None if four_phase is None else four_phase.predicted_iteration_s,
            "one_tier": None if one_tier is None else one_tier.predicted_iteration_s,
        },
        "frontier": [summary(p) for p in frontier],
        "wall_s": time.perf_counter() - started,
    }
    if lm_fastest is not None and lm_cheapest is not None:
        assert lm_fastest.predicted_iteration_s is not None and lm_cheapest.predicted_cost_usd is not None
        row["speedup"] = lm_fastest.predicted_iteration_s / fastest.predicted_iteration_s
        row["cost_saving"] = 1 - cheapest.predicted_cost_usd / lm_cheapest.predicted_cost_usd
        row["cost_terms"] = {"funcpipe": cost_terms(profile, spec, cheapest),
                             "lambdaml": cost_terms(profile, spec, lm_cheapest)}
    row["never_worse"] = never_worse(row)
    return row


#: How much worse than each rival funcpipe's plan may be (issue 13): nothing against the baselines
#: whose whole spaces the planner enumerates by the simulator (one function, LambdaML); 1% against
#: the paper's configuration, whose pipelines the planner ranks by its formula and re-ranks by the
#: simulator only among the best few (a separate search at that configuration may find another).
TOLERANCE = {"lambdaml": 1e-9, "accumulation": 1e-9, "paper_config": 0.01}


def never_worse(row: dict[str, Any]) -> dict[str, bool]:
    """funcpipe's plans against each rival's under the same objective, within :data:`TOLERANCE`."""
    out = {}
    for rival, slack in TOLERANCE.items():
        for objective, field in (("fastest", "seconds"), ("cheapest", "dollars")):
            theirs = row[f"{rival}_{objective}"]
            if theirs is not None:
                out[f"{objective} vs {rival}"] = row[f"funcpipe_{objective}"][field] <= theirs[field] * (1 + slack)
    return out


def single_function(plan: dict[str, Any]) -> bool:
    return plan["replicas"] == [1]


def cost_terms(profile: funcpipe.ModelProfile, spec: funcpipe.platforms.Platform, plan: Plan) -> dict[str, float]:
    """What a plan's dollars are made of: storage requests, and compute's per-micro-batch fixed part.

    ``fixed_compute_s`` is the profile's per-call forward and backward time summed over
    layers, times the micro-batches each replica runs: the part of compute that does not
    shrink with the micro-batch size. Per call it is the intercept of the time between one
    and two samples, ``2 t(1) - t(2)`` (a linear fit's alpha).
    """
    stages = costmodel.stage_costs(profile, spec, plan)
    writes, reads = costmodel.requests_per_iteration(stages, plan)
    alpha = sum(max(0.0, 2 * (lp.forward_s(1) + lp.backward_s(1)) - lp.forward_s(2) - lp.backward_s(2))
                for lp in profile.layers)
    per_replica = -(-plan.num_micro_batches // max(plan.replicas))
    return {"request_usd": writes * spec.price_per_put + reads * spec.price_per_get, "writes": writes,
            "reads": reads, "fixed_compute_s": alpha * per_replica, "functions": sum(plan.replicas)}


def plot_frontier(row: dict[str, Any], path: Path) -> None:
    figure, ax = plt.subplots(figsize=(7, 4.5))
    points = sorted((p["seconds"], p["dollars"]) for p in row["frontier"])
    ax.plot([s for s, _ in points], [d for _, d in points], "o-", label="funcpipe frontier")
    for key, marker in (("lambdaml_fastest", "s"), ("lambdaml_cheapest", "D")):
        if row[key] is not None:
            ax.plot(row[key]["seconds"], row[key]["dollars"], marker, color="tab:red",
                    label=key.replace("_", " ").replace("lambdaml", "LambdaML"))
    ax.set_xlabel("seconds per iteration")
    ax.set_ylabel("dollars per iteration")
    ax.set_title(f"{row['model']} on {row['platform']}")
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_bars(rows: list[dict[str, Any]], path: Path) -> None:
    figure, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['model']}\n{r['platform']}" for r in rows]
    x = range(len(rows))
    width = 0.38
    panels = ((ax_t, "funcpipe_fastest", "lambdaml_fastest", "seconds", "s / iteration"),
              (ax_c, "funcpipe_cheapest", "lambdaml_cheapest", "dollars", "$ / iteration"))
    for ax, fp_key, lm_key, field, unit in panels:
        ax.bar([i - width / 2 for i in x], [r[fp_key][field] for r in rows], width, label="funcpipe")
        ax.bar([i + width / 2 for i in x], [r[lm_key][field] if r[lm_key] else 0 for r in rows], width,
               label="LambdaML (0: does not fit)")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel(unit)
        ax.legend()
    ax_t.set_title("time-optimal plans")
    ax_c.set_title("cost-optimal plans")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _fmt(value: float | None, spec: str, missing: str = "-", suffix: str = "") -> str:
    return missing if value is None else f"{value:{spec}}{suffix}"


def _choice(plan: dict[str, Any] | None) -> str:
    if plan is None:
        return "does not fit"
    workers = sum(plan["replicas"])
    return (f"{len(plan['balance'])} st / {workers} fn, b={plan['micro_batch_size']}, {plan['schedule']}")


def markdown(rows: list[dict[str, Any]], limit: float) -> str:
    lines = [
        f"funcpipe vs LambdaML and one function with gradient accumulation, by the simulator: global batch "
        f"{GLOBAL_BATCH}, planner time limit {limit:g} s; funcpipe chooses the micro-batch size (b), the schedule "
        f"and the all-reduce. Paper's claim: {PAPER_SPEEDUP[0]}x-{PAPER_SPEEDUP[1]}x faster, "
        f"{PAPER_SAVING[0]:.0%}-{PAPER_SAVING[1]:.0%} cheaper than LambdaML. \"st / fn\": stages and functions.",
        "",
        "Time-optimal plans (seconds per iteration):",
        "",
        "| model | platform | funcpipe | chosen | paper config (b=4, GPipe) | LambdaML | its config | one function "
        "| its config | speed-up vs LambdaML | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp, pc, lm, acc = (r[f"{k}_fastest"] for k in ("funcpipe", "paper_config", "lambdaml", "accumulation"))
        note = "one function: not a pipeline win" if single_function(fp) else ""
        lines.append("| " + " | ".join([
            r["model"], r["platform"], _fmt(fp["seconds"], ".2f"), _choice(fp), _fmt(pc and pc["seconds"], ".2f"),
            _fmt(lm and lm["seconds"], ".2f", "does not fit"), _choice(lm), _fmt(acc and acc["seconds"], ".2f",
                                                                              "does not fit"),
            _choice(acc), _fmt(r.get("speedup"), ".2f", suffix="x"), note]) + " |")
    lines += [
        "",
        "Cost-optimal plans (dollars per iteration):",
        "",
        "| model | platform | funcpipe | chosen | paper config (b=4, GPipe) | LambdaML | its config | one function "
        "| its config | saving vs LambdaML | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp, pc, lm, acc = (r[f"{k}_cheapest"] for k in ("funcpipe", "paper_config", "lambdaml", "accumulation"))
        if single_function(fp):
            note = "one function: not a pipeline win"
        elif acc is not None and acc["dollars"] <= fp["dollars"] * 1.01:
            note = "within 1% of one function"
        else:
            note = ""
        lines.append("| " + " | ".join([
            r["model"], r["platform"], _fmt(fp["dollars"], ".5f"), _choice(fp), _fmt(pc and pc["dollars"], ".5f"),
            _fmt(lm and lm["dollars"], ".5f", "does not fit"), _choice(lm),
            _fmt(acc and acc["dollars"], ".5f", "does not fit"), _choice(acc), _fmt(r.get("cost_saving"), ".0%"),
            note]) + " |")
    lines += [
        "",
        "Where the gain over LambdaML comes from: time, LambdaML's fastest / the paper's configuration's "
        "(pipelining, at micro-batches of 4 under GPipe) x the paper's configuration's / funcpipe's (choosing "
        "the micro-batch size, schedule and all-reduce); cost, LambdaML's cheapest / one function's "
        "(gradient accumulation, no pipeline) x one function's / funcpipe's (the pipeline's own part).",
        "",
        "| model | platform | speed: pipelining | speed: choices | cost: accumulation | cost: pipeline |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lm_t, pc_t, fp_t = (r[k] and r[k]["seconds"] for k in ("lambdaml_fastest", "paper_config_fastest",
                                                                 "funcpipe_fastest"))
        lm_c, acc_c, fp_c = (r[k] and r[k]["dollars"] for k in ("lambdaml_cheapest", "accumulation_cheapest",
                                                                 "funcpipe_cheapest"))
        lines.append("| " + " | ".join([
            r["model"], r["platform"], _fmt(lm_t and pc_t and lm_t / pc_t, ".2f", suffix="x"),
            _fmt(pc_t and fp_t and pc_t / fp_t, ".2f", suffix="x"),
            _fmt(lm_c and acc_c and lm_c / acc_c, ".2f", suffix="x"),
            _fmt(acc_c and fp_c and acc_c / fp_c, ".2f", suffix="x")]) + " |")
    lines += [
        "",
        "Ablation of funcpipe's time-optimal plan (seconds per iteration):",
        "",
        "| model | platform | funcpipe | no overlap | four-phase all-reduce | one tier |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ab = r["ablation_seconds"]
        lines.append("| " + " | ".join([r["model"], r["platform"], _fmt(ab["funcpipe"], ".2f"),
                                        _fmt(ab["no_overlap"], ".2f"), _fmt(ab["four_phase"], ".2f"),
                                        _fmt(ab["one_tier"], ".2f")]) + " |")
    checks = [f"{r['model']} on {r['platform']}: {k}" for r in rows for k, ok in r["never_worse"].items() if not ok]
    lines += ["", "Never worse than a baseline (the same simulator; within 1% of the paper's configuration): "
              + ("every plan is at least as good as each rival's." if not checks else "FAILS for " + "; ".join(checks)),
              "", "Targets (issue 5): time-optimal plan >= "
              f"{PAPER_SPEEDUP[0]}x faster and cost-optimal plan >= {PAPER_SAVING[0]:.0%} cheaper than "
              "LambdaML's best, wherever LambdaML fits.", ""]
    lines += [f"- {line}" for line in target_lines(rows)]
    return "\n".join(lines) + "\n"


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per model and platform: met, missed by how much, or LambdaML does not fit."""
    out = []
    for r in rows:
        where = f"{r['model']} on {r['platform']}"
        if r.get("speedup") is None:
            out.append(f"{where}: LambdaML does not fit ({r['lambdaml_note'].split(';')[0]})")
            continue
        speed, saving = r["speedup"], r["cost_saving"]
        speed_text = (f"speed-up {speed:.2f}x meets {PAPER_SPEEDUP[0]}x" if speed >= PAPER_SPEEDUP[0]
                      else f"speed-up {speed:.2f}x MISSES {PAPER_SPEEDUP[0]}x by {PAPER_SPEEDUP[0] - speed:.2f}x")
        save_text = (f"saving {saving:.0%} meets {PAPER_SAVING[0]:.0%}" if saving >= PAPER_SAVING[0]
                     else f"saving {saving:.1%} MISSES {PAPER_SAVING[0]:.0%} by {PAPER_SAVING[0] - saving:.1%} points")
        line = f"{where}: {speed_text}; {save_text}"
        if saving < PAPER_SAVING[0]:
            line += " — " + miss_reason(r)
        out.append(line)
    return out


def miss_reason(r: dict[str, Any]) -> str:
    """Why funcpipe's cheapest plan is not 7% cheaper, from the plans and their cost terms."""
    lm, fp = r["lambdaml_cheapest"], r["funcpipe_cheapest"]
    terms = r["cost_terms"]
    parts = []
    if lm["replicas"] == [1]:
        parts.append(f"LambdaML's cheapest is one {lm['memory_mb'][0]} MB function holding the whole model "
                     f"and batch of {GLOBAL_BATCH}: no transfers and no gradient sync to pay for")
    parts.append(f"funcpipe's cheapest ({len(fp['balance'])} stage(s) on {fp['memory_mb']} MB) pays "
                 f"${terms['funcpipe']['request_usd']:.5f} in storage requests "
                 f"({terms['funcpipe']['writes']} writes, {terms['funcpipe']['reads']} reads; LambdaML "
                 f"${terms['lambdaml']['request_usd']:.5f}) and {terms['funcpipe']['fixed_compute_s']:.2f} s of "
                 f"per-call compute over its micro-batches of {fp['micro_batch_size']} (LambdaML "
                 f"{terms['lambdaml']['fixed_compute_s']:.2f} s)")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--platforms", nargs="+", default=list(PLATFORMS), choices=PLATFORMS)
    parser.add_argument("--time-limit", type=float, default=20.0)
    parser.add_argument("--profiles", type=Path, default=PROFILES, help="where the <model>.json profiles are")
    parser.add_argument("--update", action="store_true",
                        help="keep the rows of paper.json this run does not redo (same time limit only)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    kept: list[dict[str, Any]] = []
    if args.update and (RESULTS / "paper.json").is_file():
        previous = json.loads((RESULTS / "paper.json").read_text())
        if previous["time_limit_s"] != args.time_limit:
            parser.error(f"--update: paper.json was run with --time-limit {previous['time_limit_s']:g}, "
                         f"not {args.time_limit:g}; hint: pass --time-limit {previous['time_limit_s']:g}")
        redone = {(m, p) for m in args.models for p in args.platforms}
        kept = [r for r in previous["rows"] if (r["model"], r["platform"]) not in redone]
    rows = []
    for name in args.models:
        for platform_name in args.platforms:
            row = compare(name, funcpipe.platforms.get(platform_name), args.time_limit, args.profiles)
            rows.append(row)
            plot_frontier(row, RESULTS / f"paper_{name}_{platform_name}.png")
            versus = "does not fit" if row["lambdaml_fastest"] is None else (
                f"{row['lambdaml_fastest']['seconds']:.2f} s / ${row['lambdaml_cheapest']['dollars']:.5f}; "
                f"speed-up {row['speedup']:.2f}x, saving {row['cost_saving']:.0%}"
            )
            print(f"{name} on {platform_name}: funcpipe {row['funcpipe_fastest']['seconds']:.2f} s / "
                  f"${row['funcpipe_cheapest']['dollars']:.5f}; LambdaML {versus} ({row['wall_s']:.0f} s)", flush=True)
    order = {(m, p): i for i, (m, p) in enumerate((m, p) for m in MODELS for p in PLATFORMS)}
    rows = sorted(kept + rows, key=lambda r: order.get((r["model"], r["platform"]), len(order)))
    for r in rows:
        r["never_worse"] = never_worse(r)
    plot_bars(rows, RESULTS / "paper_bars.png")
    (RESULTS / "paper.json").write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "processor": host.processor() or host.machine()},
        "global_batch_size": GLOBAL_BATCH, "paper_config": PAPER_CONFIG, "time_limit_s": args.time_limit,
        "paper": {"speedup": PAPER_SPEEDUP, "cost_saving": PAPER_SAVING}, "rows": rows,
    }, indent=1) + "\n")
    (RESULTS / "paper.md").write_text(markdown(rows, args.time_limit))


if __name__ == "__main__":
    main()
