"""Reports: plans, simulations and training runs as tables, in a terminal (``str``) and a notebook (HTML).

A :class:`Report` is a few :class:`Table` objects; ``str(report)`` lays them
out in fixed-width text and ``report._repr_html_()`` as HTML tables, which
Jupyter shows when a report is a cell's value. :class:`~funcpipe.Plan`,
:class:`~funcpipe.Simulation` and :class:`~funcpipe.History` render through
the functions here, so the terminal and the notebook show the same numbers.
"""

from __future__ import annotations

import dataclasses
import html
import math
import statistics
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

from funcpipe.errors import ConfigError

if TYPE_CHECKING:
    from funcpipe.billing import MeasuredCost
    from funcpipe.plans import Plan, StageReport
    from funcpipe.profiler import ModelProfile
    from funcpipe.simulator import Simulation, Timeline
    from funcpipe.trainer import History

__all__ = [
    "Report",
    "Table",
    "history_report",
    "iterations_per_epoch",
    "plan_report",
    "side_by_side",
    "simulation_report",
]

#: What a table cell shows for a value nobody measured or predicted.
MISSING = "–"
#: Classes that keep Jupyter's MathJax from reading two dollar amounts as a formula.
_NO_MATH = "tex2jax_ignore mathjax_ignore"


@dataclasses.dataclass(frozen=True)
class Table:
    """A titled table of strings.

    Attributes:
        title: one line above the table.
        header: the column names.
        rows: the cells, one tuple per row, as long as ``header``.
        groups: an optional row above the header: ``(label, columns spanned)``
            pairs covering every column (``""`` for none).
        notes: lines below the table.
        left: the indices of the columns to left-align (text); the others hold numbers, right-aligned.
    """

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    groups: tuple[tuple[str, int], ...] = ()
    notes: tuple[str, ...] = ()
    left: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        width = len(self.header)
        for row in self.rows:
            if len(row) != width:
                raise ConfigError(f"table {self.title!r}: a row of {len(row)} cells under {width} columns: {row}")
        if self.groups and sum(span for _, span in self.groups) != width:
            raise ConfigError(f"table {self.title!r}: groups {list(self.groups)} do not span {width} columns")

    def __str__(self) -> str:
        columns = list(zip(self.header, *self.rows, strict=True)) if self.header else []
        widths = [max(len(cell) for cell in column) for column in columns]
        if self.groups:  # widen the last column of a group whose label is wider than its columns
            start = 0
            for label, span in self.groups:
                spanned = sum(widths[start:start + span]) + 2 * (span - 1)
                if len(label) > spanned:
                    widths[start + span - 1] += len(label) - spanned
                start += span

        def line(cells: Sequence[str]) -> str:
            pairs = enumerate(zip(cells, widths, strict=True))
            padded = (c.ljust(w) if i in self.left else c.rjust(w) for i, (c, w) in pairs)
            return ("  " + "  ".join(padded)).rstrip()

        out = [self.title]
        if not self.header:  # a title (and notes) alone
            return "\n".join([*out, *(f"  {note}" for note in self.notes)])
        if self.groups:
            parts, start = [], 0
            for label, span in self.groups:
                spanned = sum(widths[start:start + span]) + 2 * (span - 1)
                parts.append(label.center(spanned))
                start += span
            out.append(("  " + "  ".join(parts)).rstrip())
        out.append(line(self.header))
        out.extend(line(row) for row in self.rows)
        out.extend(f"  {note}" for note in self.notes)
        return "\n".join(out)

    def _repr_html_(self) -> str:
        e = html.escape
        cell = "padding:2px 8px;text-align:{align};white-space:nowrap"
        parts = [
            f'<div class="funcpipe-table {_NO_MATH}" style="margin-bottom:0.8em">',
            f'<div style="font-weight:bold;margin-bottom:0.3em">{e(self.title)}</div>',
        ]
        if self.header:
            parts.append(self._html_table(cell))
        parts.extend(f'<div style="margin-top:0.2em">{e(note)}</div>' for note in self.notes)
        parts.append("</div>")
        return "".join(parts)

    def _html_table(self, cell: str) -> str:
        e = html.escape
        parts = ['<table style="border-collapse:collapse"><thead>']
        if self.groups:
            parts.append("<tr>" + "".join(
                f'<th colspan="{span}" style="{cell.format(align="center")}">{e(label)}</th>'
                for label, span in self.groups
            ) + "</tr>")
        parts.append("<tr>" + "".join(
            f'<th style="{cell.format(align=self._align(i))}">{e(name)}</th>' for i, name in enumerate(self.header)
        ) + "</tr></thead><tbody>")
        for row in self.rows:
            parts.append("<tr>" + "".join(
                f'<td style="{cell.format(align=self._align(i))}">{e(value)}</td>' for i, value in enumerate(row)
            ) + "</tr>")
        parts.append("</tbody></table>")
        return "".join(parts)

    def _align(self, column: int) -> str:
        return "left" if column in self.left else "right"


