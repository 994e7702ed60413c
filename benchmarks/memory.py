"""Benchmark the memory model against real peaks; writes ``benchmarks/results/memory.{json,md}``.

Several models (an MLP of wide linear layers, a bottleneck ResNet, a small BERT
built from its config) are profiled with :func:`funcpipe.profile` and trained
under several plans (stage counts, replicas for the all-reduce's buffers,
micro-batch counts) and both schedules, with file storage, through funcpipe's
normal :class:`funcpipe.Trainer` path. Workers run where a function runs: the real
AWS Lambda entry (``awslambdaric`` and ``backends/aws_lambda/handler.py``, one
fresh process per worker and run) behind the loopback fake of
``tests/fakes/aws_lambda.py``, driven by :class:`funcpipe.backends.AWSLambda`;
``--backends lambda ray`` adds local Ray actors (whose processes also carry Ray's
runtime). Each worker reports the peak resident memory of its process during the
run (``VmHWM``, reset when the run begins: :func:`funcpipe.worker.reset_peak_rss`);
the table puts it next to :func:`funcpipe.costmodel.stage_memory_bytes` on the
``local`` platform, whose runtime constant is the resident memory of the function
entry after its init (measured here too: see ``runtime`` in the JSON).

Target (issue 13): the prediction is never below the measured peak, and at most
1.3 times above it for stages whose measured peak is 200 MB or more.

Run ``python benchmarks/memory.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch
from torch import nn

import funcpipe
from funcpipe import Plan, Trainer, costmodel
from funcpipe.backends import AWSLambda, Ray, Timing
from funcpipe.platforms.base import MIB
from funcpipe.protocol import SYNC_IN_FLIGHT_BYTES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.models.bert import BertConfig, bert
from benchmarks.models.resnet import resnet
from tests.fakes.aws_lambda import FakeLambda

log = logging.getLogger("funcpipe.benchmarks.memory")

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
LAMBDA_ENTRY = ROOT / "backends" / "aws_lambda"

#: The issue's target: prediction / measured within [1, MAX_RATIO] for stages of at least LARGE_MB.
MAX_RATIO = 1.3
LARGE_MB = 200.0

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Case:
    """One model, its data and the plans it trains under (each under both schedules)."""

    name: str
    make: Callable[[], nn.Sequential]
    batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: LossFn
    optimizer: str  # "adam" or "sgd"
    micro_batch_size: int
    plans: tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...]  # (balance, replicas, micro-batches)


def _mlp() -> nn.Sequential:
    width = 4096
    layers: list[nn.Module] = [nn.Linear(1024, width), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 16))
    return nn.Sequential(*layers)


def _mlp_batch(b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, 1024, generator=gen), torch.randn(b, 16, generator=gen)


def _resnet() -> nn.Sequential:
    return resnet((2, 2, 2, 2), 100)


def _image_batch(b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, 3, 160, 160, generator=gen), torch.randint(0, 100, (b,), generator=gen)


BERT_SMALL = BertConfig(hidden=512, layers=4, heads=8, intermediate=2048, sequence_length=128)


def _bert() -> nn.Sequential:
    return bert(BERT_SMALL)


def _token_batch(b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (b, BERT_SMALL.sequence_length)
    return (torch.randint(0, BERT_SMALL.vocab_size, shape, generator=gen),
            torch.randint(0, BERT_SMALL.vocab_size, shape, generator=gen))


def _masked_lm(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


CASES = (
    # 9 layers: 1024->4096, 3 x 4096->4096 (64 MB of weights each), ReLUs, a 4096->16 head.
    Case("mlp", _mlp, _mlp_batch, nn.functional.mse_loss, "adam", 32, (
        ((9,), (1,), 4),
        ((4, 5), (1, 1), 4),
        ((4, 5), (2, 1), 6),
        ((2, 4, 3), (1, 1, 1), 8),
    )),
    # ResNet with (2, 2, 2, 2) bottleneck blocks at 160x160: 10 layers.
    Case("resnet", _resnet, _image_batch, nn.functional.cross_entropy, "sgd", 8, (
        ((10,), (1,), 4),
        ((5, 5), (1, 1), 4),
        ((5, 5), (1, 2), 4),
    )),
    # BERT, hidden 512, 4 encoder layers, full vocabulary: embeddings, 4 layers, MLM head.
    Case("bert", _bert, _token_batch, _masked_lm, "adam", 4, (
        ((6,), (1,), 4),
        ((3, 3), (1, 1), 4),
        ((3, 3), (2, 1), 4),
    )),
)


def _optimizer(name: str) -> Callable[[Any], torch.optim.Optimizer]:
    if name == "adam":
        return lambda p: torch.optim.Adam(p, lr=1e-4)
    return lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)


# -- the runtime constant ---------------------------------------------------------------


def lambda_entry_rss(repeats: int) -> list[float]:
    """Resident MB of the AWS Lambda entry's process after its init (``awslambdaric`` and the handler imported).

    The handler's import runs :func:`funcpipe.function.preload` (torch, the
    stage worker, an optimizer) and loads boto3's S3 model: all a function has resident
    before its first invocation.
    """
    code = (
        "import awslambdaric.bootstrap, handler\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith('VmRSS:'): print(int(line.split()[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", code], cwd=LAMBDA_ENTRY, env=env, check=True,
                              capture_output=True, text=True)
        out.append(int(done.stdout.split()[-1]) / 1024)
    return out


# -- the backends -----------------------------------------------------------------------

#: Credentials of the loopback fake (it checks none); nothing here talks to AWS.
FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAFUNCPIPEBENCHMARK", "AWS_SECRET_ACCESS_KEY": "funcpipe-benchmark-fake",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull}


class _LambdaRun:
    """Fresh Lambda runtimes for one run: the real entry under awslambdaric, behind the loopback fake."""

    def __init__(self, workers: int) -> None:
        os.environ.update(FAKE_AWS_ENV)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_REGION"):
            os.environ.pop(name, None)
        tiers = funcpipe.platforms.get("aws_lambda").tiers
        self.fake = FakeLambda({f"funcpipe-worker-{t.memory_mb}": 900.0 for t in tiers}, runtimes=workers,
                               env=FAKE_AWS_ENV)
        self.fake.wait_ready(120.0)
        # A long silence timeout: on a shared 2-CPU machine at a load of about 20, one worker's
        # heartbeat once went 100 s unwritten (the default 60 s ended the run); this measures memory.
        self.backend = AWSLambda("us-east-1", endpoint_url=self.fake.endpoint_url, allow_local_storage=True,
                                 timing=Timing(silence_timeout_s=900.0))

    def close(self) -> None:
        if self.fake.errors or self.fake.init_errors:
            log.warning("lambda runtime errors: %s %s", self.fake.errors, self.fake.init_errors)
        self.fake.close()


# -- the runs ---------------------------------------------------------------------------


def run_case(case: Case, iterations: int, storage_root: Path, schedules: tuple[str, ...],
             backends: tuple[str, ...] = ("lambda",)) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = case.make()
    b = case.micro_batch_size
    x, y = case.batch(2 * b, gen)
    optimizer = _optimizer(case.optimizer)
    started = time.perf_counter()
    profile = funcpipe.profile(model, x, y, case.loss_fn, micro_batch_sizes=(b // 2, b), optimizer=optimizer,
                               rounds=1, warmup=0, progress=False)
    log.info("%s: profiled in %.1f s, %.1f MB of parameters", case.name, time.perf_counter() - started,
             profile.param_bytes / MIB)
    rows = []
    for balance, replicas, m in case.plans:
        for schedule in schedules:
            plan = Plan.manual(list(balance), replicas=list(replicas), micro_batch_size=b,
                               global_batch_size=b * m, schedule=schedule)
            batches = [case.batch(b * m, gen) for _ in range(iterations)]
            for backend_name in backends:
                rows += _run(case, model, profile, plan, batches, backend_name, storage_root)
    return rows


def _run(case: Case, model: nn.Module, profile: funcpipe.ModelProfile, plan: Plan, batches: list[Any],
         backend_name: str, storage_root: Path) -> list[dict[str, Any]]:
    """Train ``plan`` on one backend (fresh processes) and compare each worker's peak with its prediction."""
    local = funcpipe.platforms.get("local")
    storage = tempfile.mkdtemp(prefix="funcpipe-memory-", dir=storage_root)
    lambda_run = _LambdaRun(sum(plan.replicas)) if backend_name == "lambda" else None
    backend: Any = lambda_run.backend if lambda_run is not None else Ray()
    rows = []
    try:
        trainer = Trainer(copy.deepcopy(model), case.loss_fn, _optimizer(case.optimizer), plan,
                          backend=backend, storage=Path(storage).as_uri())
        t0 = time.perf_counter()
        history = trainer.fit(batches, iterations=len(batches), progress=False)
        seconds = time.perf_counter() - t0
        del trainer
    finally:
        if lambda_run is not None:
            lambda_run.close()
        else:
            backend.shutdown()  # fresh hosts for the next run: what an earlier job left is not its memory
    b, m = plan.micro_batch_size, plan.num_micro_batches
    for w in sorted(history.workers, key=lambda w: (w["stage"], w["replica"])):
        s = w["stage"]
        predicted = costmodel.stage_memory_bytes(profile, local, plan, s) / MIB
        measured = w["peak_rss_bytes"] / MIB
        rows.append({
            "model": case.name, "backend": backend_name, "balance": list(plan.balance),
            "replicas": list(plan.replicas), "micro_batch_size": b, "micro_batches": m,
            "schedule": plan.schedule, "optimizer": case.optimizer, "stage": s, "replica": w["replica"],
            "predicted_mb": predicted, "measured_mb": measured, "start_mb": w["start_rss_bytes"] / MIB,
            "ratio": predicted / measured, "terms_mb": _terms(profile, local, plan, s), "seconds": seconds,
        })
        log.info("%s %s %s %s m=%d %s stage %d/%d: predicted %.0f MB, measured %.0f MB (start %.0f), ratio %.2f",
                 backend_name, case.name, list(plan.balance), list(plan.replicas), m, plan.schedule, s,
                 w["replica"], predicted, measured, rows[-1]["start_mb"], predicted / measured)
    return rows


