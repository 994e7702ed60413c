from __future__ import annotations

import json
import subprocess
import sys

import pytest

from funcpipe.cli import main


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
    assert "stage 1: layers 2-4, 2 replica(s)" in out
    assert "test accuracy:" in out and "where the time went" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:2] for row in rows] == [["0", "1"], ["1", "2"], ["2", "1"]]


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
