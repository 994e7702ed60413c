"""Fed vs stored data: what the driver writes per iteration, and seconds per iteration behind a laptop's uplink.

    python benchmarks/stored_data.py [--iterations 20] [--repeats 3] [--up-mb-s 2] [--latency-ms 20]

``Trainer.fit(batches)`` makes the driver upload every micro-batch's inputs and
targets; ``Trainer.fit(funcpipe.data.upload(...))`` writes the data set to
storage once, and the workers read their micro-batches themselves. Here the
driver's link to storage is throttled as a laptop's uplink to a cloud region
would be (``--up-mb-s`` up, ``--down-mb-s`` down, ``--latency-ms`` per
request: :class:`funcpipe.storage.ThrottledStorage`), the workers' links are
not (as functions next to their storage), on the thread backend (every worker
in this process).

Two models: the demo's (scikit-learn's digits, 64 features, ``demo_plan``:
global batch 64 of 4 micro-batches) and the same MLP on CIFAR-sized inputs
(3x32x32 floats, 12 KB a sample, random data). Each fit trains ``--iterations``
iterations; fed and stored alternate (ABBA) ``--repeats`` times; per fit the
median of its iterations' seconds after the first (which starts the workers),
and the driver's PUT requests and bytes per iteration (every driver write of
the fit: data, go objects, definitions, manifest, lease, divided by the
iterations). The upload of the data set is timed apart (it is once per data
set, not per fit). Writes ``benchmarks/results/stored_data.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from funcpipe import Trainer, data
from funcpipe.demo import demo_plan, digits_model, load_digits
from funcpipe.storage import open_storage
from funcpipe.storage.bounded import BoundedStorage
from funcpipe.storage.counting import CountingStorage
from funcpipe.storage.throttled import ThrottledStorage

RESULTS = Path(__file__).parent / "results"
#: A key of one iteration's objects (protocol.JobKeys.iteration_prefix).
ITERATION_KEY = re.compile(r"/i\d{8}/")


def cifar_sized(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """The demo's MLP shape on 3x32x32 inputs, and 1,280 random samples of 10 classes."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 10), nn.Identity())
    g = torch.Generator().manual_seed(seed)
    return model, torch.rand(1280, 3, 32, 32, generator=g), torch.randint(0, 10, (1280,), generator=g)


def throttle_driver(trainer: Trainer, url: str, args: argparse.Namespace) -> CountingStorage:
    """Put the driver's storage (not the workers') behind the throttled link; its requests counted.

    Benchmark only: it reaches into the trainer, which has no public option for a driver-only link."""
    link = ThrottledStorage(open_storage(url), uplink_bytes_per_s=args.up_mb_s * 1e6,
                            downlink_bytes_per_s=args.down_mb_s * 1e6, latency_s=args.latency_ms / 1000)
    counted = CountingStorage(link, client="driver")
    trainer._raw_storage = BoundedStorage(counted, trainer.timeout_s)
    trainer._job.storage = trainer._raw_storage
    trainer._use_job(trainer.keys.job)
    return counted


def one_fit(model_fn: Any, x: torch.Tensor, y: torch.Tensor, stored: data.StoredDataset | None, url: str,
            args: argparse.Namespace) -> dict[str, Any]:
    plan = demo_plan()
    trainer = Trainer(model_fn(), nn.functional.cross_entropy, lambda p: torch.optim.SGD(p, lr=0.1), plan,
                      backend="thread", storage=url)
    counted = throttle_driver(trainer, url, args)
    written: list[tuple[str, int]] = []
    stop = counted.requests.listen(lambda r: written.append((r.key, r.nbytes)) if r.op == "PUT" else None)
    try:
        if stored is None:
            size = plan.global_batch_size
            batches = [(x[i:i + size], y[i:i + size]) for i in range(0, len(y) - size + 1, size)]
            history = trainer.fit(batches, iterations=args.iterations, progress=False)
        else:
            history = trainer.fit(stored, iterations=args.iterations, shuffle=False, progress=False)
    finally:
        stop()
    n = len(history)
    per_iteration = [nbytes for key, nbytes in written if ITERATION_KEY.search(key)]
    return {"s_per_it": statistics.median(history.seconds[1:]), "puts_per_it": len(per_iteration) / n,
            "bytes_per_it": sum(per_iteration) / n, "fit_puts": len(written) - len(per_iteration),
            "fit_bytes": sum(nbytes for _, nbytes in written) - sum(per_iteration)}