@dataclasses.dataclass(frozen=True)
class Report:
    """Tables shown one under the other: ``str`` for a terminal, ``_repr_html_`` for a notebook."""

    tables: tuple[Table, ...]

    def __str__(self) -> str:
        return "\n\n".join(str(table) for table in self.tables)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's plain-text display (a terminal, or a notebook without HTML): the table."""
        printer.text(str(self))

    def _repr_html_(self) -> str:
        tables = "".join(table._repr_html_() for table in self.tables)
        return f'<div class="funcpipe-report {_NO_MATH}">{tables}</div>'


@dataclasses.dataclass(frozen=True)
class _SideBySide:
    items: tuple[Any, ...]

    def __str__(self) -> str:
        return "\n\n".join(str(item) for item in self.items)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's plain-text display (a terminal, or a notebook without HTML): the table."""
        printer.text(str(self))

    def _repr_html_(self) -> str:
        cells = "".join(
            f'<div style="flex:0 0 auto">{_html_of(item)}</div>' for item in self.items
        )
        style = "display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start"
        return f'<div class="funcpipe-side-by-side {_NO_MATH}" style="{style}">{cells}</div>'


def side_by_side(*items: Any) -> _SideBySide:
    """Show plans, simulations, histories (anything with ``_repr_html_``) next to each other in a notebook.

    In a terminal (``str``) they are printed one under the other.

    Raises:
        ConfigError: nothing to show.
    """
    if not items:
        raise ConfigError("side_by_side needs at least one item; hint: side_by_side(plan_a, plan_b)")
    return _SideBySide(items)


def _html_of(item: Any) -> str:
    render = getattr(item, "_repr_html_", None)
    if callable(render):
        return str(render())
    return f"<pre>{html.escape(str(item))}</pre>"


# -- formatting -------------------------------------------------------------------


def _s(seconds: float | None) -> str:
    return MISSING if seconds is None else f"{seconds:.3f}"


def _usd(dollars: float | None, digits: int = 6) -> str:
    return MISSING if dollars is None else f"${dollars:.{digits}f}"


def _layers(plan: Plan, stage: int, names: Sequence[str] | None) -> str:
    layers = plan.layer_range(stage)
    span = f"{layers.start}-{layers.stop - 1}" if len(layers) > 1 else str(layers.start)
    if names is None:
        return span
    label = names[layers.start] + (f" … {names[layers.stop - 1]}" if len(layers) > 1 else "")
    return f"{span} ({label})"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{seconds:,.0f} s ({hours:d}:{minutes:02d}:{secs:02d})"


