"""Figures of plans, simulations and training runs, drawn with matplotlib's object API (no pyplot)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from funcpipe.errors import ConfigError
from funcpipe.report import is_history, is_plan, is_simulation, is_timeline

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from funcpipe.plans import Plan
    from funcpipe.simulator import Simulation, Timeline
    from funcpipe.trainer import History

__all__ = ["cost_breakdown_figure", "frontier_figure", "loss_figure", "timeline_figure"]

#: Colours of the Gantt chart's bars, by what a span is (tab10's, colour-blind friendlier than the defaults).
KIND_COLOURS = {
    "forward": "#1f77b4",
    "backward": "#ff7f0e",
    "sync": "#d62728",
    "update": "#2ca02c",
    "upload": "#9467bd",
    "download": "#17becf",
}
_LANES = ("compute", "upload", "download")
_PathLike = str | os.PathLike[str]


def timeline_figure(timeline: Timeline, *, title: str | None = None, path: _PathLike | None = None) -> Figure:
    """A Gantt chart of one simulated iteration: one row per worker thread.

    Every worker ``(stage, replica)`` gets three rows, ``sSrR compute``,
    ``sSrR upload`` and ``sSrR download``, top to bottom by stage then replica.
    Compute bars are coloured by kind (forward, backward, sync, update; the
    all-reduce's ``sync`` is also hatched), upload and download bars one colour
    each. A dashed line marks the end of the iteration.

    Args:
        timeline: ``simulation.timeline`` of :func:`funcpipe.simulate`.
        title: the figure's title (default "Pipeline timeline (one iteration)").
        path: also save the figure there as PNG.

    Raises:
        ConfigError: ``timeline`` is not a timeline, or it holds no spans.
    """
    if not is_timeline(timeline):
        raise ConfigError(
            f"timeline must be a funcpipe Timeline, got {type(timeline).__name__}; "
            "hint: pass simulate(plan, profile, platform).timeline"
        )
    if not timeline.spans:
        raise ConfigError(
            "the timeline holds no spans, nothing to draw; hint: plot the timeline of a simulate(...) result"
        )
    workers = timeline.workers()
    rows = [(stage, replica, lane) for stage, replica in workers for lane in _LANES]
    end = max(timeline.iteration_s, max(span.end for span in timeline.spans))
    figure = _new_figure(11.0, max(2.5, 0.32 * len(rows) + 1.4))
    from matplotlib.patches import Patch

    ax = figure.add_subplot()
    kinds_seen: set[str] = set()
    for row, (stage, replica, lane) in enumerate(rows):
        by_kind: dict[str, list[tuple[float, float]]] = {}
        for span in timeline.lane(stage, replica, lane):
            kind = _kind(lane, span.label)
            by_kind.setdefault(kind, []).append((span.start, span.seconds))
            if lane == "compute" and span.seconds >= 0.025 * end and kind in ("forward", "backward"):
                ax.text(span.start + span.seconds / 2, row, span.label, ha="center", va="center", fontsize=7,
                        color="white", clip_on=True)
        for kind, bars in by_kind.items():
            kinds_seen.add(kind)
            ax.broken_barh(bars, (row - 0.4, 0.8), facecolors=KIND_COLOURS[kind], edgecolors="white",
                           linewidth=0.5, hatch="////" if kind == "sync" else None)
    for boundary in range(3, len(rows), 3):  # between workers
        ax.axhline(boundary - 0.5, color="0.8", linewidth=0.8)
    ax.axvline(timeline.iteration_s, color="0.3", linestyle="--", linewidth=1.0)
    ax.set_yticks(range(len(rows)), [f"s{stage}r{replica} {lane}" for stage, replica, lane in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first worker on top
    ax.set_xlim(0.0, end * 1.02 if end > 0 else 1.0)
    ax.set_xlabel("seconds")
    ax.set_title(title if title is not None else "Pipeline timeline (one iteration)")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    handles = [
        Patch(facecolor=KIND_COLOURS[kind], hatch="////" if kind == "sync" else None, label=kind)
        for kind in KIND_COLOURS if kind in kinds_seen
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)
    return _finish(figure, path)


def frontier_figure(
    plans: Sequence[Plan],
    *,
    chosen: Plan | None = None,
    title: str | None = None,
    path: _PathLike | None = None,
) -> Figure:
    """The cost–time frontier of plans: seconds against dollars per iteration.

    Points are joined in order of predicted time; each is annotated with its
    stage and worker count (``2s/3w``). ``chosen`` (for example the plan
    :func:`funcpipe.plan` returned) is drawn as a red star and annotated.

    Args:
        plans: plans carrying predictions, such as :func:`funcpipe.pareto` returns.
        chosen: a plan to mark; it need not be one of ``plans``.
        title: the figure's title (default "Cost–time frontier").
        path: also save the figure there as PNG.

    Raises:
        ConfigError: no plans, or a plan without predicted seconds and dollars.
    """
    if is_plan(plans) or not isinstance(plans, Sequence):
        raise ConfigError(
            f"plans must be a list of Plans, got {type(plans).__name__}; hint: frontier_figure(funcpipe.pareto(...))"
        )
    if not plans:
        raise ConfigError("no plans to draw; hint: pass the list funcpipe.pareto(...) returns")
    points = sorted((_predicted(p, f"plans[{i}]") for i, p in enumerate(plans)), key=lambda point: point[0])
    figure = _new_figure(7.5, 5.0)
    ax = figure.add_subplot()
    xs = [seconds for seconds, _, _ in points]
    ys = [dollars for _, dollars, _ in points]
    ax.plot(xs, ys, marker="o", color=KIND_COLOURS["forward"], label="frontier")
    for (seconds, dollars, _), label in zip(points, frontier_labels([plan for _, _, plan in points]), strict=True):
        ax.annotate(label, (seconds, dollars), xytext=(5, 5), textcoords="offset points", fontsize=8)
    if chosen is not None:
        seconds, dollars, plan = _predicted(chosen, "chosen")
        ax.plot([seconds], [dollars], marker="*", markersize=16, linestyle="none", color=KIND_COLOURS["sync"],
                markeredgecolor="black", label="chosen", zorder=3)
        ax.annotate(f"chosen: {_shape(plan)}\n{seconds:.3g} s, {_dollars(dollars)}", (seconds, dollars),
                    xytext=(14, -34), textcoords="offset points", fontsize=8, color=KIND_COLOURS["sync"],
                    bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": KIND_COLOURS["sync"]},
                    arrowprops={"arrowstyle": "-", "color": KIND_COLOURS["sync"]}, zorder=4)
    ax.set_xlabel("seconds per iteration")
    ax.set_ylabel("dollars per iteration")
    ax.set_title(title if title is not None else "Cost–time frontier")
    ax.grid(color="0.9")
    ax.legend(loc="upper right", fontsize=8)
    ax.margins(0.12)
    return _finish(figure, path)


def cost_breakdown_figure(simulation: Simulation, *, title: str | None = None, path: _PathLike | None = None) -> Figure:
    """One bar per stage: what its functions cost per iteration, labelled with replicas × memory.

    The bars are :attr:`StageReport.cost_usd` (function time only); the
    default title gives the iteration's total, which also counts invocations
    and storage requests.

    Args:
        simulation: a :func:`funcpipe.simulate` result.
        title: the figure's title.
        path: also save the figure there as PNG.

    Raises:
        ConfigError: ``simulation`` is not a simulation, or it has no stages.
    """
    if not is_simulation(simulation):
        raise ConfigError(
            f"simulation must be a funcpipe Simulation, got {type(simulation).__name__}; "
            "hint: pass simulate(plan, profile, platform)"
        )
    if not simulation.stages:
        raise ConfigError("the simulation has no stages, nothing to draw; hint: pass a simulate(...) result")
    stages = simulation.stages
    figure = _new_figure(max(5.0, 1.0 + 0.9 * len(stages)), 4.0)
    ax = figure.add_subplot()
    positions = [st.stage for st in stages]
    bars = ax.bar(positions, [st.cost_usd for st in stages], color=KIND_COLOURS["forward"], width=0.6)
    ax.bar_label(bars, labels=[f"{st.replicas}×{st.memory_mb} MB" for st in stages], fontsize=8, padding=2)
    ax.set_xticks(positions, [str(p) for p in positions])
    ax.set_xlabel("stage")
    ax.set_ylabel("dollars per iteration")
    ax.set_title(
        title if title is not None
        else f"Function cost per stage on {simulation.platform}\n"
        f"(iteration total {_dollars(simulation.cost_usd)} with requests)"
    )
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    ax.margins(y=0.15)
    return _finish(figure, path)


def loss_figure(
    history: History | Sequence[float], *, title: str | None = None, path: _PathLike | None = None
) -> Figure:
    """The training loss per iteration of a :class:`~funcpipe.History` (or of a list of losses).

    With 20 iterations or more, a moving average (over a twentieth of the run)
    is drawn over the raw curve.

    Args:
        history: what :meth:`Trainer.fit` returned, or its ``losses``.
        title: the figure's title (default "Training loss").
        path: also save the figure there as PNG.

    Raises:
        ConfigError: no losses, or a value that is not a number.
    """
    raw: Any = history.losses if is_history(history) else history
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
        raise ConfigError(
            f"history must be a funcpipe History or a list of losses, got {type(history).__name__}; "
            "hint: pass what Trainer.fit(...) returned"
        )
    if not raw:
        raise ConfigError("the history holds no losses, nothing to draw; hint: plot it after Trainer.fit(...)")
    bad = next((v for v in raw if isinstance(v, bool) or not isinstance(v, int | float)), None)
    if bad is not None:
        raise ConfigError(f"losses must be numbers, got {bad!r}; hint: pass History.losses (floats)")
    losses = [float(v) for v in raw]
    iterations = list(range(1, len(losses) + 1))
    figure = _new_figure(7.5, 4.0)
    ax = figure.add_subplot()
    smooth = len(losses) >= 20
    ax.plot(iterations, losses, color=KIND_COLOURS["forward"], alpha=0.35 if smooth else 1.0,
            marker="o" if len(losses) <= 30 else None, markersize=3, label="loss")
    if smooth:
        window = max(2, len(losses) // 20)
        averaged = _moving_average(losses, window)
        ax.plot(iterations[window - 1:], averaged, color=KIND_COLOURS["forward"], label=f"mean of {window}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title if title is not None else "Training loss")
    ax.grid(color="0.9")
    return _finish(figure, path)


# -- helpers --------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    """A figure of that many inches, unattached to pyplot (no window, no global state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError("funcpipe's figures need matplotlib; hint: pip install 'matplotlib>=3.6'") from exc
    return Figure(figsize=(width, height), layout="constrained")


def _kind(lane: str, label: str) -> str:
    if lane != "compute":
        return lane
    if label == "sync":
        return "sync"
    if label == "update":
        return "update"
    return "backward" if label.startswith("B") else "forward"


def _predicted(plan: object, what: str) -> tuple[float, float, Plan]:
    if not is_plan(plan):
        raise ConfigError(f"{what} must be a funcpipe Plan, got {type(plan).__name__}")
    seconds, dollars = plan.predicted_iteration_s, plan.predicted_cost_usd
    if seconds is None or dollars is None or not (math.isfinite(seconds) and math.isfinite(dollars)):
        raise ConfigError(
            f"{what} carries no predicted seconds and dollars per iteration; hint: draw plans from "
            "funcpipe.pareto(...) or funcpipe.plan(...), or set them from simulate(...) with "
            "dataclasses.replace(plan, predicted_iteration_s=..., predicted_cost_usd=...)"
        )
    return seconds, dollars, plan


def _shape(plan: Plan) -> str:
    return f"{plan.num_stages}s/{plan.num_workers}w"


def frontier_labels(plans: Sequence[Plan]) -> list[str]:
    """Each plan's label on a frontier: stages and workers (``2s/3w``), then, where two plans would
    share one, the micro-batch size (``b4``), then the functions' memory (``1024+2048MB``)."""
    def memory(plan: Plan) -> str:
        return "+".join(str(mb) for mb in plan.memory_mb) + "MB" if plan.memory_mb else "auto MB"

    labels = [_shape(plan) for plan in plans]
    for extra in (lambda plan: f"b{plan.micro_batch_size}", memory, lambda plan: plan.schedule):
        seen: dict[str, int] = {}
        for label in labels:
            seen[label] = seen.get(label, 0) + 1
        labels = [f"{label} {extra(plan)}" if seen[label] > 1 else label for label, plan in zip(labels, plans,
                                                                                                strict=True)]
    return labels


def _dollars(value: float) -> str:
    return f"\\${value:.3g}"  # escaped: two bare $ in one text start mathtext


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out = []
    total = sum(values[:window])
    out.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        out.append(total / window)
    return out


def _finish(figure: Figure, path: _PathLike | None) -> Figure:
    if path is not None:
        try:
            figure.savefig(path, dpi=120, bbox_inches="tight")
        except OSError as exc:
            raise ConfigError(
                f"cannot save the figure to {os.fspath(path)!r}: {exc.strerror or exc}; "
                "hint: check that the directory exists"
            ) from exc
    return figure