def _terms(profile: funcpipe.ModelProfile, platform_: funcpipe.Platform, plan: Plan, stage: int) -> dict[str, float]:
    """The prediction's parts, MB: what each term of :func:`funcpipe.costmodel.memory_terms` adds."""
    zero = dataclasses.replace(platform_, runtime_overhead_mb=0)
    layers = plan.layer_range(stage)
    lp = profile.layers[layers.start:layers.stop]
    b = plan.micro_batch_size
    params = sum(p.param_bytes for p in lp)
    total = costmodel.stage_memory_bytes(profile, zero, plan, stage)
    return {
        "runtime": float(platform_.runtime_overhead_mb),
        "weights_grads": 2 * params / MIB,
        "optimizer": sum(p.optimizer_bytes for p in lp) / MIB,
        "allreduce": (params / plan.replicas[stage] + SYNC_IN_FLIGHT_BYTES if plan.replicas[stage] > 1 else 0) / MIB,
        "held_per_micro_batch": sum(p.held_bytes_per_sample for p in lp) * b / MIB,
        "total_without_runtime": total / MIB,
    }


BACKEND_LABELS = {
    "lambda": "the real AWS Lambda entry (`awslambdaric` + `backends/aws_lambda/handler.py`, a fresh process "
              "per worker and run) under the loopback fake of `tests/fakes/aws_lambda.py`",
    "ray": "local Ray actors (fresh hosts per run; their processes also hold Ray's runtime)",
}


