"""The ``funcpipe`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from funcpipe.errors import FuncpipeError

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from funcpipe.demo import run_demo

    result = run_demo(epochs=args.epochs, backend=args.backend, storage=args.storage,
                      progress=not args.json)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.plan)
    print(f"\ntest accuracy: {result.accuracy_before:.1%} before, {result.accuracy_after:.1%} after "
          f"{len(result.history)} iterations in {result.seconds:.1f} s "
          f"(final loss {result.history.losses[-1]:.4f})")
    print("\nwhere the time went, mean ms per iteration per worker:")
    print(f"  {'stage':>5} {'replicas':>8} {'compute':>8} {'waiting':>8} {'sync':>8} {'update':>8} {'total':>8}")
    for row in result.history.stage_summary():
        print(f"  {row['stage']:>5} {row['replicas']:>8} " + " ".join(
            f"{row[field] * 1000:>8.1f}" for field in ("compute_s", "wait_s", "sync_s", "update_s", "total_s")
        ))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="funcpipe", description="Train PyTorch models as pipelines of serverless functions."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="train a digits classifier as a 3-stage pipeline on local Ray",
        description="Train a small classifier on scikit-learn's digits with a 3-stage plan "
        "(2 replicas on the middle stage) and report accuracy and time per stage.",
    )
    demo.add_argument("--epochs", type=int, default=8, help="passes over the training set (default 8)")
    demo.add_argument("--backend", default="ray", help="ray (default) or thread")
    demo.add_argument("--storage", default=None, help="storage URL (default: a fresh local directory)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON, no progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except FuncpipeError as exc:
        if args.debug:
            raise
        message = str(exc).split("\n\nRemote traceback:")[0]
        print(f"funcpipe: error: {message}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