def run_model(name: str, model_fn: Any, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix=f"funcpipe-stored-{name}-")
    url = Path(root).as_uri()
    started = time.perf_counter()
    # The upload through the same throttled link, as a laptop would make it once.
    link_url = f"throttled+{url}?up_mb_s={args.up_mb_s}&down_mb_s={args.down_mb_s}&latency_ms={args.latency_ms}"
    stored_link = data.upload((x, y), link_url, global_batch_size=demo_plan().global_batch_size, name=name)
    upload_s = time.perf_counter() - started
    stored = data.open_stored(url, stored_link.name)  # the workers read it without the driver's throttle
    samples: dict[str, list[dict[str, Any]]] = {"fed": [], "stored": []}
    order = ["fed", "stored", "stored", "fed"]
    for r in range(args.repeats):
        for variant in order if r % 2 == 0 else order[::-1]:
            result = one_fit(model_fn, x, y, stored if variant == "stored" else None, url, args)
            samples[variant].append(result)
            if args.verbose:
                print(f"{name} {variant}: {result}", file=sys.stderr)
    summary = {v: {k: statistics.median(s[k] for s in samples[v]) for k in samples[v][0]} for v in samples}
    ratios = [f["s_per_it"] / s["s_per_it"] for f, s in zip(samples["fed"], samples["stored"], strict=True)]
    return {"model": name, "samples": samples, "summary": summary, "fed_over_stored": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "upload_s": upload_s,
            "data_set_bytes": stored.input_bytes + stored.target_bytes,
            "input_bytes_per_iteration": x[:64].numel() * x.element_size() + y[:64].numel() * y.element_size()}


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, machine: str) -> str:
    lines = [
        "# Fed vs stored data behind a laptop's uplink",
        "",
        f"`python benchmarks/stored_data.py --iterations {args.iterations} --repeats {args.repeats} "
        f"--up-mb-s {args.up_mb_s:g} --down-mb-s {args.down_mb_s:g} --latency-ms {args.latency_ms:g}`; {machine}.",
        "",
        "The driver's link to storage is throttled; the workers' (thread backend) is not. Medians over the "
        "repeats; s/it is each fit's median iteration after the first.",
        "",
        "| model | data per iteration | fed s/it | stored s/it | fed / stored (range) | driver PUTs / it, fed → stored "
        "| driver bytes / it, fed → stored | driver's once-per-fit writes | one-off upload |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        fed, stored = r["summary"]["fed"], r["summary"]["stored"]
        lo, hi = r["ratio_range"]
        lines.append(
            f"| {r['model']} | {r['input_bytes_per_iteration'] / 1e3:.1f} kB | {fed['s_per_it']:.3f} | "
            f"{stored['s_per_it']:.3f} | **{r['fed_over_stored']:.2f}×** ({lo:.2f}–{hi:.2f}) | "
            f"{fed['puts_per_it']:.1f} → {stored['puts_per_it']:.1f} | "
            f"{fed['bytes_per_it'] / 1e3:.1f} kB → {stored['bytes_per_it'] / 1e3:.1f} kB | "
            f"{stored['fit_puts']:.0f} PUTs, {stored['fit_bytes'] / 1e3:.0f} kB | "
            f"{r['data_set_bytes'] / 1e6:.2f} MB in {r['upload_s']:.1f} s |"
        )
    lines += ["", "On the thread backend no run has a time budget, so a stored fit writes no go objects: nothing "
              "per iteration. On a serverless backend it writes one go object (about 100 bytes) per iteration."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--up-mb-s", type=float, default=2.0)
    parser.add_argument("--down-mb-s", type=float, default=10.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--models", nargs="+", default=["demo", "cifar_sized"])
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("FUNCPIPE_HOME", tempfile.mkdtemp(prefix="funcpipe-home-"))
    torch.set_num_threads(1)
    results = []
    for name in args.models:
        if name == "demo":
            train_x, train_y, _, _ = load_digits()
            results.append(run_model("demo", digits_model, train_x, train_y, args))
        else:
            model, x, y = cifar_sized()
            results.append(run_model("cifar_sized", lambda: cifar_sized()[0], x, y, args))
            del model
    machine = f"{host.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end"
    RESULTS.mkdir(exist_ok=True)
    report = markdown(results, args, machine)
    (RESULTS / "stored_data.json").write_text(json.dumps({"args": vars(args), "machine": machine,
                                                          "results": results}, indent=1) + "\n")
    (RESULTS / "stored_data.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