# -- output -----------------------------------------------------------------------------


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    large = [r for r in rows if r["measured_mb"] >= LARGE_MB]
    ratios = [r["ratio"] for r in large]
    return {
        "workers": len(rows),
        "large_workers": len(large),
        "min_ratio_all": min(r["ratio"] for r in rows),
        "max_ratio_all": max(r["ratio"] for r in rows),
        "min_ratio_large": min(ratios) if ratios else None,
        "max_ratio_large": max(ratios) if ratios else None,
        "below": sum(r["ratio"] < 1 for r in rows),
        "target_met": bool(ratios) and min(r["ratio"] for r in rows) >= 1 and max(ratios) <= MAX_RATIO,
    }


def markdown(result: dict[str, Any]) -> str:
    s, rt = result["summary"], result["runtime"]
    lines = [
        "# Memory model vs measured peaks",
        "",
        f"Generated by `python benchmarks/memory.py` on {result['machine']['cpu']} "
        f"({result['machine']['cpus']} CPUs, torch {result['machine']['torch']}), {result['generated']}.",
        "",
        "Each worker's measured peak is its process's `VmHWM` during the run (reset when the run "
        "begins, setup and final checkpoint included), with file storage, "
        f"in {' and '.join(BACKEND_LABELS[b] for b in result['backends'])}; the prediction "
        "is `funcpipe.costmodel.stage_memory_bytes` on the `local` platform "
        f"(runtime constant {rt['local_constant_mb']} MB). {result['iterations']} iterations per run.",
        "",
        f"Target: prediction >= measured everywhere, and <= {MAX_RATIO}x measured for stages of "
        f">= {LARGE_MB:.0f} MB measured. **{'Met' if s['target_met'] else 'Not met'}**: "
        f"{s['large_workers']} of {s['workers']} workers are >= {LARGE_MB:.0f} MB, ratio "
        f"{s['min_ratio_large']:.3f} to {s['max_ratio_large']:.3f} there; {s['min_ratio_all']:.3f} to "
        f"{s['max_ratio_all']:.3f} over all; {s['below']} below 1.",
        "",
        "Runtime constant (resident MB before any model): the AWS Lambda entry's process after its init "
        f"(`awslambdaric` + `backends/aws_lambda/handler.py`, which preloads torch and the stage worker): "
        f"{', '.join(f'{v:.1f}' for v in rt['lambda_entry_mb'])} MB; when a run began: "
        + "; ".join(f"{b} {lo:.1f} to {hi:.1f} MB" for b, (lo, hi) in rt["start_mb"].items()) + ".",
        "",
        "| backend | model | plan (balance / replicas / micro-batches x size) | schedule | stage | replica "
        "| predicted MB | measured MB | ratio |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        plan = f"{r['balance']} / {r['replicas']} / {r['micro_batches']} x {r['micro_batch_size']}"
        lines.append(f"| {r['backend']} | {r['model']} | {plan} | {r['schedule']} | {r['stage']} | {r['replica']} | "
                     f"{r['predicted_mb']:.0f} | {r['measured_mb']:.0f} | {r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[c.name for c in CASES], help="which models to run")
    parser.add_argument("--iterations", type=int, default=2, help="training iterations per run")
    parser.add_argument("--schedules", nargs="*", default=["gpipe", "1f1b"])
    parser.add_argument("--backends", nargs="*", default=["lambda"], choices=["lambda", "ray"],
                        help="where workers run: the Lambda entry under the loopback fake, local Ray")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of memory.{json,md}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    local = funcpipe.platforms.get("local")
    entry = lambda_entry_rss(3)
    log.info("lambda entry resident: %s MB", entry)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="funcpipe-memory-") as root:
        for case in CASES:
            if case.name in args.models:
                rows += run_case(case, args.iterations, Path(root), tuple(args.schedules), tuple(args.backends))
    if "ray" in args.backends:
        import ray

        ray.shutdown()
    result = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": funcpipe.profiler._cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "iterations": args.iterations,
        "backends": args.backends,
        "runtime": {
            "lambda_entry_mb": entry,
            "start_mb": {name: [min(r["start_mb"] for r in rows if r["backend"] == name),
                                max(r["start_mb"] for r in rows if r["backend"] == name)]
                         for name in args.backends},
            "local_constant_mb": local.runtime_overhead_mb,
        },
        "summary": summary(rows),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "memory.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
