"""Benchmark a function's cold start: what its entry loads, how long its init takes, how much it holds.

For each function entry in ``backends/`` — AWS Lambda's (``awslambdaric`` and
``handler.py``, whose import runs :func:`funcpipe.function.preload`) and Function
Compute's (``server.py``'s init: the OSS adapter and ``preload()``) — a fresh
interpreter runs the entry's init and reports the modules then loaded (all, and
funcpipe's), the init's seconds, and the process's resident and peak memory
(``VmRSS``, ``VmHWM``). Also the seconds of a whole ``funcpipe --help``. Each is
measured for two source trees side by side, interleaved in one run: *before*
(a git revision, by default the one before issue 14) and *after* (this
checkout). The after tree is also run as its image is built: with ortools,
ray, matplotlib, tqdm and yaml made unimportable.

Lambda does not bill, nor count toward the timeout, an init of up to 10 s
(``INIT_LIMIT_S``); the memory model's runtime constant
(:data:`funcpipe.platforms.base.TORCH_RUNTIME_OVERHEAD_MB`) is the Lambda entry's
resident memory after init, rounded up to 10 MB.

Writes ``benchmarks/results/coldstart.{json,md}``. Run
``python benchmarks/coldstart.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"

#: The last commit of main before issue 14 (the function side inside the executors, an eager package root).
BEFORE = "163754f"

#: Lambda's init phase: not billed and not counted toward the timeout up to this (AWS Lambda docs,
#: "Lambda execution environment lifecycle": the Init phase is limited to 10 seconds).
INIT_LIMIT_S = 10.0

#: What an image built from backends/*/requirements.txt does not install.
NOT_IN_THE_IMAGE = ("ortools", "ray", "matplotlib", "tqdm", "yaml")

#: Each entry's init, run in its folder of ``backends/``, as the platform runs it before the first invocation.
ENTRIES = {
    "aws_lambda": ("aws_lambda", "import awslambdaric.bootstrap\nimport handler\n"),
    "alibaba_fc": ("alibaba_fc", "import server\nimport funcpipe.storage.oss\nserver.preload()\n"),
}

_PROBE = """\
import json, sys, time
for name in {blocked!r}:
    sys.modules[name] = None
