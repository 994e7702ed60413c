from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import funcpipe
import funcpipe.executors
from funcpipe import Plan, cli, simulate
from funcpipe.cli import build_parser, main
from funcpipe.profiler import LayerProfile, ModelProfile


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_demo_learns_the_digits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["iterations"] == 2 * 22  # 1,437 training images in batches of 64
    assert result["accuracy_before"] < 0.3
    assert result["accuracy_after"] > 0.8
    assert [(row["stage"], row["replicas"]) for row in result["stages"]] == [(0, 1), (1, 2), (2, 1)]


def test_demo_prints_accuracy_and_time_per_stage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "1", "--backend", "thread", "--storage", "memory://cli-demo"]) == 0
    out = capsys.readouterr().out
    plan, times = out.split("where the time went")
    assert "test accuracy:" in plan
    rows = [line.split() for line in plan.splitlines() if line.strip()[:1].isdigit()]
    assert rows == [["0", "0-1", "1", "default"], ["1", "2-4", "2", "default"], ["2", "5-6", "1", "default"]]
    rows = [line.split() for line in times.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:2] for row in rows] == [["0", "1"], ["1", "2"], ["2", "1"]]


KILLED_DEMO = """
import os, signal, sys
from funcpipe import batches
from funcpipe.cli import main

original = batches.Replay.get

def get(self, iteration):
    if iteration == 10:  # the driver dies once it has seen iteration 7 finish
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, iteration)

batches.Replay.get = get
main(["demo", "--epochs", "1", "--backend", "thread", "--storage", sys.argv[1], "--job", "digits",
      "--checkpoint-every", "4", "--json"])
"""


