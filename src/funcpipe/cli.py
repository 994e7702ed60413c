"""The ``funcpipe`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from funcpipe.errors import ConfigError, FuncpipeError
from funcpipe.jsonfile import read_json

if TYPE_CHECKING:
    import torch
    from torch import nn

    from funcpipe.plans import Plan
    from funcpipe.profiler import LossFn, ModelProfile

__all__ = ["build_parser", "load_model", "main"]


def _demo(args: argparse.Namespace) -> int:
    from funcpipe.demo import run_demo

    result = run_demo(epochs=args.epochs, backend=args.backend, storage=args.storage, progress=not args.json,
                      job=args.job, max_retries=args.max_retries, checkpoint_every=args.checkpoint_every)
    return _print_demo(result, args)


def _resume(args: argparse.Namespace) -> int:
    from funcpipe.demo import run_demo
    from funcpipe.manifest import find_job
    from funcpipe.storage import open_storage

    manifest = find_job(open_storage(args.storage), args.job)
    cli = manifest.extra.get("cli")
    if not isinstance(cli, dict) or cli.get("command") != "demo" or not isinstance(cli.get("epochs"), int):
        raise ConfigError(
            f"job {manifest.job!r} in {args.storage} was started from Python, not by `funcpipe demo`, so only its "
            f"code can rebuild the model; hint: Trainer(model, loss_fn, optimizer, plan, storage={args.storage!r}, "
            f"job={manifest.job!r}).fit(data, ..., resume=True)"
        )
    result = run_demo(epochs=cli["epochs"], backend=args.backend, storage=args.storage, progress=not args.json,
                      job=manifest.job, resume=True, max_retries=args.max_retries)
    return _print_demo(result, args)


def _print_demo(result: Any, args: argparse.Namespace) -> int:
    from funcpipe.worker import REPORT_TIMES

    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.plan)
    if not result.history.losses:
        print(f"\nnothing to train: the job had finished; test accuracy {result.accuracy_after:.1%}")
        return 0
    print(f"\ntest accuracy: {result.accuracy_before:.1%} before, {result.accuracy_after:.1%} after "
          f"{len(result.history)} iterations in {result.seconds:.1f} s "
          f"(final loss {result.history.losses[-1]:.4f})")
    print("\nwhere the time went, mean ms per iteration per worker:")
    print(f"  {'stage':>5} {'replicas':>8} {'compute':>8} {'waiting':>8} {'sync':>8} {'update':>8} {'total':>8}")
    for row in result.history.stage_summary():
        print(f"  {row['stage']:>5} {row['replicas']:>8} " + " ".join(
            f"{row[field] * 1000:>8.1f}" for field in REPORT_TIMES
        ))
    return 0


# -- models, profiles and plans from the command line ------------------------------

_SPEC_HINT = (
    "hint: give MODULE:FUNCTION or path/to/file.py:FUNCTION, where FUNCTION() returns "
    "(model, inputs, targets, loss_fn)"
)


def load_model(spec: str) -> tuple[nn.Module, Any, torch.Tensor, LossFn]:
    """Call the function a ``module:function`` (or ``file.py:function``) spec names; check what it returns.

    Raises:
        ConfigError: the spec is malformed, the module or function is missing,
            the function fails, or it returns something else than
            ``(model, inputs, targets tensor, loss_fn)``: any ``nn.Module``, its inputs a tensor or a
            tuple or dict of tensors (``model(*inputs)``, ``model(**inputs)``).
    """
    import torch
    from torch import nn

    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name:
        raise ConfigError(f"model {spec!r} is not MODULE:FUNCTION; {_SPEC_HINT}")
    module = _import(where, spec)
    function = getattr(module, name, None)
    if function is None:
        defined = sorted(
            key for key, value in vars(module).items()
            if not key.startswith("_") and callable(value) and getattr(value, "__module__", None) == module.__name__
        )
        there = f" (functions there: {', '.join(defined)})" if defined else ""
        raise ConfigError(f"model {spec!r}: {where!r} has no function {name!r}{there}; {_SPEC_HINT}")
    if not callable(function):
        raise ConfigError(f"model {spec!r}: {name!r} is a {type(function).__name__}, not a function; {_SPEC_HINT}")
    try:
        result = function()
    except Exception as exc:
        raise ConfigError(
            f"model {spec!r}: {name}() raised {type(exc).__name__}: {exc}; hint: --debug shows the traceback"
        ) from exc
    if not isinstance(result, tuple | list) or len(result) != 4:
        got = f"a {len(result)}-tuple" if isinstance(result, tuple | list) else type(result).__name__
        raise ConfigError(f"model {spec!r}: {name}() returned {got}, not 4 values; {_SPEC_HINT}")
    model, inputs, targets, loss_fn = result
    import torch.utils._pytree as pytree

    leaves = pytree.tree_leaves(inputs) if isinstance(inputs, tuple | list | dict) else [inputs]
    problems = [
        f"model is a {type(model).__name__}, not an nn.Module" if not isinstance(model, nn.Module) else "",
        f"inputs is a {type(inputs).__name__}, not a tensor or a tuple or dict of tensors"
        if not leaves or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in leaves) else "",
        f"targets is a {type(targets).__name__}, not a tensor" if not isinstance(targets, torch.Tensor) else "",
        f"loss_fn is a {type(loss_fn).__name__}, not callable" if not callable(loss_fn) else "",
    ]
    wrong = "; ".join(p for p in problems if p)
    if wrong:
        raise ConfigError(f"model {spec!r}: {name}() returned the wrong types ({wrong}); {_SPEC_HINT}")
    return model, inputs, targets, loss_fn


def _import(where: str, spec: str) -> Any:
    """The module of a spec: a .py file by path, else an importable module (the cwd included)."""
    if where.endswith(".py") or os.sep in where or (os.altsep is not None and os.altsep in where):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"model {spec!r}: no file {where!r}; {_SPEC_HINT}")
        name = f"_funcpipe_model_{path.stem}_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"model {spec!r}: cannot import {where!r} as Python; {_SPEC_HINT}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # dataclasses and pickling look their module up there
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ConfigError(
                f"model {spec!r}: importing {where!r} raised {type(exc).__name__}: {exc}; "
                "hint: --debug shows the traceback"
            ) from exc
        return module
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: modules next to the user
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (where == exc.name or where.startswith(exc.name + ".")):
            raise ConfigError(f"model {spec!r}: no module named {where!r}; {_SPEC_HINT}") from exc
        raise ConfigError(f"model {spec!r}: importing {where!r} failed: {exc}") from exc
    except ImportError as exc:
        raise ConfigError(f"model {spec!r}: importing {where!r} failed: {exc}") from exc
    except Exception as exc:
        raise ConfigError(
            f"model {spec!r}: importing {where!r} raised {type(exc).__name__}: {exc}; "
            "hint: --debug shows the traceback"
        ) from exc
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _profile_model(spec: str, args: argparse.Namespace, *, quiet: bool) -> ModelProfile:
    from funcpipe.profiler import profile

    model, inputs, targets, loss_fn = load_model(spec)
    return profile(model, inputs, targets, loss_fn, micro_batch_sizes=args.micro_batch_sizes,
                   max_micro_batch=args.max_micro_batch, rounds=args.rounds,
                   warmup=args.warmup, progress=False if quiet else None)


def _load_profile(source: str, args: argparse.Namespace, *, quiet: bool) -> ModelProfile:
    """A saved profile if ``source`` ends with .json, else the profile of the model it names."""
    from funcpipe.profiler import ModelProfile

    if source.lower().endswith(".json"):
        return ModelProfile.load(source)
    return _profile_model(source, args, quiet=quiet)


def _load_plan(path: str) -> Plan:
    from funcpipe.plans import Plan

    data = read_json(path, "plan", missing_hint=f"; hint: write one with `funcpipe plan ... --out {path}`")
    if not isinstance(data, dict):
        raise ConfigError(f"plan {path!r} must hold a JSON object, got {type(data).__name__}")
    data.pop("per_epoch", None)  # what `funcpipe plan --json` adds
    try:
        return Plan.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"plan {path!r}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"plan {path!r} is malformed ({exc})") from None


def _write_json(path: str, data: object, what: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    except OSError as exc:
        raise ConfigError(f"cannot write the {what} to {path!r}: {exc.strerror or exc}") from None


def _note(message: str, *, json_mode: bool) -> None:
    """A side remark: on stdout after a table, on stderr when stdout carries JSON."""
    print(message, file=sys.stderr if json_mode else sys.stdout)


# -- funcpipe profile ----------------------------------------------------------------


def _profile(args: argparse.Namespace) -> int:
    profile = _profile_model(args.model, args, quiet=args.json)
    out = args.out if args.out is not None else f"{args.model.rpartition(':')[2]}.profile.json"
    try:
        profile.save(out)
    except OSError as exc:
        raise ConfigError(f"cannot write the profile to {out!r}: {exc.strerror or exc}") from None
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        _note(f"profile saved to {out}", json_mode=True)
        return 0
    print(_profile_table(profile))
    print(f"\nprofile saved to {out}")
    return 0


def _profile_table(profile: ModelProfile) -> str:
    return str(profile.table())


# -- funcpipe plan --------------------------------------------------------------------


def _micro_batch(value: str) -> int | list[int] | None:
    if value == "auto":
        return None
    try:
        sizes = [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not auto, a micro-batch size or a comma-separated list of sizes (e.g. 2,4,8)"
        ) from None
    return sizes[0] if len(sizes) == 1 else sizes


def _auto(choices: tuple[str, ...]) -> Any:
    def parse(value: str) -> str | None:
        if value == "auto":
            return None
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of auto, {', '.join(choices)}")
        return value

    return parse


def _objective(value: str) -> str | float:
    if value in ("time", "cost"):
        return value
    try:
        weight = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not 'time', 'cost' or a weight of time in [0, 1] (e.g. 0.3)"
        ) from None
    if not 0 <= weight <= 1:
        raise argparse.ArgumentTypeError(f"the weight of time must be in [0, 1], got {value}")
    return weight


def _plan(args: argparse.Namespace) -> int:
    from funcpipe import platforms
    from funcpipe.planner import plan as make_plan

    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be a positive number of samples (the dataset size), got {args.samples}")
    platform = platforms.get(args.platform)
    profile = _load_profile(args.source, args, quiet=args.json)
    chosen = make_plan(
        profile, platform,
        global_batch_size=args.global_batch, micro_batch_size=args.micro_batch, schedule=args.schedule,
        sync=args.sync, objective=args.objective,
        deadline_s=args.deadline, budget_usd=args.budget, max_stages=args.max_stages,
        max_replicas=args.max_replicas, memory_mb=args.memory_mb, time_limit_s=args.time_limit,
        samples=args.samples, progress=False if args.json else None,
    )
    epoch = _per_epoch(chosen, args.samples)
    if args.out is not None:
        _write_json(args.out, chosen.to_dict(), "plan")
    if args.json:
        print(json.dumps({**chosen.to_dict(), "per_epoch": epoch}, indent=2))
        if args.out is not None:
            _note(f"plan saved to {args.out}", json_mode=True)
        return 0
    from funcpipe.report import plan_report

    print(plan_report(chosen, layer_names=_layer_names(profile)))
    if args.out is not None:
        print(f"\nplan saved to {args.out}")
    return 0


def _per_epoch(plan: Plan, samples: int | None) -> dict[str, float] | None:
    from funcpipe.report import iterations_per_epoch

    if samples is None or plan.predicted_iteration_s is None or plan.predicted_cost_usd is None:
        return None
    iterations = iterations_per_epoch(plan, samples)
    return {
        "samples": samples,
        "iterations": iterations,
        "seconds": iterations * plan.predicted_iteration_s,
        "cost_usd": iterations * plan.predicted_cost_usd,
    }


def _layer_names(profile: ModelProfile) -> list[str] | None:
    """The profile's layer names, unless they are just the layers' indices."""
    names = [layer.name for layer in profile.layers]
    return names if any(name != str(i) for i, name in enumerate(names)) else None


# -- funcpipe simulate ----------------------------------------------------------------


def _simulate(args: argparse.Namespace) -> int:
    from funcpipe import platforms
    from funcpipe.simulator import simulate

    plan = _load_plan(args.plan)
    name = args.platform if args.platform is not None else plan.platform
    if name is None:
        raise ConfigError(
            f"plan {args.plan!r} names no platform; hint: --platform NAME (one of {platforms.names()}) "
            "or a spec file"
        )
    platform = platforms.get(name)
    profile = _load_profile(args.source, args, quiet=args.json)
    sim = simulate(plan, profile, platform)
    if args.png is not None:
        from funcpipe.plot import timeline_figure

        timeline_figure(sim.timeline, path=args.png)
    if args.json:
        print(json.dumps({
            "platform": sim.platform,
            "iteration_s": sim.iteration_s,
            "cost_usd": sim.cost_usd,
            "formula_s": sim.formula_s,
            "plan": sim.plan.to_dict(),
            "stages": [dataclasses.asdict(st) for st in sim.stages],
        }, indent=2))
    else:
        print(sim)
    if args.png is not None:
        _note(f"timeline saved to {args.png}", json_mode=args.json)
    return 0


# -- funcpipe train ------------------------------------------------------------------

_OPTIMIZERS = ("adam", "sgd")


def _train(args: argparse.Namespace) -> int:
    import torch

    from funcpipe.trainer import Trainer

    plan = _load_plan(args.plan)
    model, inputs, targets, loss_fn = load_model(args.model)
    import torch.utils._pytree as pytree

    samples = {t.shape[0] for t in pytree.tree_leaves(inputs)}
    if samples != {targets.shape[0]}:
        raise ConfigError(
            f"model {args.model!r}: inputs hold {sorted(samples)} samples but targets {targets.shape[0]}; "
            "hint: return the training set as (inputs, targets) with one target per sample"
        )
    size, count = plan.global_batch_size, targets.shape[0]
    batches = [(pytree.tree_map(lambda t, i=i: t[i:i + size], inputs), targets[i:i + size])
               for i in range(0, count - size + 1, size)]
    if not batches:
        raise ConfigError(
            f"model {args.model!r} returned {count} samples, fewer than one global batch of the plan "
            f"({size}); hint: return the whole training set, or plan a smaller --global-batch"
        )
    if args.lr <= 0:
        raise ConfigError(f"--lr must be a positive learning rate, got {args.lr}")
    lr = args.lr
    if args.optimizer == "sgd":
        def optimizer(params: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        def optimizer(params: Any) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=lr)
    trainer = Trainer(model, loss_fn, optimizer, plan, backend=args.backend, storage=args.storage, job=args.job)
    history = trainer.fit(
        batches, epochs=None if args.iterations is not None else args.epochs, iterations=args.iterations,
        progress=not args.json, max_retries=args.max_retries, checkpoint_every=args.checkpoint_every,
    )
    if args.out is not None:
        _save_weights(trainer.model, args.out)
    if args.json:
        print(json.dumps({**history.to_dict(), "weights": args.out}, indent=2))
        return 0
    print(history)
    if args.out is not None:
        print(f"\nweights saved to {args.out} (safetensors)")
    return 0


def _save_weights(model: nn.Module, path: str) -> None:
    from safetensors.torch import save_model

    try:
        save_model(model, path)
    except OSError as exc:
        raise ConfigError(f"cannot write the weights to {path!r}: {exc.strerror or exc}") from None


# -- funcpipe deploy ------------------------------------------------------------------

#: Environment variables the deploy options fall back to.
_DEPLOY_ENV = {"image": "FUNCPIPE_IMAGE", "role": "FUNCPIPE_ROLE"}


def _environment(pairs: Sequence[str]) -> dict[str, str]:
    variables = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise ConfigError(f"--env takes NAME=VALUE, got {pair!r}")
        variables[name] = value
    return variables


def _deploy(args: argparse.Namespace) -> int:
    from funcpipe.executors import cloud_sdk  # the cloud backend's module is imported below, through it

    image = args.image or os.environ.get(_DEPLOY_ENV["image"])
    role = args.role or os.environ.get(_DEPLOY_ENV["role"])
    if not image:
        raise ConfigError(
            f"no container image; hint: --image URI or {_DEPLOY_ENV['image']}=URI (built from "
            f"backends/{args.platform}/Dockerfile, see backends/README.md)"
        )
    environment = _environment(args.env)
    deployed: Sequence[Any]
    if args.platform == "aws_lambda":
        with cloud_sdk(args.platform):
            from funcpipe.executors import aws_lambda
        if not role:
            raise ConfigError(
                f"Lambda functions need an execution role; hint: --role arn:aws:iam::ACCOUNT:role/NAME or "
                f"{_DEPLOY_ENV['role']}=... (backends/aws_lambda/template.yaml creates one)"
            )
        deployed = aws_lambda.deploy(
            image_uri=image, role_arn=role, timeout_s=args.timeout or aws_lambda.DEFAULT_TIMEOUT_S,
            function_prefix=args.prefix, region=args.region, endpoint_url=args.endpoint_url,
            environment=environment, **({"tiers": args.tiers} if args.tiers else {}),
        )
    else:
        with cloud_sdk(args.platform):
            from funcpipe.executors import alibaba_fc
        deployed = alibaba_fc.deploy(
            image=image, role=role, timeout_s=args.timeout or alibaba_fc.DEFAULT_TIMEOUT_S,
            function_prefix=args.prefix, region=args.region, account_id=args.account_id,
            endpoint=args.endpoint_url, protocol=args.protocol, environment=environment,
            **({"tiers": args.tiers} if args.tiers else {}),
        )
    if args.json:
        print(json.dumps([dataclasses.asdict(d) for d in deployed], indent=2))
    else:
        for function in deployed:
            print(f"{function.action:>8} {function.name} ({function.memory_mb} MB)")
    return 0


# -- funcpipe calibrate ---------------------------------------------------------------


def _calibrate(args: argparse.Namespace) -> int:
    from funcpipe.calibrate import DEFAULT_BATCH_SIZES, DEFAULT_OBJECT_BYTES, calibrate
    from funcpipe.executors import cloud_sdk

    options: dict[str, Any] = {"function_prefix": args.prefix}
    if args.platform == "aws_lambda":
        with cloud_sdk(args.platform):
            from funcpipe.executors.aws_lambda import AWSLambda
        executor: Any = AWSLambda(args.region, endpoint_url=args.endpoint_url, **options)
    else:
        with cloud_sdk(args.platform):
            from funcpipe.executors.alibaba_fc import AlibabaFC
        executor = AlibabaFC(args.region, account_id=args.account_id, endpoint=args.endpoint_url,
                             protocol=args.protocol, **options)
    out = args.out if args.out is not None else f"{args.platform}.calibrated.yaml"
    try:
        result = calibrate(
            executor, args.storage, args.tiers,
            batch_sizes=args.batch_sizes or DEFAULT_BATCH_SIZES,
            object_bytes=[kb * 2**10 for kb in args.object_kb] if args.object_kb else DEFAULT_OBJECT_BYTES,
            repeats=args.repeats,
        )
    finally:
        executor.shutdown()
    result.save(out)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        _note(f"platform file saved to {out}", json_mode=True)
        return 0
    print(result.to_yaml(), end="")
    print(f"\nplatform file saved to {out}; use it as `funcpipe plan ... --platform {out}`")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command's --help, with exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"funcpipe: error: {message}; hint: {self.prog} --help\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Each command's help beside its name: argparse measures the commands' names one indent short of where
    it prints them, so a name longer than ``-h, --help`` would push its help onto the next line."""

    def add_argument(self, action: argparse.Action) -> None:
        if not isinstance(action, argparse._SubParsersAction):
            super().add_argument(action)
            return
        self._indent()
        try:
            super().add_argument(action)
        finally:
            self._dedent()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="funcpipe", description="Train PyTorch models as pipelines of serverless functions.",
        formatter_class=_HelpFormatter,
        epilog="Errors are one line on stderr with exit code 2; --debug shows the traceback. "
        "Every command that prints data takes --json.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    # --debug after the command too; SUPPRESS keeps the value given before it when it is absent.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parents = [common, *kwargs.pop("parents", [])]
        sub: argparse.ArgumentParser = commands.add_parser(name, parents=parents, **kwargs)
        return sub

    demo = add(
        "demo", help="train a digits classifier as a 3-stage pipeline on local Ray",
        description="Train a small classifier on scikit-learn's digits with a 3-stage plan "
        "(2 replicas on the middle stage) and report accuracy and time per stage.",
    )
    demo.add_argument("--epochs", type=int, default=8, help="passes over the training set (default 8)")
    demo.add_argument("--backend", default="ray", help="ray (default) or thread")
    demo.add_argument("--storage", default=None, help="storage URL (default: a fresh local directory)")
    demo.add_argument("--json", action="store_true", help="print the result as JSON, no progress bar")
    demo.add_argument("--job", help="name the job (its key prefix in the storage), to resume it by name")
    demo.add_argument("--max-retries", type=int, default=0, metavar="N",
                      help="times to roll back to the last checkpoint and run again when a worker fails (default 0)")
    demo.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                      help="iterations between checkpoints of every stage (default 10; 0: only at the end)")
    demo.set_defaults(func=_demo)

    resume = add(
        "resume", help="continue a killed `funcpipe demo` job from its checkpoint",
        description="Continue the job a killed `funcpipe demo --storage URL` left in URL (the one named --job, "
        "else the most recently updated unfinished one) from its last complete checkpoint.",
    )
    resume.add_argument("--storage", required=True, help="the storage URL the job ran with")
    resume.add_argument("--job", help="the job's name (default: the most recently updated unfinished job)")
    resume.add_argument("--backend", default="ray", help="ray (default) or thread")
    resume.add_argument("--max-retries", type=int, default=0, metavar="N", help="as for demo (default 0)")
    resume.add_argument("--json", action="store_true", help="print the result as JSON, no progress bar")
    resume.set_defaults(func=_resume)

    profiling = _Parser(add_help=False)
    measure = profiling.add_argument_group("profiling (when given a MODEL)")
    measure.add_argument("--micro-batch-sizes", type=int, nargs="+", metavar="B",
                         help="micro-batch sizes to time each layer at (default: powers of two up to "
                         "--max-micro-batch and it, at most the samples FUNCTION returns)")
    measure.add_argument("--max-micro-batch", type=int, metavar="B",
                         help="the largest size the default sizes reach (default 64)")
    measure.add_argument("--rounds", type=int, default=5, help="timed rounds per size (default 5)")
    measure.add_argument("--warmup", type=int, default=2, help="untimed rounds before them (default 2)")
    model_help = ("MODULE:FUNCTION or path/to/file.py:FUNCTION; FUNCTION() returns "
                  "(model, inputs, targets, loss_fn), model any nn.Module")
    source_help = "a saved profile (.json), or a model to profile first: " + model_help

    prof = add(
        "profile", parents=[profiling], help="measure each layer of a model and save the profile",
        description="Time the forward, backward and update of every layer (unit) of a model, measure "
        "its parameters and activations, save the profile as JSON and print it per layer.",
    )
    prof.add_argument("model", metavar="MODEL", help=model_help)
    prof.add_argument("--out", help="where to save the profile (default FUNCTION.profile.json in the cwd)")
    prof.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    prof.set_defaults(func=_profile)

    plan = add(
        "plan", parents=[profiling], help="choose stages, memory and replicas for a model on a platform",
        description="Solve for the plan (stage cuts, memory tiers, replicas) that minimises time, cost or "
        "a mix of both per iteration, and print it with its predicted seconds and dollars.",
    )
    plan.add_argument("source", metavar="PROFILE.json|MODEL", help=source_help)
    plan.add_argument("--platform", required=True, help="a built-in platform name or a .json/.yaml spec")
    plan.add_argument("--global-batch", type=int, required=True, metavar="N", help="samples per iteration")
    plan.add_argument("--micro-batch", type=_micro_batch, default=None, metavar="auto|N|N,M,...",
                      help="samples per micro-batch: auto (default: the planner chooses among the divisors of "
                      "the global batch), one size, or a comma-separated list to choose from")
    plan.add_argument("--schedule", type=_auto(("gpipe", "1f1b")), default=None, metavar="auto|gpipe|1f1b",
                      help="the micro-batch schedule: auto (default: the planner chooses), gpipe or 1f1b")
    plan.add_argument("--sync", type=_auto(("pipelined", "four_phase")), default=None,
                      metavar="auto|pipelined|four_phase",
                      help="the all-reduce among a stage's replicas: auto (default: chosen per stage), "
                      "pipelined or four_phase")
    plan.add_argument("--objective", type=_objective, default="time",
                      help="time (default), cost, or a weight of time in [0, 1] such as 0.3")
    plan.add_argument("--deadline", type=float, metavar="S", help="most seconds per iteration")
    plan.add_argument("--budget", type=float, metavar="USD", help="most dollars per iteration")
    plan.add_argument("--max-stages", type=int, metavar="N", help="most pipeline stages")
    plan.add_argument("--max-replicas", type=int, metavar="N", help="most replicas per stage")
    plan.add_argument("--memory-mb", type=int, nargs="+", metavar="N", help="the memory tiers allowed (MB)")
    plan.add_argument("--time-limit", type=float, default=30.0, metavar="S",
                      help="the solver's time limit in seconds (default 30; the call takes up to twice that)")
    plan.add_argument("--samples", type=int, metavar="N", help="dataset size, to predict time and cost per epoch")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (with a per_epoch field)")
    plan.add_argument("--out", help="save the plan as JSON there (for `funcpipe simulate --plan`)")
    plan.set_defaults(func=_plan)

    sim = add(
        "simulate", parents=[profiling], help="replay one iteration of a plan: seconds and dollars per stage",
        description="Simulate one training iteration of a saved plan, event by event, and print seconds "
        "and dollars per stage; optionally draw the timeline of every worker.",
    )
    sim.add_argument("source", metavar="PROFILE.json|MODEL", help=source_help)
    sim.add_argument("--plan", required=True, metavar="PLAN.json", help="a plan saved by `funcpipe plan --out`")
    sim.add_argument("--platform", help="a built-in platform name or a .json/.yaml spec (default: the plan's)")
    sim.add_argument("--png", metavar="PATH", help="save the Gantt chart of the iteration there")
    sim.add_argument("--json", action="store_true", help="print the result as JSON")
    sim.set_defaults(func=_simulate)

    train = add(
        "train", help="train a model with a saved plan; measured next to predicted",
        description="Train MODEL with a plan saved by `funcpipe plan --out` (its predictions, if any, are shown "
        "next to what the run measured). FUNCTION() returns (model, inputs, targets, loss_fn); inputs and "
        "targets are the training set, cut into the plan's global batches (a last partial batch is dropped).",
    )
    train.add_argument("model", metavar="MODEL", help=model_help)
    train.add_argument("--plan", required=True, metavar="PLAN.json", help="a plan saved by `funcpipe plan --out`")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=1, help="passes over the training set (default 1)")
    length.add_argument("--iterations", type=int, metavar="N", help="optimizer steps instead of epochs")
    train.add_argument("--optimizer", choices=_OPTIMIZERS, default="adam",
                       help="adam (default) or sgd (momentum 0.9)")
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 0.001)")
    train.add_argument("--backend", default="ray", help="ray (default), thread, aws_lambda or alibaba_fc")
    train.add_argument("--storage", default=None, help="storage URL (default: a fresh local directory)")
    train.add_argument("--job", help="name the job (its key prefix in the storage)")
    train.add_argument("--max-retries", type=int, default=0, metavar="N", help="as for demo (default 0)")
    train.add_argument("--checkpoint-every", type=int, default=10, metavar="N", help="as for demo (default 10)")
    train.add_argument("--out", metavar="PATH", help="save the trained weights there (safetensors)")
    train.add_argument("--json", action="store_true", help="print losses, seconds and stages as JSON, no progress bar")
    train.set_defaults(func=_train)

    deploy = add(
        "deploy", help="create or update the worker functions, one per memory tier",
        description="Create one function per memory tier (named PREFIX-MEMORY) from a container image "
        "built from backends/PLATFORM/Dockerfile, or update the ones that exist. See backends/README.md.",
    )
    deploy.add_argument("platform", choices=["aws_lambda", "alibaba_fc"])
    deploy.add_argument("--image", help=f"container image URI (default: ${_DEPLOY_ENV['image']})")
    deploy.add_argument("--role", help=f"execution role ARN (default: ${_DEPLOY_ENV['role']}; required on Lambda)")
    deploy.add_argument("--tiers", type=int, nargs="+", metavar="MB",
                        help="memory tiers (default: the platform spec's)")
    deploy.add_argument("--timeout", type=int, metavar="S",
                        help="function timeout: the lifetime_s to give the executor (default: 900 on Lambda, "
                        "3600 on Function Compute)")
    deploy.add_argument("--prefix", default="funcpipe-worker", help="function name prefix (default funcpipe-worker)")
    deploy.add_argument("--region", help="region (default: the SDK's, or $ALIBABA_CLOUD_REGION)")
    deploy.add_argument("--account-id", help="Function Compute: the account ID (default: $ALIBABA_CLOUD_ACCOUNT_ID)")
    deploy.add_argument("--endpoint-url", help="another API endpoint (an emulator)")
    deploy.add_argument("--protocol", default="https", help="Function Compute API protocol (default https)")
    deploy.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable of the functions (repeatable)")
    deploy.add_argument("--json", action="store_true", help="print what was deployed as JSON")
    deploy.set_defaults(func=_deploy)

    calib = add(
        "calibrate", help="measure the deployed functions and write a platform file",
        description="Invoke the deployed function of each memory tier once with a short benchmark (a matmul at "
        "a few micro-batch sizes and thread counts, PUTs and GETs of a few sizes against --storage), and write "
        "a platform file (base: PLATFORM plus the measured speed, bandwidth and latency) for plan and simulate.",
    )
    calib.add_argument("platform", choices=["aws_lambda", "alibaba_fc"])
    calib.add_argument("--tiers", type=int, nargs="+", metavar="MB",
                       help="the memory tiers to measure, deployed by `funcpipe deploy` (default: the platform's)")
    calib.add_argument("--storage", required=True,
                       help="storage URL the functions reach (s3://bucket/prefix, oss://bucket/prefix)")
    calib.add_argument("--out", help="the platform file to write (default PLATFORM.calibrated.yaml in the cwd)")
    calib.add_argument("--batch-sizes", type=int, nargs="+", metavar="B",
                       help="micro-batch sizes of the matmul (default 1 4 16 64)")
    calib.add_argument("--object-kb", type=int, nargs="+", metavar="KB",
                       help="object sizes of the PUTs and GETs, KB (default 64 1024 8192)")
    calib.add_argument("--repeats", type=int, default=3, metavar="N", help="PUTs and GETs per size (default 3)")
    calib.add_argument("--prefix", default="funcpipe-worker", help="function name prefix (default funcpipe-worker)")
    calib.add_argument("--region", help="region (default: the SDK's, or $ALIBABA_CLOUD_REGION)")
    calib.add_argument("--account-id", help="Function Compute: the account ID (default: $ALIBABA_CLOUD_ACCOUNT_ID)")
    calib.add_argument("--endpoint-url", help="another API endpoint (an emulator)")
    calib.add_argument("--protocol", default="https", help="Function Compute API protocol (default https)")
    calib.add_argument("--json", action="store_true", help="print the measurements and fitted fields as JSON")
    calib.set_defaults(func=_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except BrokenPipeError:  # the reader went away (`funcpipe plan ... | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python would complain again when flushing at exit
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("funcpipe: interrupted", file=sys.stderr)
        return 130
    except FuncpipeError as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split("\n\nRemote traceback:")[0].split())
        print(f"funcpipe: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, or an error funcpipe does not name: still one line
        if args.debug:
            raise
        message = " ".join(str(exc).split())
        print(f"funcpipe: error: unexpected {type(exc).__name__}: {message}; hint: --debug shows the traceback",
              file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
