"""plot: each figure drawn from real simulations, plans and histories, saved as PNG and inspected."""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.lines import Line2D

import funcpipe
from funcpipe import ConfigError, History, Plan, Simulation, simulate
from funcpipe.plot import cost_breakdown_figure, frontier_figure, loss_figure, timeline_figure
from funcpipe.profiler import LayerProfile, ModelProfile
from funcpipe.simulator import Timeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def layer(i: int, params: int) -> LayerProfile:
    return LayerProfile(
        name=f"layer{i}", forward_alpha_s=0.001, forward_beta_s=0.01, backward_alpha_s=0.002, backward_beta_s=0.02,
        param_bytes=params, optimizer_bytes=2 * params, update_s=params / 4e9, output_bytes_per_sample=2e5,
        held_bytes_per_sample=4e5,
    )


@pytest.fixture(scope="module")
def profile() -> ModelProfile:
    """Four layers of 50 MB of parameters each: replicas have gradients to all-reduce."""
    return ModelProfile(tuple(layer(i, 50_000_000) for i in range(4)), 1e5, 8.0)


@pytest.fixture(scope="module")
def sim(profile: ModelProfile) -> Simulation:
    """Three stages, the middle one with two replicas: four workers, all on one tier."""
    plan = Plan.manual([1, 2, 1], replicas=[1, 2, 1], micro_batch_size=4, global_batch_size=16, memory_mb=2048)
    return simulate(plan, profile, funcpipe.platforms.get("aws_lambda"))


@pytest.fixture(scope="module")
def frontier(profile: ModelProfile) -> list[Plan]:
    return funcpipe.pareto(profile, "aws_lambda", global_batch_size=16, micro_batch_size=4, points=5,
                           max_stages=3, max_replicas=2, time_limit_s=3.0)


def xs_ys(line: Line2D) -> tuple[list[float], list[float]]:
    """A line's points as plain floats."""
    return (np.asarray(line.get_xdata(), dtype=float).tolist(), np.asarray(line.get_ydata(), dtype=float).tolist())


def assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_timeline_has_three_rows_per_worker_top_down(sim: Simulation, tmp_path: Path) -> None:
    path = tmp_path / "timeline.png"
    figure = timeline_figure(sim.timeline, path=path)
    assert_png(path)
    (ax,) = figure.axes
    workers = sim.timeline.workers()
    assert workers == [(0, 0), (1, 0), (1, 1), (2, 0)]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 3 * len(workers)
    assert labels[:3] == ["s0r0 compute", "s0r0 upload", "s0r0 download"]
    assert labels[-3:] == ["s2r0 compute", "s2r0 upload", "s2r0 download"]
    bottom, top = ax.get_ylim()
    assert bottom > top  # row 0 (stage 0) drawn at the top
    assert ax.get_xlabel() == "seconds"
    assert ax.get_title() == "Pipeline timeline (one iteration)"
    # One rectangle per span, on the row of its worker thread.
    assert sum(len(c.get_paths()) for c in ax.collections) == len(sim.timeline.spans)
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["forward", "backward", "sync", "update", "upload",
                                                          "download"]
    hatched = [c for c in ax.collections if c.get_hatch()]
    assert hatched  # the all-reduce ("sync") is drawn distinctly
    sync_spans = [s for s in sim.timeline.spans if s.label == "sync"]
    assert sum(len(c.get_paths()) for c in hatched) == len(sync_spans) == 2


def test_timeline_title_height_and_timeline_plot(sim: Simulation, profile: ModelProfile, tmp_path: Path) -> None:
    one = simulate(Plan.manual([4], micro_batch_size=4, global_batch_size=16), profile, "aws_lambda")
    small = timeline_figure(one.timeline, title="one worker")
    large = timeline_figure(sim.timeline)
    assert small.axes[0].get_title() == "one worker"
    assert len(small.axes[0].get_yticklabels()) == 3
    assert large.get_size_inches()[1] > small.get_size_inches()[1]
    path = tmp_path / "via_method.png"
    figure = sim.timeline.plot(str(path), title="via Timeline.plot")
    assert figure.axes[0].get_title() == "via Timeline.plot"
    assert_png(path)


