"""examples/quickstart.ipynb runs top to bottom in a fresh Jupyter kernel, and shows what it promises.

The notebook is executed once per session with nbclient (its kernel starts a
local Ray of its own, in its own process); each test then reads the outputs of
the cells it names by tag: the tables (HTML and plain text), the figures
(PNG), the progress bars (widgets), and the one cell that is shown, not run.
"""

from __future__ import annotations

import ast
import base64
import inspect
import io
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

import funcpipe
from funcpipe.backends import AWSLambda

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WIDGET = "application/vnd.jupyter.widget-view+json"

# The first test also waits for the whole notebook (about a minute here, alone on 2 cores).
pytestmark = [pytest.mark.notebook, pytest.mark.slow, pytest.mark.timeout(900)]  # runs the notebook: ~50 s


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The notebook after running every cell in a fresh kernel, and the directory it ran in."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path_factory.mktemp("quickstart")
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    return notebook, workdir


def tagged(notebook: Any, tag: str) -> Any:
    cells = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{len(cells)} cells tagged {tag!r}"
    return cells[0]


def data(cell: Any, mime: str) -> list[Any]:
    """Every output of ``cell`` in the given MIME type (results and displays)."""
    return [out["data"][mime] for out in cell.outputs if mime in out.get("data", {})]


def result(cell: Any, mime: str) -> Any:
    """The cell's value (its ``execute_result``) in the given MIME type."""
    (value,) = [out["data"][mime] for out in cell.outputs if out.output_type == "execute_result"]
    return value


def stage_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]


def test_committed_without_outputs_and_valid() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code), "strip the outputs"


def test_every_cell_ran_without_errors(executed: tuple[Any, Path]) -> None:
    notebook, _ = executed
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    for cell in code:
        assert not [o for o in cell.outputs if o.output_type == "error"]
        stderr = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")
        assert "Traceback" not in stderr and "IProgress not found" not in stderr, stderr
    assert "ray.shutdown()" in tagged(notebook, "shutdown").source  # and it asserted Ray is down


def test_profiling_and_training_show_live_progress_bars(executed: tuple[Any, Path]) -> None:
    notebook, _ = executed
    for tag, name in (("profile", "profiling:"), ("train", "funcpipe:")):
        cell = tagged(notebook, tag)
        bars = [out for out in cell.outputs if WIDGET in out.get("data", {})]
        assert len(bars) == 1, f"{tag}: no progress widget"
        assert bars[0]["data"]["text/plain"].startswith(name)


def test_plans_for_lambda_and_function_compute_side_by_side(executed: tuple[Any, Path]) -> None:
    notebook, _ = executed
    cell = tagged(notebook, "plans")
    markup = result(cell, "text/html")
    assert "display:flex" in markup and markup.count("<table") == 2
    assert markup.index("Plan for aws_lambda") < markup.index("Plan for alibaba_fc")
    text = result(cell, "text/plain")  # the same tables in plain text, not a dataclass repr
    for platform in ("aws_lambda", "alibaba_fc"):
        assert f"Plan for {platform}:" in text
    assert text.count("predicted per epoch of 1,437 samples (23 iterations)") == 2
    header = r"stage\s+layers\s+replicas\s+memory MB\s+needed MB\s+compute\s+sync\s+transfer\s+idle\s+\$/iter\s+\$/ep"
    assert len(re.findall(header, text)) == 2