def test_resume_continues_a_killed_demo_to_the_same_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = (tmp_path / "killed").as_uri()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", KILLED_DEMO, url], env=env, capture_output=True, timeout=300,
                            check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert main(["resume", "--storage", url, "--backend", "thread", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["iterations"] == 22 - 4  # from the checkpoint before iteration 4
    assert main(["demo", "--epochs", "1", "--backend", "thread", "--storage", (tmp_path / "whole").as_uri(),
                 "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert resumed["accuracy_after"] == pytest.approx(whole["accuracy_after"], abs=1e-9)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-4)


def test_resume_of_a_job_started_from_python_says_how(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torch import nn

    from funcpipe import Trainer
    from tests.helpers import mlp7, regression_batches, sgd_momentum

    url = (tmp_path / "py").as_uri()
    plan = Plan.manual([7], micro_batch_size=4, global_batch_size=8)
    Trainer(mlp7(), nn.functional.mse_loss, sgd_momentum, plan, backend="thread", storage=url,
            job="from-python").fit(regression_batches(1, 8), progress=False)
    assert main(["resume", "--storage", url, "--job", "from-python"]) == 2
    err = capsys.readouterr().err
    assert "job 'from-python'" in err and "was started from Python" in err and "resume=True" in err


def test_bad_argument_is_one_line_and_exit_code_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "funcpipe.cli", "demo", "--backend", "nope"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("funcpipe: error: unknown backend 'nope'")
    assert "Traceback" not in proc.stderr


def test_help_lists_the_demo() -> None:
    proc = subprocess.run([sys.executable, "-m", "funcpipe.cli", "--help"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "train a digits classifier" in proc.stdout


# -- profile, plan and simulate ---------------------------------------------------

TINY_MODEL = '''
import torch
from torch import nn


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.randn(8, 8), torch.randn(8, 3), nn.functional.mse_loss


def three_values():
    model, inputs, targets, _ = tiny()
    return model, inputs, targets


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0 = nn.Linear(8, 16)
        self.l1 = nn.Linear(16, 3)

    def forward(self, x, scale):
        h = torch.relu(self.l0(x)) * scale
        return self.l1(h), h


def two_inputs():
    torch.manual_seed(0)
    inputs = (torch.randn(8, 8), torch.rand(8, 1))
    return _TwoInputs(), inputs, torch.randn(8, 3), lambda out, y: nn.functional.mse_loss(out[0], y)


def not_a_module():
    _, inputs, targets, loss_fn = tiny()
    return (lambda x: x), inputs, targets, loss_fn


def broken():
    raise RuntimeError("no data here")
'''
FAST = ["--rounds", "1", "--warmup", "0"]


@pytest.fixture
def tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A model module in a fresh directory, which is also the cwd; yields its ``file.py:function`` spec."""
    (tmp_path / "tiny_models.py").write_text(TINY_MODEL, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    yield str(tmp_path / "tiny_models.py") + ":tiny"
    sys.modules.pop("tiny_models", None)  # imported by name from this directory


def big_profile(path: Path, param_bytes: int = 10**9) -> Path:
    """Three named layers of 1 GB of parameters (3 GB with Adam's state, 6 GB with the workspace of
    the memory model): one stage each on Lambda."""
    layers = tuple(
        LayerProfile(
            name=name, forward_alpha_s=0.001, forward_beta_s=0.004, backward_alpha_s=0.002, backward_beta_s=0.008,
            param_bytes=param_bytes, optimizer_bytes=2 * param_bytes, update_s=0.5, output_bytes_per_sample=4e4,
            held_bytes_per_sample=8e4,
        )
        for name in ("embed", "body", "head")
    )
    ModelProfile(layers, 1e3, 8.0).save(path)
    return path


def test_profile_prints_every_layer_and_saves_the_profile(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["profile", tiny_model, *FAST, "--micro-batch-sizes", "1", "2"]) == 0
    out = capsys.readouterr().out
    saved = ModelProfile.load(tmp_path / "tiny.profile.json")  # default: FUNCTION.profile.json in the cwd
    assert saved.num_layers == 3 and saved.micro_batch_sizes == (1, 2)
    assert "fwd ms" in out and "held KB/sample" in out and "profile saved to tiny.profile.json" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:3] for row in rows] == [["0", "0", "Linear"], ["1", "1", "ReLU"], ["2", "2", "Linear"]]
    assert float(rows[0][5]) == pytest.approx((8 * 16 + 16) * 4 / 2**20, abs=1e-3)  # params MB of Linear(8, 16)


def test_profile_json_and_out(tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "sub.json"
    assert main(["profile", tiny_model, *FAST, "--out", str(out_path), "--json"]) == 0
    captured = capsys.readouterr()
    printed = ModelProfile.from_dict(json.loads(captured.out))
    assert printed == ModelProfile.load(out_path)
    assert [layer.name for layer in printed.layers] == ["0", "1", "2"]
    assert "profile saved to" in captured.err


def test_plan_chooses_the_micro_batch_and_schedule_unless_told(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    profile_path = big_profile(tmp_path / "big.json")
    common = ["plan", str(profile_path), "--platform", "aws_lambda", "--global-batch", "8", "--time-limit", "5",
              "--json"]
    expected = funcpipe.plan(ModelProfile.load(profile_path), "aws_lambda", global_batch_size=8, time_limit_s=5,
                             progress=False)
    assert main(common) == 0  # --micro-batch auto, --schedule auto and --sync auto are the defaults
    chosen = Plan.from_dict({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "per_epoch"})
    assert chosen == expected
    assert main([*common, "--micro-batch", "4", "--schedule", "1f1b", "--sync", "four_phase"]) == 0
    fixed = Plan.from_dict({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "per_epoch"})
    assert (fixed.micro_batch_size, fixed.schedule) == (4, "1f1b")
    assert main([*common, "--micro-batch", "2,8"]) == 0
    listed = Plan.from_dict({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "per_epoch"})
    assert listed.micro_batch_size in (2, 8)
    assert main([*common, "--micro-batch", "3"]) == 2
    assert "micro_batch_size 3 does not divide global_batch_size 8" in capsys.readouterr().err
    for flag, value, message in (("--schedule", "pipedream", "'pipedream' is not one of auto, gpipe, 1f1b"),
                                 ("--micro-batch", "two", "is not auto, a micro-batch size or a comma-separated")):
        with pytest.raises(SystemExit) as info:  # a usage error, as argparse reports it
            main([*common, flag, value])
        assert info.value.code == 2 and message in capsys.readouterr().err


def test_plan_table_json_and_out_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile_path = big_profile(tmp_path / "big.json")
    plan_path = tmp_path / "plan.json"
    common = ["plan", str(profile_path), "--platform", "aws_lambda", "--global-batch", "8", "--micro-batch", "2",
              "--time-limit", "5"]
    assert main([*common, "--samples", "1000", "--out", str(plan_path)]) == 0
    out = capsys.readouterr().out
    saved = Plan.from_dict(json.loads(plan_path.read_text(encoding="utf-8")))
    assert saved.balance == (1, 1, 1) and saved.platform == "aws_lambda"
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:4] for row in rows] == [
        ["0", "0", "(embed)", "1"], ["1", "1", "(body)", "1"], ["2", "2", "(head)", "1"],  # stage, layers, replicas
    ]
    assert "predicted per iteration:" in out
    assert "predicted per epoch of 1,000 samples (125 iterations)" in out  # 1000 / 8
    assert "solver: optimal" in out and f"plan saved to {plan_path}" in out

    assert main([*common, "--samples", "1001", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    epoch = data.pop("per_epoch")
    plan = Plan.from_dict(data)
    assert plan == saved
    assert plan.predicted_iteration_s is not None and plan.predicted_cost_usd is not None
    assert epoch["iterations"] == 126  # 1001 samples: the last, partial batch is an iteration too
    assert epoch["seconds"] == pytest.approx(126 * plan.predicted_iteration_s)
    assert epoch["cost_usd"] == pytest.approx(126 * plan.predicted_cost_usd)

    assert main([*common, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_epoch"] is None


def test_plan_profiles_a_model_first(tiny_model: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", tiny_model, *FAST, "--platform", "aws_lambda", "--global-batch", "8", "--micro-batch", "2",
                 "--objective", "cost", "--max-stages", "2", "--memory-mb", "1024", "2048", "--time-limit", "5",
                 "--json"]) == 0
    plan = Plan.from_dict({k: v for k, v in json.loads(capsys.readouterr().out).items() if k != "per_epoch"})
    assert sum(plan.balance) == 3 and plan.num_stages <= 2
    assert plan.memory_mb is not None and set(plan.memory_mb) <= {1024, 2048}


def test_simulate_prints_stages_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile_path = big_profile(tmp_path / "big.json", 10**9)  # two replicas fit the largest tier
    plan = Plan.manual([1, 1, 1], replicas=[1, 2, 1], micro_batch_size=2, global_batch_size=8, memory_mb=10240)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan.to_dict()), encoding="utf-8")
    png = tmp_path / "timeline.png"
    assert main(["simulate", str(profile_path), "--plan", str(plan_path), "--platform", "aws_lambda",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Simulation on aws_lambda:")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:3] for row in rows] == [["0", "0", "1"], ["1", "1", "2"], ["2", "2", "1"]]
    assert f"timeline saved to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["simulate", str(profile_path), "--plan", str(plan_path), "--platform", "aws_lambda", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = simulate(plan, ModelProfile.load(profile_path), "aws_lambda")
    assert data["iteration_s"] == pytest.approx(expected.iteration_s)
    assert data["cost_usd"] == pytest.approx(expected.cost_usd)
    assert data["formula_s"] == pytest.approx(expected.formula_s)
    assert [(st["stage"], st["replicas"]) for st in data["stages"]] == [(0, 1), (1, 2), (2, 1)]
    assert Plan.from_dict(data["plan"]) == plan


def test_simulate_takes_the_plan_commands_json_and_its_platform(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile_path = big_profile(tmp_path / "big.json")
    assert main(["plan", str(profile_path), "--platform", "alibaba_fc", "--global-batch", "8", "--micro-batch", "2",
                 "--time-limit", "5", "--samples", "80", "--json"]) == 0
    plan_path = tmp_path / "printed.json"
    plan_path.write_text(capsys.readouterr().out, encoding="utf-8")  # still has per_epoch
    assert main(["simulate", str(profile_path), "--plan", str(plan_path)]) == 0
    assert capsys.readouterr().out.startswith("Simulation on alibaba_fc:")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tiny_models", "is not MODULE:FUNCTION"),
        ("no_such_module_xyz:tiny", "no module named 'no_such_module_xyz'"),
        ("tiny_models:nope",
         "has no function 'nope' (functions there: broken, not_a_module, three_values, tiny, two_inputs)"),
        ("missing_file.py:tiny", "no file 'missing_file.py'"),
        ("tiny_models.py:three_values", "three_values() returned a 3-tuple, not 4 values"),
        ("tiny_models:not_a_module", "model is a function, not an nn.Module"),
        ("tiny_models:broken", "broken() raised RuntimeError: no data here"),
    ],
)
def test_bad_model_spec_is_one_line_naming_it(
    tiny_model: str, spec: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["profile", spec, *FAST]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"funcpipe: error: model {spec!r}")
    assert message in lines[0]
    assert "hint" in lines[0] or "raised" in lines[0]


def test_plan_and_simulate_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile_path = big_profile(tmp_path / "big.json")
    assert main(["plan", str(profile_path), "--platform", "nowhere", "--global-batch", "8",
                 "--micro-batch", "2"]) == 2
    assert capsys.readouterr().err.startswith("funcpipe: error: unknown platform 'nowhere'")
    assert main(["plan", str(tmp_path / "absent.json"), "--platform", "aws_lambda", "--global-batch", "8",
                 "--micro-batch", "2"]) == 2
    assert "no profile at" in capsys.readouterr().err
    assert main(["simulate", str(profile_path), "--plan", str(tmp_path / "absent.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no plan at" in err
    manual = tmp_path / "manual.json"
    manual.write_text(json.dumps(Plan.manual([3], micro_batch_size=2, global_batch_size=8).to_dict()), "utf-8")
    assert main(["simulate", str(profile_path), "--plan", str(manual)]) == 2
    assert "names no platform; hint: --platform" in capsys.readouterr().err


def test_help_lists_every_command_on_one_line() -> None:
    help_text = build_parser().format_help()
    lines = {line.split()[0]: line for line in help_text.splitlines() if line.startswith("    ")}
    assert set(lines) == {"demo", "resume", "profile", "plan", "simulate", "train", "deploy", "calibrate"}
    for line in lines.values():
        assert len(line.split()) > 3  # the name and its one-line description
    commands = help_text.split("positional arguments:")[1].split("options:")[0]
    assert len([line for line in commands.splitlines() if line.strip()]) == 1 + 8  # COMMAND, then one each


def test_every_command_prints_json_for_scripts_and_takes_debug() -> None:
    parser = build_parser()
    (choices,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert isinstance(choices, dict) and len(choices) == 8
    for name, sub in choices.items():
        options = {option for action in sub._actions for option in action.option_strings}
        assert {"--json", "--debug"} <= options, name


def test_usage_error_is_one_line_naming_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "tiny_models:tiny"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "funcpipe: error: the following arguments are required: --plan; hint: funcpipe train --help\n"


def test_unexpected_error_is_one_line_unless_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: argparse.Namespace) -> int:
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(cli, "_simulate", broken)
    assert main(["simulate", "p.json", "--plan", "plan.json"]) == 2
    err = capsys.readouterr().err
    assert err == ("funcpipe: error: unexpected RuntimeError: disk on fire second line; "
                   "hint: --debug shows the traceback\n")
    for argv in (["--debug", "simulate", "p.json", "--plan", "x"], ["simulate", "p.json", "--plan", "x", "--debug"]):
        with pytest.raises(RuntimeError, match="disk on fire"):
            main(argv)


# -- train ----------------------------------------------------------------------------


@pytest.fixture
def tiny_plan(tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A plan for the tiny model (3 layers, global batch 8) on Lambda, saved by `funcpipe plan --out`."""
    path = tmp_path / "tiny.plan.json"
    assert main(["plan", tiny_model, *FAST, "--platform", "aws_lambda", "--global-batch", "8", "--micro-batch", "2",
                 "--objective", "cost", "--time-limit", "5", "--out", str(path), "--json"]) == 0
    capsys.readouterr()
    return path


def test_train_prints_measured_next_to_predicted_and_saves_weights(
    tiny_model: str, tiny_plan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    weights = tmp_path / "tiny.safetensors"
    assert main(["train", tiny_model, "--plan", str(tiny_plan), "--backend", "thread", "--storage", "memory://cli-train",
                 "--epochs", "3", "--optimizer", "sgd", "--lr", "0.05", "--out", str(weights)]) == 0
    out = capsys.readouterr().out
    plan = Plan.from_dict(json.loads(tiny_plan.read_text(encoding="utf-8")))
    assert out.startswith("Training: 3 iterations")  # 8 samples: one global batch per epoch
    assert "predicted (aws_lambda)" in out and f"weights saved to {weights}" in out
    summary = {line.rsplit(None, 2)[0].strip(): line.split()[-2:] for line in out.splitlines()
               if line.startswith("  seconds per") or line.startswith("  dollars per")}
    assert summary["seconds per iteration"][1] == f"{plan.predicted_iteration_s:.3f}"
    assert summary["dollars per iteration (aws_lambda)"][1] == f"${plan.predicted_cost_usd:.6f}"
    assert "seconds per epoch (1 iterations)" in summary
    stage_rows = [line.split() for line in out.split("Per stage")[1].splitlines() if line.strip()[:1].isdigit()]
    assert [row[:2] for row in stage_rows] == [[str(s), str(r)] for s, r in enumerate(plan.replicas)]

    model, inputs, targets, _ = cli.load_model(tiny_model)  # seeded: the model the CLI started from
    trained = load_file(weights)
    assert trained.keys() == model.state_dict().keys()
    assert not torch.equal(trained["0.weight"], model.state_dict()["0.weight"])  # it learned something
    # Same batches, same SGD: the CLI trains what plain PyTorch would.
    from tests.helpers import plain_training

    reference = plain_training(model, torch.nn.functional.mse_loss,
                               lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), [(inputs, targets)] * 3)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6)


def test_train_a_builder_of_any_module_with_two_inputs_like_plain_pytorch(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    spec = tiny_model.replace(":tiny", ":two_inputs")
    plan_path, weights = tmp_path / "two.plan.json", tmp_path / "two.safetensors"
    assert main(["plan", spec, *FAST, "--platform", "aws_lambda", "--global-batch", "8", "--micro-batch", "2",
                 "--out", str(plan_path), "--json"]) == 0
    assert sum(Plan.from_dict(json.loads(plan_path.read_text(encoding="utf-8"))).balance) == 2  # units l0, l1
    capsys.readouterr()
    # Two stages, so that the hidden state and the second input cross a cut.
    plan_path.write_text(json.dumps(Plan.manual([1, 1], micro_batch_size=2, global_batch_size=8).to_dict()),
                         encoding="utf-8")
    assert main(["train", spec, "--plan", str(plan_path), "--backend", "thread", "--storage", "memory://cli-two",
                 "--epochs", "3", "--optimizer", "sgd", "--lr", "0.05", "--out", str(weights)]) == 0
    assert capsys.readouterr().out.startswith("Training: 3 iterations")
    model, (x, scale), y, loss_fn = cli.load_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(model(x, scale), y).backward()
        optimizer.step()
    trained = load_file(weights)
    assert trained.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6)


def test_train_json(tiny_model: str, tiny_plan: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", tiny_model, "--plan", str(tiny_plan), "--backend", "thread", "--storage", "memory://cli-json",
                 "--iterations", "2", "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert len(data["losses"]) == len(data["seconds"]) == 2
    assert data["iterations_per_epoch"] is None and data["weights"] is None
    assert Plan.from_dict(data["plan"]) == Plan.from_dict(json.loads(tiny_plan.read_text(encoding="utf-8")))
    assert [row["stage"] for row in data["stages"]] == list(range(len(Plan.from_dict(data["plan"]).balance)))
    assert "funcpipe:" not in captured.err  # no progress bar with --json


def test_train_errors_are_one_line(
    tiny_model: str, tiny_plan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(Plan.manual([2], micro_batch_size=2, global_batch_size=8).to_dict()), "utf-8")
    assert main(["train", tiny_model, "--plan", str(wrong), "--backend", "thread"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model and sum of balance have different length (model: 3 layers" in err
    big = tmp_path / "big.json"
    big.write_text(json.dumps(Plan.manual([3], micro_batch_size=2, global_batch_size=16).to_dict()), "utf-8")
    assert main(["train", tiny_model, "--plan", str(big), "--backend", "thread"]) == 2
    assert "returned 8 samples, fewer than one global batch of the plan (16)" in capsys.readouterr().err
    assert main(["train", tiny_model, "--plan", str(tiny_plan), "--backend", "thread", "--lr", "-1"]) == 2
    assert "--lr must be a positive learning rate, got -1.0" in capsys.readouterr().err


# -- a cloud backend without its SDK (train and deploy) ------------------------------

#: backend -> (the module of its SDK that its extra installs, the extra)
CLOUD_SDKS = {"aws_lambda": ("boto3", "aws"), "alibaba_fc": ("alibabacloud_fc20230330", "alibaba")}


@pytest.fixture(params=sorted(CLOUD_SDKS))
def backend_without_sdk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A cloud backend whose SDK ``import`` fails, as when its extra is not installed; yields the backend."""
    backend: str = request.param
    monkeypatch.setitem(sys.modules, CLOUD_SDKS[backend][0], None)  # None in sys.modules: the import is refused
    # Imported afresh: neither the cached module nor the package's attribute for it stand in.
    monkeypatch.delitem(sys.modules, f"funcpipe.executors.{backend}", raising=False)
    monkeypatch.delattr(funcpipe.executors, backend, raising=False)
    yield backend


def missing_sdk_line(backend: str) -> str:
    sdk, extra = CLOUD_SDKS[backend]
    return (f"funcpipe: error: backend {backend!r} needs {sdk}, which is not installed; "
            f"hint: pip install 'funcpipe[{extra}]'\n")


def test_train_on_a_cloud_backend_without_its_sdk_names_the_extra(
    tiny_model: str, backend_without_sdk: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(Plan.manual([3], micro_batch_size=2, global_batch_size=8).to_dict()), "utf-8")
    assert main(["train", tiny_model, "--plan", str(plan), "--backend", backend_without_sdk]) == 2
    assert capsys.readouterr().err == missing_sdk_line(backend_without_sdk)


def test_calibrate_without_the_sdk_names_the_extra(
    backend_without_sdk: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["calibrate", backend_without_sdk, "--storage", "s3://bucket/prefix",
                 "--endpoint-url", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == missing_sdk_line(backend_without_sdk)


def test_deploy_without_the_sdk_names_the_extra(backend_without_sdk: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", backend_without_sdk, "--image", "registry.example/funcpipe-worker:1",
                 "--role", "arn:aws:iam::123456789012:role/funcpipe-worker",
                 "--endpoint-url", "http://127.0.0.1:9"]) == 2  # should the SDK load after all: loopback only
    assert capsys.readouterr().err == missing_sdk_line(backend_without_sdk)