def _runs(plan: Plan) -> tuple[str, tuple[str, ...] | None]:
    """How the plan runs, for a title: micro-batches, schedule and sync; and each stage's sync
    for a column when the stages' differ (``–`` for a stage of one replica, which has none)."""
    names = [plan.stage_sync(s) for s in range(plan.num_stages)]
    runs = f"{plan.num_micro_batches} micro-batches of {plan.micro_batch_size}"
    if len(set(names)) == 1:
        return f"{runs} (global batch {plan.global_batch_size}), schedule={plan.schedule}, sync={names[0]}", None
    column = tuple(name if plan.replicas[s] > 1 else MISSING for s, name in enumerate(names))
    return f"{runs} (global batch {plan.global_batch_size}), schedule={plan.schedule}, sync per stage", column


def iterations_per_epoch(plan: Plan, samples: int) -> int:
    """Iterations of one pass over ``samples`` samples (a last, partial batch counts as one)."""
    return math.ceil(samples / plan.global_batch_size)


# -- plans and simulations ------------------------------------------------------------


def profile_report(profile: ModelProfile, micro_batch_size: int | None = None) -> Report:
    """A profile as one table: per layer its index, name, type, forward / backward ms at one micro-batch
    size (default the largest measured), parameters, and the bytes per sample it sends on and holds."""
    b = micro_batch_size if micro_batch_size is not None else max(profile.micro_batch_sizes)
    machine = profile.machine
    where = f" on {machine['cpu']}, torch {machine.get('torch', '?')}" if "cpu" in machine else ""
    layers = profile.layers
    rows = [(str(i), layer.name, layer.kind or "?", f"{layer.forward_s(b) * 1e3:.3f}",
             f"{layer.backward_s(b) * 1e3:.3f}", f"{layer.param_bytes / 2**20:.3f}",
             _kib(layer.output_bytes_per_sample), _kib(layer.held_bytes_per_sample)) for i, layer in enumerate(layers)]
    rows.append(("", "total", "", f"{sum(lp.forward_s(b) for lp in layers) * 1e3:.3f}",
                 f"{sum(lp.backward_s(b) for lp in layers) * 1e3:.3f}", f"{profile.param_bytes / 2**20:.3f}", "", ""))
    return Report((Table(
        title=(f"Profile of {profile.num_layers} layers{where}, one thread; ms at micro-batch {b} (measured at "
               f"{', '.join(map(str, profile.micro_batch_sizes))})"),
        header=("#", "name", "type", "fwd ms", "bwd ms", "params MB", "out KB/sample", "held KB/sample"),
        rows=tuple(rows),
        notes=(f"input {profile.input_bytes_per_sample / 2**10:.2f} KB/sample, target "
               f"{profile.target_bytes_per_sample / 2**10:.2f} KB/sample; MB = 2**20 bytes, KB = 2**10",),
        left=(1, 2),
    ),))


def _kib(nbytes: float) -> str:
    return f"{nbytes / 2**10:.2f}"