def test_simulation_table_and_its_figures(executed: tuple[Any, Path]) -> None:
    notebook, workdir = executed
    text = result(tagged(notebook, "simulate"), "text/plain")
    assert text.startswith("Simulation on aws_lambda:")
    assert [row[:3] for row in stage_rows(text)] == [["0", "0-1", "1"], ["1", "2-4", "2"], ["2", "5-6", "1"]]
    assert result(tagged(notebook, "simulate"), "text/html").count("<tr>") == 2 + 3  # groups, header, 3 stages
    sizes = {}
    for tag in ("frontier", "timeline", "cost-breakdown", "loss"):
        (png,) = data(tagged(notebook, tag), "image/png")
        raw = base64.b64decode(png)
        assert raw[:8] == PNG_MAGIC, tag
        sizes[tag] = Image.open(io.BytesIO(raw)).size
        assert sizes[tag][0] > 400, (tag, sizes[tag])
    assert sizes["timeline"][1] > sizes["cost-breakdown"][1]  # 12 rows: three per worker of 4
    saved = workdir / "timeline.png"
    assert saved.read_bytes()[:8] == PNG_MAGIC


def test_training_report_puts_measured_next_to_predicted(executed: tuple[Any, Path]) -> None:
    notebook, _ = executed
    trained = result(tagged(notebook, "train"), "text/plain")
    assert trained.startswith("Training: 66 iterations")  # 3 epochs of 22 global batches
    assert re.search(r"seconds per iteration\s+\d+\.\d{3}\s+\d+\.\d{3}", trained)
    assert "predicted (aws_lambda)" in trained and "dollars per epoch (aws_lambda)" in trained
    compared = result(tagged(notebook, "compare"), "text/plain")
    assert "predicted (local)" in compared and "dollars per" not in compared  # a local run costs nothing
    rows = stage_rows(compared.split("Per stage")[1])
    assert [row[:2] for row in rows] == [["0", "1"], ["1", "2"], ["2", "1"]]
    assert all(len(row) == 10 and "–" not in row for row in rows)  # measured and predicted in every column
    assert "<table" in result(tagged(notebook, "compare"), "text/html")
    (stdout,) = [o.text for o in tagged(notebook, "loss").outputs if o.output_type == "stream"]
    before, after = (float(v) / 100 for v in re.findall(r"(\d+\.\d)%", stdout))
    assert after > before + 0.3  # it learned the digits


def test_the_lambda_cell_is_shown_not_run_and_calls_the_real_api() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = tagged(notebook, "lambda")
    assert cell.cell_type == "markdown"
    (code,) = re.findall(r"```python\n(.*?)```", cell.source, flags=re.DOTALL)
    tree = ast.parse(code)
    calls = {ast.unparse(node.func): node for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert {"funcpipe.Trainer", "AWSLambda", "trainer.fit"} <= set(calls)
    for name, target in (("funcpipe.Trainer", funcpipe.Trainer), ("AWSLambda", AWSLambda),
                         ("trainer.fit", funcpipe.Trainer.fit)):
        accepted = set(inspect.signature(target).parameters)
        assert {k.arg for k in calls[name].keywords} <= accepted, name
    backend = next(k.value for k in calls["funcpipe.Trainer"].keywords if k.arg == "backend")
    assert ast.unparse(backend).startswith("AWSLambda(")
    storage = next(k.value for k in calls["funcpipe.Trainer"].keywords if k.arg == "storage")
    assert isinstance(storage, ast.Constant) and str(storage.value).startswith("s3://")
    train = tagged(notebook, "train").source  # the cell it replaces trains the same way
    assert "funcpipe.Trainer(model, loss_fn, optimizer," in train and "trainer.fit(batches, epochs=3" in train


def test_a_hugging_face_bert_is_profiled_per_unit_planned_and_trained(executed: tuple[Any, Path]) -> None:
    pytest.importorskip("transformers")  # the cell says how to install it when it is missing
    notebook, _ = executed
    cell = tagged(notebook, "hugging_face")
    (stdout,) = [o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"]
    assert "units: ['bert.embeddings', 'bert.encoder.layer.0'," in stdout and "'classifier']" in stdout
    shown = data(cell, "text/plain")
    assert [text.split(":")[0] for text in shown if text.startswith(("Plan for", "Training:"))] == [
        "Plan for aws_lambda", "Training"]
    assert any(text.startswith("Training: 5 iterations") for text in shown)
