"""examples/hugging_face.py, the README's Hugging Face example, runs end to end on local Ray."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hugging_face.py"


def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("funcpipe_example_hugging_face", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("which", ["vision", "text"])
def test_a_hugging_face_model_profiles_plans_and_trains(which: str, capsys: pytest.CaptureFixture[str]) -> None:
    history = getattr(example(), which)(backend="ray", iterations=4)
    assert len(history) == 4
    assert history.losses[-1] < history.losses[0]  # the same batch four times: the loss goes down
    out = capsys.readouterr().out
    units = "convnext.embeddings" if which == "vision" else "bert.embeddings, bert.encoder.layer.0"
    assert units in out and "Plan for aws_lambda" in out