def test_timeline_rejects_empty_and_wrong_input() -> None:
    with pytest.raises(ConfigError, match=r"no spans.*hint"):
        timeline_figure(Timeline((), 0.0))
    with pytest.raises(ConfigError, match="must be a funcpipe Timeline"):
        timeline_figure([])  # type: ignore[arg-type]


def test_frontier_joins_plans_in_time_order_and_marks_the_chosen(frontier: list[Plan], tmp_path: Path) -> None:
    assert len(frontier) >= 2
    chosen = frontier[len(frontier) // 2]
    path = tmp_path / "frontier.png"
    figure = frontier_figure(list(reversed(frontier)), chosen=chosen, path=path)
    assert_png(path)
    (ax,) = figure.axes
    assert ax.get_xlabel() == "seconds per iteration"
    assert ax.get_ylabel() == "dollars per iteration"
    line, star = ax.get_lines()
    xs, ys = xs_ys(line)
    assert xs == sorted(p.predicted_iteration_s or 0.0 for p in frontier)
    assert ys == [p.predicted_cost_usd for p in sorted(frontier, key=lambda p: p.predicted_iteration_s or 0.0)]
    assert xs_ys(star) == ([chosen.predicted_iteration_s], [chosen.predicted_cost_usd])
    assert star.get_marker() == "*"
    texts = [t.get_text() for t in ax.texts]
    shapes = [f"{p.num_stages}s/{p.num_workers}w" for p in frontier]
    assert sorted(t.split()[0] for t in texts[: len(frontier)]) == sorted(shapes)
    assert len(set(texts[: len(frontier)])) == len(frontier)  # no two points share a label
    assert texts[-1].startswith(f"chosen: {chosen.num_stages}s/{chosen.num_workers}w")


def test_frontier_rejects_plans_without_predictions(frontier: list[Plan]) -> None:
    manual = Plan.manual([4], micro_batch_size=4, global_batch_size=16)
    with pytest.raises(ConfigError, match=r"plans\[1\] carries no predicted.*hint: .*pareto"):
        frontier_figure([frontier[0], manual])
    with pytest.raises(ConfigError, match="chosen carries no predicted"):
        frontier_figure(frontier, chosen=manual)
    with pytest.raises(ConfigError, match="no plans"):
        frontier_figure([])
    half = dataclasses.replace(frontier[0], predicted_cost_usd=None)
    with pytest.raises(ConfigError, match="carries no predicted"):
        frontier_figure([half])


def test_cost_breakdown_has_one_bar_per_stage(sim: Simulation, tmp_path: Path) -> None:
    path = tmp_path / "cost.png"
    figure = cost_breakdown_figure(sim, path=path)
    assert_png(path)
    (ax,) = figure.axes
    assert len(ax.patches) == len(sim.stages) == 3
    heights = [p.get_height() for p in ax.patches]  # type: ignore[attr-defined]
    assert heights == pytest.approx([st.cost_usd for st in sim.stages])
    assert heights[1] == pytest.approx(2 * heights[0])  # two replicas, same tier, same iteration
    assert ax.get_xlabel() == "stage"
    assert ax.get_ylabel() == "dollars per iteration"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in ax.texts] == [f"{st.replicas}×{st.memory_mb} MB" for st in sim.stages]
    assert "$" in ax.get_title()
    with pytest.raises(ConfigError, match="must be a funcpipe Simulation"):
        cost_breakdown_figure(sim.timeline)  # type: ignore[arg-type]


def test_loss_curve(tmp_path: Path) -> None:
    losses = [2.3 * math.exp(-i / 12) + 0.05 * ((i * 7) % 5) for i in range(40)]
    history = History(losses=losses, seconds=[0.1] * 40)
    path = tmp_path / "loss.png"
    figure = loss_figure(history, path=path)
    assert_png(path)
    (ax,) = figure.axes
    assert ax.get_xlabel() == "iteration"
    assert ax.get_ylabel() == "loss"
    raw, averaged = ax.get_lines()  # 40 iterations: also a moving average
    assert xs_ys(raw) == (list(range(1, 41)), losses)
    avg_x, avg_y = xs_ys(averaged)
    assert avg_x == list(range(2, 41))  # a window of 40 // 20 = 2
    assert avg_y == pytest.approx([(a + b) / 2 for a, b in itertools.pairwise(losses)])
    short = loss_figure([0.9, 0.5, 0.4], title="three")
    assert short.axes[0].get_title() == "three"
    assert len(short.axes[0].get_lines()) == 1


