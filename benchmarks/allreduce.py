"""Benchmark the gradient all-reduce; writes ``benchmarks/results/allreduce.{json,md}``.

``funcpipe.collectives.all_reduce``, "pipelined" (funcpipe) and "four_phase"
(LambdaML's scatter-reduce), among n replicas, each a thread with its own
throttled link (bandwidth up and down, latency per request) to one shared
in-memory store, against the bandwidth bound ``2 (n-1)/n * size / bandwidth``.
It runs ``overhead.py``'s Part B with larger gradients: the same code, options
and checks (every replica's sum is compared with the reference once per
configuration).

The machine may be shared and noisy: the variants run interleaved,
``--repeats`` times, and every reported number is a median.

Run ``python benchmarks/allreduce.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from overhead import (
    _table,
    add_all_reduce_arguments,
    add_run_arguments,
    all_reduce_details,
    all_reduce_setup,
    check_all_reduce_arguments,
    machine_info,
    machine_line,
    part_b,
    record_load_at_end,
    start_logging,
    write_results,
)

#: The target: the pipelined all-reduce within this factor of the bound at these replica counts and size.
TARGET_RATIO = 1.25
TARGET_REPLICAS = (4, 8)
TARGET_SIZE_MB = 100.0


def target(b: dict[str, Any]) -> dict[str, Any]:
    """Whether pipelined / bound <= TARGET_RATIO in the target rows (those that were run)."""
    ratios = {
        str(row["n"]): row["pipelined_ratio"]
        for row in b["rows"]
        if row["n"] in TARGET_REPLICAS and row["size_mb"] == TARGET_SIZE_MB
    }
    return {
        "ratio": TARGET_RATIO,
        "size_mb": TARGET_SIZE_MB,
        "pipelined_ratio_by_n": ratios,
        "met": bool(ratios) and max(ratios.values()) <= TARGET_RATIO,
    }


def render_markdown(machine: dict[str, Any], b: dict[str, Any], goal: dict[str, Any], command: str) -> str:
    rows = [
        [
            str(row["n"]),
            f"{row['size_mb']:g}",
            f"{row['bound_s']:.3f}",
            f"{row['pipelined_s']:.3f}",
            f"{row['four_phase_s']:.3f}",
            f"{row['pipelined_ratio']:.2f}",
            f"{row['four_phase_ratio']:.2f}",
        ]
        for row in b["rows"]
    ]
    out = [
        "# funcpipe all-reduce benchmark",
        "",
        machine_line(machine),
        "",
        f"Command: `{command}`",
        "",
        all_reduce_setup(b),
        "",
        _table(
            ["n", "size MB", "bound s", "pipelined s", "four_phase s", "pipelined / bound", "four_phase / bound"],
            rows,
        ),
        "",
    ]
    if goal["pipelined_ratio_by_n"]:
        ratios = ", ".join(f"n={n}: {ratio:.2f}x" for n, ratio in goal["pipelined_ratio_by_n"].items())
        out += [
            f"Target: pipelined within {goal['ratio']:g}x the bound at {goal['size_mb']:g} MB for n = "
            f"{' and '.join(str(n) for n in TARGET_REPLICAS)} -> **{'met' if goal['met'] else 'not met'}** "
            f"({ratios}).",
            "",
        ]
    out += all_reduce_details(b)
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_all_reduce_arguments(parser, part="", sizes_mb=[10.0, 50.0, 100.0, 200.0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repetitions of every variant (default: %(default)s)")
    add_run_arguments(parser, "allreduce")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    check_all_reduce_arguments(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start_logging(args.verbose)
    command = " ".join(["python benchmarks/allreduce.py", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info()
    started = time.perf_counter()
    b = part_b(args)
    elapsed = time.perf_counter() - started
    record_load_at_end(machine)
    goal = target(b)
    options = {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}
    report = {
        "machine": machine, "command": command, "options": options, "elapsed_s": elapsed, "target": goal,
        "all_reduce": b,
    }
    markdown = render_markdown(machine, b, goal, command) + f"\nTotal benchmark time: {elapsed:.0f} s.\n"
    write_results(args.output_dir, "allreduce", report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