started = time.perf_counter()
{code}
seconds = time.perf_counter() - started
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({{
    "init_s": seconds,
    "modules": len([m for m in sys.modules if sys.modules[m] is not None]),
    "funcpipe_modules": sorted(m for m in sys.modules if m.startswith("funcpipe") and sys.modules[m] is not None),
    "heavy": sorted(m for m in {heavy!r} if sys.modules.get(m) is not None),
    "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
    "peak_mb": int(status["VmHWM"].split()[0]) / 1024,
}}))
"""

#: Third-party packages whose presence the table notes (the driver's, and torch).
HEAVY = ("torch", "ortools", "ray", "matplotlib", "tqdm", "yaml", "numpy")


def source_tree(revision: str, into: Path) -> Path:
    """``src`` and ``backends`` of ``revision`` (``git archive``), unpacked under ``into``."""
    archive = subprocess.run(["git", "archive", revision, "src", "backends"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree / "src"), "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull, "PYTHONDONTWRITEBYTECODE": "1"}


def entry_init(tree: Path, entry: str, blocked: tuple[str, ...] = ()) -> dict[str, Any]:
    """One fresh interpreter running ``entry``'s init from ``tree``."""
    folder, code = ENTRIES[entry]
    probe = _PROBE.format(blocked=list(blocked), code=code, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", probe], cwd=tree / "backends" / folder, env=_env(tree),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def cli_help_s(tree: Path) -> float:
    """Wall seconds of ``funcpipe --help`` from ``tree``: a whole process, interpreter start included."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from funcpipe.cli import main; main(['--help'])"], env=_env(tree),
                   check=True, capture_output=True)
    return time.perf_counter() - started


def _median(runs: list[dict[str, Any]], field: str) -> float:
    return statistics.median(r[field] for r in runs)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0]}
    return {
        "init_s": _median(runs, "init_s"), "init_s_max": max(r["init_s"] for r in runs),
        "rss_mb": _median(runs, "rss_mb"), "peak_mb": _median(runs, "peak_mb"),
        "modules": runs[0]["modules"], "funcpipe_modules": runs[0]["funcpipe_modules"], "heavy": runs[0]["heavy"],
    }


def measure(before: Path, after: Path, repeats: int) -> dict[str, Any]:
    """Every measurement ``repeats`` times, the trees interleaved so both see the same machine load."""
    variants = {"before": (before, ()), "after": (after, ()), "after, as in the image": (after, NOT_IN_THE_IMAGE)}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {v: {e: [] for e in ENTRIES} for v in variants}
    helps: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(repeats):
        for variant, (tree, blocked) in variants.items():
            for entry in ENTRIES:
                runs[variant][entry].append(entry_init(tree, entry, blocked))
            if variant in helps:
                helps[variant].append(cli_help_s(tree))
    return {
        "entries": {v: {e: summarize(r) for e, r in by_entry.items()} for v, by_entry in runs.items()},
        "cli_help_s": {v: statistics.median(s) for v, s in helps.items()},
        "cli_help_s_all": helps,
    }


def markdown(result: dict[str, Any]) -> str:
    entries = result["entries"]
    lines = [
        f"Function cold start: each entry's init in a fresh interpreter, median of {result['repeats']} runs, "
        f"before ({result['before']}) and after (this tree) interleaved in one run; {result['machine']['cpus']} "
        f"CPUs, load average {result['load'][0]:.1f} at the start, torch {result['machine']['torch']}, "
        f"Python {result['machine']['python']}. Lambda's init limit: {INIT_LIMIT_S:g} s. "
        f"\"as in the image\": {', '.join(NOT_IN_THE_IMAGE)} unimportable. "
        "Generated by `python benchmarks/coldstart.py`.",
        "",
        "| entry | tree | modules (funcpipe's) | init s (max) | of the 10 s limit | resident MB | peak MB "
        "| driver packages loaded |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for entry in ENTRIES:
        for variant, by_entry in entries.items():
            row = by_entry[entry]
            if "error" in row:
                lines.append(f"| {entry} | {variant} | failed: {row['error']} | | | | | |")
                continue
            heavy = ", ".join(m for m in row["heavy"] if m != "torch") or "none"
            lines.append(
                f"| {entry} | {variant} | {row['modules']} ({len(row['funcpipe_modules'])}) | "
                f"{row['init_s']:.2f} ({row['init_s_max']:.2f}) | {row['init_s'] / INIT_LIMIT_S:.0%} | "
                f"{row['rss_mb']:.1f} | {row['peak_mb']:.1f} | {heavy} |"
            )
    helps = result["cli_help_s"]
    lines += [
        "",
        f"`funcpipe --help` (whole process): before {helps['before']:.2f} s, after {helps['after']:.2f} s "
        f"({helps['before'] / helps['after']:.1f}x faster).",
        "",
        f"Memory model: `TORCH_RUNTIME_OVERHEAD_MB` = the Lambda entry's resident MB after init, rounded up to "
        f"10 MB: {result['runtime_constant_mb']} MB (after).",
        "",
        "funcpipe modules the after entry loads: "
        + ", ".join(f"`{m}`" for m in entries["after"]["aws_lambda"].get("funcpipe_modules", [])) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each measurement (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default: %(default)s)")
    args = parser.parse_args(argv)
    import torch

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="funcpipe-coldstart-") as tmp:
        before = source_tree(args.before, Path(tmp))
        result = measure(before, ROOT, args.repeats)
    after_lambda = result["entries"]["after"]["aws_lambda"]
    result.update({
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "load": load,
        "before": args.before,
        "repeats": args.repeats,
        "init_limit_s": INIT_LIMIT_S,
        "runtime_constant_mb": int(-(-after_lambda["rss_mb"] // 10) * 10) if "rss_mb" in after_lambda else None,
    })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coldstart.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (args.out / "coldstart.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