def test_loss_curve_of_a_real_training_run(tmp_path: Path) -> None:
    from torch import nn

    from funcpipe import Trainer
    from tests.helpers import mlp7, regression_batches

    batches = regression_batches(3, 8)
    trainer = Trainer(mlp7(), nn.functional.mse_loss, lambda p: torch.optim.SGD(p, lr=0.05), Plan.manual(
        [3, 4], replicas=[1, 2], micro_batch_size=2, global_batch_size=8), backend="thread", storage="memory://plot")
    history = trainer.fit(batches, epochs=8, progress=False)
    path = tmp_path / "loss.png"
    figure = loss_figure(history, path=path)
    assert_png(path)
    (ax,) = figure.axes
    raw, averaged = ax.get_lines()  # 24 iterations: also a moving average
    assert xs_ys(raw) == (list(range(1, 25)), history.losses)
    assert xs_ys(averaged)[0] == list(range(2, 25))
    assert history.losses[-1] < history.losses[0]  # it learned: the curve goes down


def test_loss_rejects_empty_and_non_numbers() -> None:
    with pytest.raises(ConfigError, match="no losses"):
        loss_figure(History())
    with pytest.raises(ConfigError, match="losses must be numbers"):
        loss_figure(["0.5"])  # type: ignore[list-item]


def test_saving_into_a_missing_directory_is_a_config_error(sim: Simulation, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot save the figure.*hint"):
        cost_breakdown_figure(sim, path=tmp_path / "missing" / "cost.png")


def test_never_imports_pyplot(tmp_path: Path) -> None:
    """The figures touch no global matplotlib state: pyplot (and its GUI backends) stay unloaded."""
    script = (
        "import sys\n"
        "from funcpipe import History, Plan, simulate\n"
        "from funcpipe.plot import cost_breakdown_figure, loss_figure, timeline_figure\n"
        "from funcpipe.profiler import LayerProfile, ModelProfile\n"
        "layer = LayerProfile('x', 0.01, 0.0, 0.02, 0.0, 1000, 2000, 0.001, 100.0, 100.0)\n"
        "sim = simulate(Plan.manual([1, 1], micro_batch_size=1, global_batch_size=2),\n"
        "               ModelProfile((layer, layer), 10.0, 10.0), 'aws_lambda')\n"
        f"timeline_figure(sim.timeline, path={str(tmp_path / 't.png')!r})\n"
        f"cost_breakdown_figure(sim, path={str(tmp_path / 'c.png')!r})\n"
        f"loss_figure(History(losses=[1.0, 0.5]), path={str(tmp_path / 'l.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    for name in ("t.png", "c.png", "l.png"):
        assert_png(tmp_path / name)


def test_missing_matplotlib_is_a_config_error(sim: Simulation, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(ConfigError, match="need matplotlib; hint: pip install"):
        cost_breakdown_figure(sim)


def test_frontier_labels_tell_apart_plans_of_one_shape() -> None:
    from funcpipe.plot import frontier_labels

    a = Plan.manual([2, 2], replicas=[1, 3], micro_batch_size=4, global_batch_size=16, memory_mb=[1024, 1024])
    b = dataclasses.replace(a, micro_batch_size=2)
    c = dataclasses.replace(a, memory_mb=(1024, 2048))
    d = Plan.manual([4], micro_batch_size=4, global_batch_size=16)
    labels = frontier_labels([a, b, c, d])
    assert labels == ["2s/4w b4 1024+1024MB", "2s/4w b2", "2s/4w b4 1024+2048MB", "1s/1w"]
    assert len(set(labels)) == 4