def plan_report(plan: Plan, *, layer_names: Sequence[str] | None = None) -> Report:
    """Per stage: layers, memory, replicas and, when the plan carries predictions, predicted
    compute, transfer and idle seconds and dollars per iteration (and per epoch when the plan
    knows its data set's size, ``Plan.samples``).

    Args:
        plan: any plan; those from :func:`funcpipe.plan`, :func:`funcpipe.pareto` or
            ``funcpipe.simulate(...).plan`` carry predictions.
        layer_names: the profile's layer names, shown beside each stage's layer range.
    """
    if layer_names is not None and len(layer_names) != sum(plan.balance):
        raise ConfigError(
            f"layer_names has {len(layer_names)} names but the plan cuts {sum(plan.balance)} layers; "
            "hint: pass [layer.name for layer in profile.layers] of the profile the plan was made for"
        )
    where = f" for {plan.platform}" if plan.platform else ""
    runs, syncs = _runs(plan)
    title = f"Plan{where}: {plan.num_stages} stage(s), {plan.num_workers} worker(s), {runs}"
    stages = plan.predicted_stages
    epoch = iterations_per_epoch(plan, plan.samples) if plan.samples is not None else None
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    # Each stage's all-reduce, when the stages' differ (the title names it otherwise).
    reduce: tuple[str, ...] = ("all-reduce",) if syncs else ()
    if stages is None:
        header: tuple[str, ...] = ("stage", "layers", "replicas", *reduce, "memory MB")
        for stage in range(plan.num_stages):
            memory = str(plan.memory_mb[stage]) if plan.memory_mb else "default"
            rows.append((str(stage), _layers(plan, stage, layer_names), str(plan.replicas[stage]),
                         *((syncs[stage],) if syncs else ()), memory))
        groups: tuple[tuple[str, int], ...] = ()
    else:
        header = ("stage", "layers", "replicas", *reduce, "memory MB", "needed MB", "compute", "sync", "transfer",
                  "idle", "$/iter")
        groups = (("", 5 + len(reduce)), ("predicted seconds per iteration", 4), ("", 1))
        if epoch is not None:
            header += ("$/epoch",)
            groups = (*groups[:-1], ("", 2))
        for st in stages:
            row = (
                str(st.stage), _layers(plan, st.stage, layer_names), str(st.replicas),
                *((syncs[st.stage],) if syncs else ()), str(st.memory_mb),
                f"{st.memory_needed_mb:.0f}", _s(st.compute_s), _s(st.sync_s), _s(st.upload_s + st.download_s),
                _s(st.idle_s), _usd(st.cost_usd),
            )
            rows.append(row + ((_usd(st.cost_usd * epoch, 4),) if epoch is not None else ()))
        notes.append("seconds of each stage's busiest replica; transfer: its link time up and down, "
                     "overlapped with compute")
        notes.append("$ per stage: its functions' time; the total adds invocations and storage requests")
    if syncs:
        notes.append("all-reduce: of each stage's gradients among its replicas (– for one replica)")
    if plan.predicted_iteration_s is not None and plan.predicted_cost_usd is not None:
        notes.append(f"predicted per iteration: {plan.predicted_iteration_s:.3f} s, ${plan.predicted_cost_usd:.6f}")
        if plan.samples is not None and epoch is not None:
            notes.append(
                f"predicted per epoch of {plan.samples:,} samples ({epoch:,} iterations): "
                f"{_duration(epoch * plan.predicted_iteration_s)}, ${epoch * plan.predicted_cost_usd:.4f}"
            )
    elif stages is None:
        notes.append("no predictions; hint: funcpipe.simulate(plan, profile, platform).plan carries them")
    if plan.solver_status is not None:
        gap = plan.solver_gap if plan.solver_gap is not None else 0.0
        notes.append(f"solver: {plan.solver_status}, gap {gap:.2%}, {plan.solve_s or 0:.2f} s")
    return Report((Table(title, header, tuple(rows), groups, tuple(notes), left=(1, *range(3, 3 + len(reduce)))),))


def simulation_report(sim: Simulation) -> Report:
    """Seconds and dollars of one simulated iteration, per stage, and how the plan runs."""
    runs, syncs = _runs(sim.plan)
    title = (
        f"Simulation on {sim.platform}: {sim.iteration_s:.3f} s and ${sim.cost_usd:.6f} per iteration "
        f"(formula {sim.formula_s:.3f} s); {runs}"
    )
    reduce: tuple[str, ...] = ("all-reduce",) if syncs else ()
    header = ("stage", "layers", "replicas", *reduce, "MB", "compute", "sync", "upload", "download", "idle",
              "$/iter")
    rows = tuple(
        (str(st.stage), _layers(sim.plan, st.stage, None), str(st.replicas), *((syncs[st.stage],) if syncs else ()),
         str(st.memory_mb), _s(st.compute_s), _s(st.sync_s), _s(st.upload_s), _s(st.download_s), _s(st.idle_s),
         _usd(st.cost_usd))
        for st in sim.stages
    )
    groups = (("", 4 + len(reduce)), ("seconds per iteration, busiest replica", 5), ("", 1))
    notes = ["upload and download are link time (transfers plus request latency), overlapped with compute"]
    if syncs:
        notes.append("all-reduce: of each stage's gradients among its replicas (– for one replica)")
    return Report((Table(title, header, rows, groups, tuple(notes), left=(1, *range(3, 3 + len(reduce)))),))


