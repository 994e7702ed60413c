"""Progress bars (tqdm.auto): planning when long, training with loss, seconds and dollars so far; progress=False."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

import funcpipe
from funcpipe import ConfigError, History, Plan, Trainer, simulate
from funcpipe.profiler import LayerProfile, ModelProfile
from tests.helpers import mlp7, regression_batches

PLAN_ARGS = {"global_batch_size": 8, "micro_batch_size": 2, "max_stages": 2, "max_replicas": 2}


@pytest.fixture(scope="module")
def profile() -> ModelProfile:
    layer = LayerProfile("l", 0.001, 0.01, 0.002, 0.02, 10**7, 2 * 10**7, 0.001, 1e5, 2e5)
    return ModelProfile((layer,) * 3, 1e4, 8.0)


def last_bar(err: str) -> str:
    """The bar's final state: the text after the last carriage return or newline that names it."""
    states = [s for s in re.split(r"[\r\n]", err) if s.strip()]
    assert states, "no progress bar was written"
    return states[-1]


def test_plan_shows_a_bar_per_solve_when_asked_or_long(
    profile: ModelProfile, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = funcpipe.plan(profile, "aws_lambda", objective="cost", time_limit_s=3, progress=True, **PLAN_ARGS)
    final = last_bar(capsys.readouterr().err)
    assert final.startswith("planning on aws_lambda: 100%")
    solves = int(re.search(r"\| (\d+)/(\d+) ", final).group(1))  # type: ignore[union-attr]
    assert 1 <= solves <= 4 * 6
    assert f"best {plan.predicted_iteration_s:.3g} s, ${plan.predicted_cost_usd:.3g}" in final
    funcpipe.plan(profile, "aws_lambda", objective="cost", time_limit_s=3, **PLAN_ARGS)  # short: no bar
    assert capsys.readouterr().err == ""
    funcpipe.plan(profile, "aws_lambda", objective="cost", time_limit_s=10, **PLAN_ARGS)  # long: a bar
    assert "planning on aws_lambda" in capsys.readouterr().err
    funcpipe.plan(profile, "aws_lambda", objective="cost", time_limit_s=10, progress=False, **PLAN_ARGS)
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match="progress must be True, False or None, got 'yes'"):
        funcpipe.plan(profile, "aws_lambda", progress="yes", **PLAN_ARGS)  # type: ignore[arg-type]


def test_pareto_bar_counts_its_solves(profile: ModelProfile, capsys: pytest.CaptureFixture[str]) -> None:
    frontier = funcpipe.pareto(profile, "aws_lambda", points=4, time_limit_s=4, progress=True, samples=80, **PLAN_ARGS)
    final = last_bar(capsys.readouterr().err)
    assert final.startswith("frontier on aws_lambda: 100%")
    assert re.search(r"\| (2|4)/(2|4) ", final)  # 4 solves, or 2 when the fastest plan is the cheapest
    assert all(p.samples == 80 for p in frontier)
    funcpipe.pareto(profile, "aws_lambda", points=4, time_limit_s=4, **PLAN_ARGS)
    assert capsys.readouterr().err == ""


def fit(plan: Plan, capsys: pytest.CaptureFixture[str], *, progress: bool = True) -> tuple[str, History]:
    trainer = Trainer(mlp7(), nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.01), plan,
                      backend="thread", storage=f"memory://progress-{id(plan)}")
    capsys.readouterr()
    history = trainer.fit(regression_batches(5, 8), progress=progress)
    return capsys.readouterr().err, history


def test_training_bar_shows_loss_seconds_and_dollars_so_far(capsys: pytest.CaptureFixture[str]) -> None:
    layer = LayerProfile("l", 0.001, 0.01, 0.002, 0.02, 10**4, 2 * 10**4, 0.001, 100.0, 200.0)
    priced = simulate(Plan.manual([3, 4], micro_batch_size=4, global_batch_size=8),
                      ModelProfile((layer,) * 7, 32.0, 12.0), "aws_lambda").plan
    assert priced.predicted_cost_usd is not None
    err, history = fit(priced, capsys)
    iterations = len(history)
    final = last_bar(err)
    assert final.startswith("funcpipe: 100%") and f"{iterations}/{iterations}" in final
    postfix = dict(item.split("=") for item in final.split("it/s, ")[-1].rstrip("]").split(", "))
    assert set(postfix) == {"loss", "s/it", "$"}
    assert float(postfix["$"]) == pytest.approx(iterations * priced.predicted_cost_usd, rel=1e-3)
    # The last iteration's loss and seconds as the driver measured them (the seconds may round to 0.000: the
    # last report can come right after the one before, the workers having run ahead).
    assert postfix["s/it"] == f"{history.seconds[-1]:.3f}" and postfix["loss"] == f"{history.losses[-1]:.4f}"
    assert float(postfix["loss"]) > 0

    err, _ = fit(Plan.manual([3, 4], micro_batch_size=4, global_batch_size=8), capsys)  # no price: no dollars
    assert "loss=" in last_bar(err) and "$=" not in err
    err, _ = fit(priced, capsys, progress=False)
    assert err == ""


class RecordedBar:
    """tqdm as the trainer makes it, recording what the run does to it, in order."""

    events: ClassVar[list[tuple[str, object]]] = []

    @classmethod
    def make(cls, *args: object, **kwargs: object) -> object:
        from tqdm.auto import tqdm

        class Bar(tqdm):  # type: ignore[misc, valid-type]
            def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
                cls.events.append(("desc", desc))
                super().set_description_str(desc, refresh)

            def reset(self, total: float | None = None) -> None:
                cls.events.append(("reset", self.n))
                super().reset(total)

            def update(self, n: float | None = 1) -> bool | None:
                cls.events.append(("update", self.n))
                return super().update(n)  # type: ignore[no-any-return]

        return Bar(*args, **kwargs)


def test_the_bar_says_the_workers_are_starting_and_its_rate_counts_iterations_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from funcpipe.executors import get_executor
    from tests.helpers import SpyExecutor

    monkeypatch.setattr("funcpipe.trainer.tqdm", RecordedBar.make)
    RecordedBar.events = []
    executor = SpyExecutor(get_executor("thread"))
    executor.call_budget_s = 1e-9  # every run makes one iteration: three runs, three starts
    trainer = Trainer(mlp7(), nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.01),
                      Plan.manual([3, 4], micro_batch_size=4, global_batch_size=8), backend=executor,
                      storage="memory://bar-start")
    trainer.fit(regression_batches(3, 8), progress=True)
    starting = ("desc", "funcpipe: starting 2 workers")
    assert RecordedBar.events == [
        starting, ("desc", "funcpipe"), ("reset", 0), ("update", 0),  # the clock starts once the workers run
        starting, ("desc", "funcpipe"), ("update", 1),  # a later run's start is in its iteration: no reset
        starting, ("desc", "funcpipe"), ("update", 2),
    ]
    assert "starting 2 workers" in capsys.readouterr().err


def test_no_print_outside_the_cli() -> None:
    """Library code logs through ``logging``; only the CLI prints (its own output)."""
    package = Path(funcpipe.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert len(list(package.rglob("*.py"))) > 20  # the package's modules were found
    assert offenders == [], "print() outside the CLI; use logging"
