"""Plan: how a model is cut into stages and how each stage is run."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from funcpipe.errors import ConfigError
from funcpipe.protocol import SYNC_ALGORITHMS, owned, replica_of
from funcpipe.schedule import SCHEDULES, in_flight

__all__ = ["Plan", "StageReport"]


@dataclasses.dataclass(frozen=True)
class StageReport:
    """Per stage: time of its busiest replica and what one replica costs (what the simulator predicts).

    Attributes:
        stage: stage index.
        replicas: data-parallel degree.
        memory_mb: the tier each replica runs on.
        memory_needed_mb: what a replica needs by the cost model.
        compute_s: forward, backward and update seconds of the busiest replica.
        sync_s: seconds its compute thread spent in the all-reduce.
        upload_s, download_s: seconds its links were busy (transfer plus latency).
        idle_s: iteration seconds its compute thread did nothing.
        cost_usd: what the stage's functions cost per iteration (compute only).
    """

    stage: int
    replicas: int
    memory_mb: int
    memory_needed_mb: float
    compute_s: float
    sync_s: float
    upload_s: float
    download_s: float
    idle_s: float
    cost_usd: float


@dataclasses.dataclass(frozen=True)
class Plan:
    """A partition of an ``nn.Sequential`` into pipeline stages, and how to run them.

    Attributes:
        balance: layers per stage, as in torchgpipe: ``(2, 3, 2)`` means
            layers 0–1, 2–4 and 5–6.
        replicas: data-parallel degree of each stage.
        micro_batch_size: samples per micro-batch.
        global_batch_size: samples per iteration (one optimizer step).
        memory_mb: function memory per stage, or ``None`` for the backend default.
        sync: gradient all-reduce among a stage's replicas: ``"pipelined"``
            (funcpipe's pipelined scatter-reduce) or ``"four_phase"`` (the
            LambdaML baseline), for every stage; or one of them per stage
            (:meth:`stage_sync`).
        schedule: the micro-batch schedule (:mod:`funcpipe.schedule`):
            ``"gpipe"`` (every forward, then every backward; the whole
            iteration prefetched) or ``"1f1b"`` (one forward one backward,
            at most :meth:`in_flight` micro-batches alive per replica).
        platform: the platform the plan was made for (set by :func:`funcpipe.plan`).
        predicted_iteration_s: seconds per iteration the simulator predicts.
        predicted_cost_usd: dollars per iteration the simulator predicts.
        solver_status: ``"optimal"`` or ``"feasible"`` (CP-SAT's status).
        solver_gap: relative gap between the solution and CP-SAT's bound (0 when optimal).
        solve_s: seconds the planner took.
        predicted_stages: the simulator's prediction per stage (set by
            :func:`funcpipe.plan`, :func:`funcpipe.pareto` and on
            ``funcpipe.simulate(...).plan``).
        samples: the data set's size, for predictions per epoch (set by
            ``funcpipe.plan(..., samples=N)`` or ``dataclasses.replace``).

    Only the first seven fields say what runs; two plans that differ only in
    the prediction fields are equal. ``str(plan)`` is a table of the stages
    with their predictions; in a notebook the plan shows as an HTML table.
    """

    balance: tuple[int, ...]
    replicas: tuple[int, ...]
    micro_batch_size: int
    global_batch_size: int
    memory_mb: tuple[int, ...] | None = None
    sync: str | tuple[str, ...] = "pipelined"
    schedule: str = "gpipe"
    platform: str | None = dataclasses.field(default=None, compare=False)
    predicted_iteration_s: float | None = dataclasses.field(default=None, compare=False)
    predicted_cost_usd: float | None = dataclasses.field(default=None, compare=False)
    solver_status: str | None = dataclasses.field(default=None, compare=False)
    solver_gap: float | None = dataclasses.field(default=None, compare=False)
    solve_s: float | None = dataclasses.field(default=None, compare=False)
    predicted_stages: tuple[StageReport, ...] | None = dataclasses.field(default=None, compare=False, repr=False)
    samples: int | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_counts("balance", self.balance, "layers per stage")
        _check_counts("replicas", self.replicas, "workers per stage")
        stages = len(self.balance)
        if len(self.replicas) != stages:
            raise ConfigError(
                f"replicas must give one count per stage (stages: {stages}, "
                f"replicas: {list(self.replicas)}); hint: replicas=[1] * {stages}"
            )
        for name in ("micro_batch_size", "global_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"global_batch_size {self.global_batch_size} is not divisible into "
                f"micro-batches of {self.micro_batch_size}; hint: pick a micro_batch_size "
                f"that divides {self.global_batch_size}"
            )
        for stage, count in enumerate(self.replicas):
            if count > self.num_micro_batches:
                raise ConfigError(
                    f"stage {stage} has {count} replicas but an iteration has only "
                    f"{self.num_micro_batches} micro-batches, so a replica would sit idle; "
                    f"hint: use at most {self.num_micro_batches} replicas or smaller micro-batches"
                )
        if self.memory_mb is not None:
            _check_counts("memory_mb", self.memory_mb, "MB per stage")
            if len(self.memory_mb) != stages:
                raise ConfigError(
                    f"memory_mb must give one size per stage (stages: {stages}, "
                    f"memory_mb: {list(self.memory_mb)})"
                )
        syncs = self.sync if isinstance(self.sync, tuple) else (self.sync,)
        if isinstance(self.sync, tuple) and len(self.sync) != stages:
            raise ConfigError(
                f"sync must name one algorithm for every stage or one per stage (stages: {stages}, "
                f"sync: {list(self.sync)}); hint: sync='pipelined'"
            )
        for name in syncs:
            if name not in SYNC_ALGORITHMS:
                raise ConfigError(f"unknown gradient sync {name!r}; choose one of {list(SYNC_ALGORITHMS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown schedule {self.schedule!r}; choose one of {list(SCHEDULES)} "
                "(gpipe: every forward, then every backward; 1f1b: one forward one backward, less memory)"
            )
        if self.samples is not None and (
            isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1
        ):
            raise ConfigError(f"samples must be a positive integer (the data set's size), got {self.samples!r}")
        if self.predicted_stages is not None and [st.stage for st in self.predicted_stages] != list(range(stages)):
            raise ConfigError(
                f"predicted_stages must give one StageReport per stage, in order (stages: {stages}, got stages "
                f"{[st.stage for st in self.predicted_stages]})"
            )

    @classmethod
    def manual(
        cls,
        balance: Sequence[int],
        *,
        replicas: Sequence[int] | None = None,
        micro_batch_size: int,
        global_batch_size: int,
        memory_mb: int | Sequence[int] | None = None,
        sync: str | Sequence[str] = "pipelined",
        schedule: str = "gpipe",
    ) -> Plan:
        """A plan written by hand.

        Args:
            balance: layers per stage (``[2, 3, 2]`` = layers 0–1, 2–4, 5–6).
            replicas: workers per stage; one each if omitted.
            micro_batch_size: samples per micro-batch.
            global_batch_size: samples per optimizer step.
            memory_mb: function memory, one value for all stages or one per stage.
            sync: ``"pipelined"`` scatter-reduce or the ``"four_phase"`` baseline, for all
                stages or one per stage.
            schedule: ``"gpipe"`` or ``"1f1b"`` (:mod:`funcpipe.schedule`).
        """
        balance_t = _as_tuple("balance", balance)
        replicas_t = (1,) * len(balance_t) if replicas is None else _as_tuple("replicas", replicas)
        memory_t: tuple[int, ...] | None
        if memory_mb is None:
            memory_t = None
        elif isinstance(memory_mb, int):
            memory_t = (memory_mb,) * len(balance_t)
        else:
            memory_t = _as_tuple("memory_mb", memory_mb)
        sync_v: str | tuple[str, ...] = sync if isinstance(sync, str) else _as_names("sync", sync)
        return cls(
            balance=balance_t,
            replicas=replicas_t,
            micro_batch_size=micro_batch_size,
            global_batch_size=global_batch_size,
            memory_mb=memory_t,
            sync=sync_v,
            schedule=schedule,
        )

    @property
    def num_stages(self) -> int:
        return len(self.balance)

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // self.micro_batch_size

    @property
    def num_workers(self) -> int:
        return sum(self.replicas)

    def layer_range(self, stage: int) -> range:
        """Indices of the model's layers that ``stage`` owns."""
        start = sum(self.balance[:stage])
        return range(start, start + self.balance[stage])

    def layer_stages(self) -> tuple[int, ...]:
        """The stage that owns each of the model's layers, in layer order."""
        return tuple(s for s, count in enumerate(self.balance) for _ in range(count))

    def micro_batches(self, stage: int, replica: int) -> list[int]:
        """Micro-batches of one iteration that ``replica`` of ``stage`` runs: ``m mod d_s``."""
        return list(owned(replica, self.replicas[stage], self.num_micro_batches))

    def replica_of(self, stage: int, micro_batch: int) -> int:
        """The replica of ``stage`` that runs ``micro_batch``: ``micro_batch mod d_s``."""
        return replica_of(micro_batch, self.replicas[stage])

    def stage_sync(self, stage: int) -> str:
        """The gradient all-reduce ``stage``'s replicas use."""
        return self.sync[stage] if isinstance(self.sync, tuple) else self.sync

    def in_flight(self, stage: int) -> int:
        """Most micro-batches one replica of ``stage`` holds activations for (:func:`funcpipe.schedule.in_flight`)."""
        return in_flight(stage, self.replicas, self.num_micro_batches, self.schedule)

    def to_dict(self) -> dict[str, object]:
        """The plan as JSON-able data; prediction fields only when set."""
        data = dataclasses.asdict(self)
        for field in dataclasses.fields(self):
            if not field.compare and data[field.name] is None:  # the prediction fields
                del data[field.name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Plan:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"unknown plan fields {unknown}; known: {sorted(fields)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"plan is missing fields {missing}")
        kwargs = dict(data)
        for name in ("balance", "replicas", "memory_mb", "sync"):
            value = kwargs.get(name)
            if isinstance(value, list):
                kwargs[name] = tuple(value)
        if kwargs.get("predicted_stages") is not None:
            kwargs["predicted_stages"] = _stage_reports(kwargs["predicted_stages"])
        return cls(**kwargs)  # type: ignore[arg-type]  # validated in __post_init__

    def __str__(self) -> str:
        from funcpipe.report import plan_report

        return str(plan_report(self))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's plain-text display (a terminal, or a notebook without HTML): the table."""
        printer.text(str(self))

    def _repr_html_(self) -> str:
        """The plan as an HTML table, which Jupyter shows when a plan is a cell's value."""
        from funcpipe.report import plan_report

        return plan_report(self)._repr_html_()



def _stage_reports(value: object) -> tuple[StageReport, ...]:
    fields = [f.name for f in dataclasses.fields(StageReport)]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"predicted_stages must be a list of objects with fields {fields}, got {value!r}")
    reports = []
    for item in value:
        if isinstance(item, StageReport):
            reports.append(item)
            continue
        if not isinstance(item, dict) or sorted(item) != sorted(fields):
            raise ConfigError(f"predicted_stages holds {item!r}; each must have exactly the fields {fields}")
        reports.append(StageReport(**item))
    return tuple(reports)


def _as_tuple(name: str, values: Sequence[int]) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError(f"{name} must be a list of integers, got {values!r}")
    return tuple(values)


def _as_names(name: str, values: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError(f"{name} must be a name or a list of names, got {values!r}")
    return tuple(values)


def _check_counts(name: str, values: tuple[int, ...], what: str) -> None:
    if not values:
        raise ConfigError(f"{name} is empty; it needs one entry ({what}) per stage")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"{name} must hold positive integers ({what}), got {list(values)}; "
                f"hint: at least 1 per stage, e.g. {name}={[max(1, v) if isinstance(v, int) else 1 for v in values]}"
            )