def _instance(obj: object, module: str, name: str) -> bool:
    """``isinstance(obj, module.name)`` without importing ``module``: if ``obj`` is one, its module is loaded.

    The presentation modules (this one, :mod:`funcpipe.plot`) check the objects they are given
    this way, so the modules whose objects they render can import them without a circle.
    """
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(obj, getattr(loaded, name))


def is_plan(obj: object) -> TypeGuard[Plan]:
    return _instance(obj, "funcpipe.plans", "Plan")


def is_simulation(obj: object) -> TypeGuard[Simulation]:
    return _instance(obj, "funcpipe.simulator", "Simulation")


def is_timeline(obj: object) -> TypeGuard[Timeline]:
    return _instance(obj, "funcpipe.simulator", "Timeline")


def is_history(obj: object) -> TypeGuard[History]:
    return _instance(obj, "funcpipe.trainer", "History")


# -- training runs ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Prediction:
    platform: str | None
    iteration_s: float
    cost_usd: float
    stages: tuple[StageReport, ...] | None
    workers: int = 1
    requests: dict[str, float] | None = None  # per iteration by kind (a simulation's)


def _prediction(predicted: Plan | Simulation | None) -> _Prediction | None:
    if predicted is None:
        return None
    if is_simulation(predicted):
        return _Prediction(predicted.platform, predicted.iteration_s, predicted.cost_usd, predicted.stages,
                           predicted.plan.num_workers, dict(predicted.requests))
    if is_plan(predicted):
        if predicted.predicted_iteration_s is None or predicted.predicted_cost_usd is None:
            return None
        return _Prediction(predicted.platform, predicted.predicted_iteration_s, predicted.predicted_cost_usd,
                           predicted.predicted_stages, predicted.num_workers)
    raise ConfigError(
        f"predicted must be a funcpipe Simulation or Plan, got {type(predicted).__name__}; "
        "hint: history.compare(funcpipe.simulate(plan, profile, 'local'))"
    )


def measured_iteration_s(history: History) -> float | None:
    """The median seconds per iteration, without the first (which also pays for launching the workers)."""
    seconds = history.seconds[1:] or history.seconds
    return statistics.median(seconds) if seconds else None


