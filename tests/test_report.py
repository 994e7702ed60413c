"""report: plans, simulations and training runs as text and HTML tables, checked cell by cell."""

from __future__ import annotations

import collections
import dataclasses
import html.parser
import math
import re
import statistics

import pytest
import torch
from torch import nn

import funcpipe
from funcpipe import ConfigError, History, Plan, Simulation, Trainer, simulate
from funcpipe.profiler import LayerProfile, ModelProfile
from funcpipe.report import Report, Table, history_report, plan_report, side_by_side
from funcpipe.storage import counting
from tests.helpers import mlp7, regression_batches


class Cells(html.parser.HTMLParser):
    """The text of every <th>/<td> of an HTML fragment, row by row; fails on unbalanced tags."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.stack: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()
        if tag in ("td", "th"):
            assert self._cell is not None
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def cells(fragment: str) -> list[list[str]]:
    parser = Cells()
    parser.feed(fragment)
    parser.close()
    assert parser.stack == []
    return parser.rows


def layer(i: int) -> LayerProfile:
    return LayerProfile(
        name=f"layer{i}", forward_alpha_s=0.001, forward_beta_s=0.01, backward_alpha_s=0.002, backward_beta_s=0.02,
        param_bytes=50_000_000, optimizer_bytes=100_000_000, update_s=0.0125, output_bytes_per_sample=2e5,
        held_bytes_per_sample=4e5,
    )


@pytest.fixture(scope="module")
def profile() -> ModelProfile:
    return ModelProfile(tuple(layer(i) for i in range(4)), 1e5, 8.0)


@pytest.fixture(scope="module")
def sim(profile: ModelProfile) -> Simulation:
    """Three stages, the middle one with two replicas, on Lambda."""
    plan = Plan.manual([1, 2, 1], replicas=[1, 2, 1], micro_batch_size=4, global_batch_size=16)
    return simulate(plan, profile, "aws_lambda")


def test_table_text_aligns_columns_under_group_labels_and_html_escapes() -> None:
    table = Table("Title <b>", ("name", "a", "b"), (("x<y", "1.5", "22"), ("long name", "10", "3")),
                  groups=(("", 1), ("both numbers", 2)), notes=("a & b",), left=(0,))
    assert str(table).splitlines() == [
        "Title <b>",
        "             both numbers",  # over the columns it spans, which widen to hold it
        "  name         a        b",
        "  x<y        1.5       22",
        "  long name   10        3",
        "  a & b",
    ]
    fragment = table._repr_html_()
    assert "<b>" not in fragment and "Title &lt;b&gt;" in fragment and "a &amp; b" in fragment
    assert cells(fragment) == [["", "both numbers"], ["name", "a", "b"], ["x<y", "1.5", "22"], ["long name", "10", "3"]]
    assert 'colspan="2"' in fragment
    with pytest.raises(ConfigError, match="a row of 2 cells under 3 columns"):
        Table("t", ("a", "b", "c"), (("1", "2"),))
    with pytest.raises(ConfigError, match="do not span 3 columns"):
        Table("t", ("a", "b", "c"), (), groups=(("g", 2),))


def test_simulated_plan_has_one_row_per_stage_with_its_predictions(sim: Simulation, profile: ModelProfile) -> None:
    plan = dataclasses.replace(sim.plan, samples=1000)
    assert plan.predicted_stages == sim.stages and plan.platform == "aws_lambda"
    text = str(plan)
    lines = text.splitlines()
    assert lines[0] == ("Plan for aws_lambda: 3 stage(s), 4 worker(s), 4 micro-batches of 4 (global batch 16), "
                        "schedule=gpipe, sync=pipelined")
    assert lines[2].split() == ["stage", "layers", "replicas", "memory", "MB", "needed", "MB", "compute", "sync",
                                "transfer", "idle", "$/iter", "$/epoch"]
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    epoch = math.ceil(1000 / 16)
    assert rows == [
        [str(st.stage), layers, str(st.replicas), str(st.memory_mb), f"{st.memory_needed_mb:.0f}",
         f"{st.compute_s:.3f}", f"{st.sync_s:.3f}", f"{st.upload_s + st.download_s:.3f}", f"{st.idle_s:.3f}",
         f"${st.cost_usd:.6f}", f"${st.cost_usd * epoch:.4f}"]
        for st, layers in zip(sim.stages, ["0", "1-2", "3"], strict=True)
    ]
    assert sim.stages[1].sync_s > 0  # the replicated stage all-reduces
    assert f"predicted per iteration: {sim.iteration_s:.3f} s, ${sim.cost_usd:.6f}" in text
    assert f"predicted per epoch of 1,000 samples ({epoch} iterations)" in text
    assert f"${epoch * sim.cost_usd:.4f}" in text
    html_rows = cells(plan._repr_html_())
    assert html_rows[1][0] == "stage" and len(html_rows) == 2 + 3  # groups, header, one row per stage
    assert [row[:3] for row in html_rows[2:]] == [["0", "0", "1"], ["1", "1-2", "2"], ["2", "3", "1"]]
    named = str(plan_report(plan, layer_names=[lp.name for lp in profile.layers]))
    assert "1-2 (layer1 … layer2)" in named
    with pytest.raises(ConfigError, match="layer_names has 2 names but the plan cuts 4 layers"):
        plan_report(plan, layer_names=["a", "b"])


def test_simulation_table_and_html(sim: Simulation) -> None:
    text = str(sim)
    assert text.splitlines()[0] == (
        f"Simulation on aws_lambda: {sim.iteration_s:.3f} s and ${sim.cost_usd:.6f} per iteration (formula "
        f"{sim.formula_s:.3f} s); 4 micro-batches of 4 (global batch 16), schedule=gpipe, sync=pipelined"
    )
    assert "all-reduce" not in text  # one sync for every stage: the title names it
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:3] for row in rows] == [["0", "0", "1"], ["1", "1-2", "2"], ["2", "3", "1"]]
    assert [row[-1] for row in rows] == [f"${st.cost_usd:.6f}" for st in sim.stages]
    assert len(cells(sim._repr_html_())) == 2 + len(sim.stages)


def test_schedule_micro_batch_and_a_sync_per_stage(profile: ModelProfile) -> None:
    # 1F1B, micro-batches of 2, a different all-reduce on each replicated stage: the titles
    # name the schedule and the micro-batch size, a column each stage's all-reduce.
    plan = Plan.manual([1, 2, 1], replicas=[1, 2, 3], micro_batch_size=2, global_batch_size=16,
                       sync=["pipelined", "four_phase", "pipelined"], schedule="1f1b")
    lines = str(plan).splitlines()
    assert lines[:5] == [
        "Plan: 3 stage(s), 6 worker(s), 8 micro-batches of 2 (global batch 16), schedule=1f1b, sync per stage",
        "  stage  layers  replicas  all-reduce  memory MB",
        "      0  0              1  –             default",
        "      1  1-2            2  four_phase    default",
        "      2  3              3  pipelined     default",
    ]
    assert "  all-reduce: of each stage's gradients among its replicas (– for one replica)" in lines
    sim = simulate(plan, profile, "aws_lambda")
    for text, reduce_column in ((str(sim.plan), 3), (str(sim), 3)):
        title, *rest = text.splitlines()
        assert title.endswith("8 micro-batches of 2 (global batch 16), schedule=1f1b, sync per stage")
        assert rest[1].split()[:4] == ["stage", "layers", "replicas", "all-reduce"]
        rows = [line.split() for line in rest if line.strip()[:1].isdigit()]
        assert [row[reduce_column] for row in rows] == ["–", "four_phase", "pipelined"]
    plan_cells = cells(sim.plan._repr_html_())
    assert plan_cells[1][:4] == ["stage", "layers", "replicas", "all-reduce"]
    assert [row[3] for row in plan_cells[2:]] == ["–", "four_phase", "pipelined"]
    assert [len(row) for row in plan_cells] == [3, 11, 11, 11, 11]  # the groups still span the header
    sim_cells = cells(sim._repr_html_())
    assert [row[3] for row in sim_cells[2:]] == ["–", "four_phase", "pipelined"]
    # The same sync named per stage is one sync: the title names it, no column.
    same = dataclasses.replace(plan, sync=("pipelined",) * 3)
    assert str(same).splitlines()[0].endswith("schedule=1f1b, sync=pipelined")
    assert "all-reduce" not in str(same)


def test_side_by_side_lays_reports_out_in_a_row(sim: Simulation) -> None:
    manual = Plan.manual([4], micro_batch_size=4, global_batch_size=16)
    both = side_by_side(sim.plan, manual)
    fragment = both._repr_html_()
    assert "display:flex" in fragment
    assert fragment.count("<table") == 2 and fragment.index("Plan for aws_lambda") < fragment.index("Plan: 1 stage")
    assert str(both) == f"{sim.plan}\n\n{manual}"
    assert "<pre>just text</pre>" in side_by_side("just text")._repr_html_()
    with pytest.raises(ConfigError, match="at least one item"):
        side_by_side()


@pytest.fixture(scope="module")
def trained() -> tuple[History, Simulation, ModelProfile]:
    """A real run: mlp7 as 2 stages on threads, with a plan simulated on Lambda (so it carries a price)."""
    model = mlp7()
    batches = regression_batches(4, 8)
    measured = funcpipe.profile(model, *batches[0], nn.functional.mse_loss, micro_batch_sizes=(1, 2), rounds=1,
                                warmup=0, progress=False)
    plan = Plan.manual([3, 4], replicas=[1, 2], micro_batch_size=2, global_batch_size=8)
    on_lambda = simulate(plan, measured, "aws_lambda")
    # Every storage opened by this URL (the driver's, each worker's) also counts into the counter
    # "report-history", apart from the requests funcpipe measures itself.
    counting.counter("report-history").reset()
    trainer = Trainer(model, nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.01), on_lambda.plan,
                      backend="thread", storage="counted+memory://report-history?counter=report-history")
    history = trainer.fit(batches, epochs=2, progress=False)
    return history, on_lambda, measured


def test_history_shows_measured_next_to_the_plans_prediction(
    trained: tuple[History, Simulation, ModelProfile]
) -> None:
    history, on_lambda, _ = trained
    assert len(history) == 8 and history.iterations_per_epoch == 4 and history.plan == on_lambda.plan
    text = str(history)
    assert text.splitlines()[0].startswith("Training: 8 iterations in ")
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.split("\n\n")[0].splitlines()[2:6]]
    summary = {row[0]: row[1:] for row in rows}
    median = statistics.median(history.seconds[1:])
    assert summary["seconds per iteration"] == [f"{median:.3f}", f"{on_lambda.iteration_s:.3f}"]
    cost = history.measured_cost()
    assert cost is not None
    assert summary["dollars per iteration (aws_lambda)"] == [f"${cost.total_usd / 8:.6f}", f"${on_lambda.cost_usd:.6f}"]
    assert summary["seconds per epoch (4 iterations)"] == [f"{4 * median:.3f}", f"{4 * on_lambda.iteration_s:.3f}"]
    stages = [line.split() for line in text.split("Per stage")[1].splitlines() if line.strip()[:1].isdigit()]
    measured = history.stage_summary()
    assert [row[:2] for row in stages] == [["0", "1"], ["1", "2"]]
    for row, m, p in zip(stages, measured, on_lambda.stages, strict=True):
        assert row[2:] == [f"{m['compute_s'] + m['update_s']:.3f}", f"{p.compute_s:.3f}", f"{m['sync_s']:.3f}",
                           f"{p.sync_s:.3f}", f"{m['wait_s']:.3f}", f"{p.idle_s:.3f}", f"{m['total_s']:.3f}",
                           f"{on_lambda.iteration_s:.3f}"]
    assert measured[1]["sync_s"] > 0  # two replicas all-reduced for real
    tables = history._repr_html_().count("<table")
    assert tables == 3


def test_history_measures_every_request_and_call_second_of_a_thread_run(
    trained: tuple[History, Simulation, ModelProfile]
) -> None:
    history, on_lambda, _ = trained
    # Every request made through the job's storage, as the outer counter saw it, is one the driver or a
    # worker counted: none missed, none twice.
    outer = counting.counter("report-history").counts()
    measured: collections.Counter[str] = collections.Counter(history.driver_requests)
    for call in history.workers:
        measured.update(call["requests"])
        assert call["status_requests"] == dict.fromkeys(outer, 0)  # no function, no status object
    assert dict(measured) == outer and outer["GET_miss"] > 0  # the polls are in
    # Each call's seconds, rounded up to Lambda's millisecond, at its tier's price (1 GB = 1024 MB).
    assert len(history.runs) == 1 and history.runs[0]["invocations"] == 3 == len(history.workers)
    assert all(not c["billed"] and c["memory_mb"] == on_lambda.plan.memory_mb[c["stage"]] for c in history.workers)
    assert all(c["call_s"] >= c["iterations_s"] > 0 for c in history.workers)
    cost = history.measured_cost()
    assert cost is not None and not cost.billed
    compute = sum(math.ceil(c["call_s"] * 1000) / 1000 * c["memory_mb"] / 1024 * 0.0000166667 for c in history.workers)
    assert cost.compute_usd == pytest.approx(compute)
    assert cost.invocations_usd == pytest.approx(3 * 0.20 / 1e6)
    text = str(history)
    assert "Cost on aws_lambda: 3 invocation(s) in 1 run(s)" in text and "not billed (Ray or threads)" in text
    assert "heartbeats and status 0" in text and "status polls 0" in text


def test_compare_with_a_local_simulation_has_no_dollars(trained: tuple[History, Simulation, ModelProfile]) -> None:
    history, on_lambda, measured = trained
    local = simulate(on_lambda.plan, measured, "local")
    text = str(history.compare(local))
    assert "predicted (local)" in text and f"{local.iteration_s:.3f}" in text
    assert "dollars per" not in text and "a local run costs nothing" in text
    bare = str(dataclasses.replace(history, plan=Plan.manual([3, 4], micro_batch_size=2, global_batch_size=8)))
    assert "predicted" in bare.splitlines()[1] and "–" in bare  # nothing predicted: a dash per cell
    with pytest.raises(ConfigError, match="predicted must be a funcpipe Simulation or Plan"):
        history.compare("fast")  # type: ignore[arg-type]


def test_empty_history() -> None:
    assert str(History()) == "Training: no iterations"
    report = history_report(History())
    assert isinstance(report, Report) and "<table" not in report._repr_html_()
    assert "Training: no iterations" in report._repr_html_()