def history_report(history: History, predicted: Plan | Simulation | None = None) -> Report:
    """What a training run measured, next to what was predicted for it.

    Args:
        history: what :meth:`Trainer.fit` returned.
        predicted: a :func:`funcpipe.simulate` result or a plan carrying
            predictions; default: the plan the run trained with, if it carries them.
    """
    if predicted is None:
        predicted = history.plan
    pred = _prediction(predicted)
    if not history.losses:
        return Report((Table("Training: no iterations", (), ()),))
    measured_s = measured_iteration_s(history)
    where = f" ({pred.platform})" if pred is not None and pred.platform else ""
    title = (
        f"Training: {len(history)} iterations in {sum(history.seconds):.1f} s, "
        f"loss {history.losses[0]:.4f} -> {history.losses[-1]:.4f}"
    )
    rows: list[tuple[str, ...]] = [("seconds per iteration", _s(measured_s), _s(pred.iteration_s if pred else None))]
    notes = ["measured seconds: the median iteration, without the first (it also launches the workers)"]
    priced = pred is not None and pred.platform != "local"  # the local platform's prices are nominal
    if pred is not None and not priced:
        notes.append("no dollars: a local run costs nothing (the local platform's prices only rank plans)")
    cost = _measured(history, pred) if pred is not None and priced else None
    if pred is not None and cost is not None:
        rows.append((f"dollars per iteration{where}", _usd(cost.per_iteration()["total"]), _usd(pred.cost_usd)))
        notes.append(f"measured dollars: every call's seconds as {cost.platform} bills them, every storage request "
                     "and invocation (see the cost table)")
    per_epoch = history.iterations_per_epoch
    if per_epoch is not None and measured_s is not None:
        rows.append((f"seconds per epoch ({per_epoch} iterations)", _s(per_epoch * measured_s),
                     _s(per_epoch * pred.iteration_s) if pred else MISSING))
        if pred is not None and cost is not None:
            rows.append((f"dollars per epoch{where}", _usd(per_epoch * cost.per_iteration()["total"], 4),
                         _usd(per_epoch * pred.cost_usd, 4)))
    summary = Table(title, ("", "measured", f"predicted{where}"), tuple(rows), notes=tuple(notes), left=(0,))
    tables = [summary]
    if pred is not None and cost is not None:
        tables.append(_cost_table(cost, pred))
    stage_rows = history.stage_summary()
    if stage_rows:
        by_stage = {st.stage: st for st in pred.stages} if pred is not None and pred.stages else {}
        header = ("stage", "replicas", "measured", "predicted", "measured", "predicted", "measured", "predicted",
                  "measured", "predicted")
        groups = (("", 2), ("compute", 2), ("sync", 2), ("waiting (idle)", 2), ("iteration", 2))
        rows = []
        for row in stage_rows:
            stage = int(row["stage"])
            p = by_stage.get(stage)
            rows.append((
                str(stage), str(int(row["replicas"])),
                _s(row["compute_s"] + row["update_s"]), _s(p.compute_s if p else None),
                _s(row["sync_s"]), _s(p.sync_s if p else None),
                _s(row["wait_s"]), _s(p.idle_s if p else None),
                _s(row["total_s"]), _s(pred.iteration_s if pred else None),
            ))
        tables.append(Table(
            "Per stage, seconds per iteration of one replica (mean over replicas)", header, tuple(rows), groups,
            ("waiting: the compute thread blocked on downloads; predicted idle: the iteration less "
             "compute and sync",),
        ))
    return Report(tuple(tables))


def _measured(history: History, pred: _Prediction) -> MeasuredCost | None:
    """The history's measured cost at the prediction's platform; ``None`` if that is not a known one."""
    if pred.platform is None:
        return None
    try:
        return history.measured_cost(pred.platform)
    except ConfigError:  # a platform of the user's own, known by name only: history.measured_cost(spec)
        return None


def _cost_table(cost: MeasuredCost, pred: _Prediction) -> Table:
    """Dollars by component, measured (per iteration and the whole) and predicted, and why they differ."""
    stage_costs = [st.cost_usd for st in pred.stages] if pred.stages else [pred.cost_usd]
    p, lines = cost.compare(pred.iteration_s, pred.cost_usd, stage_costs, pred.workers, pred.requests)
    per = cost.per_iteration()
    rows = (
        ("compute (GB-s)", _usd(per["compute"]), _usd(p.compute), _usd(cost.compute_usd)),
        ("storage requests", _usd(per["requests"]), _usd(p.requests), _usd(cost.requests_usd)),
        ("invocations", _usd(per["invocations"]), _usd(p.invocations), _usd(cost.invocations_usd)),
        ("total", _usd(per["total"]), _usd(p.total), _usd(cost.total_usd)),
    )
    billed = "billed" if cost.billed else f"not billed (Ray or threads), priced as on {cost.platform}"
    title = (f"Cost on {cost.platform}: {cost.invocations} invocation(s) in {cost.runs} run(s), "
             f"{cost.billed_s:.3f} function-s ({cost.gb_s:.3f} GB-s) {billed}, "
             f"{sum(cost.requests[k] for k in ('PUT', 'GET', 'HEAD', 'LIST', 'DELETE')):,} requests")
    return Table(title, ("", "measured $/iter", "predicted $/iter", "measured, whole fit"), rows,
                 notes=tuple(lines), left=(0,))
