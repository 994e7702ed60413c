"""Simulator: a discrete-event replay of one training iteration of a plan.

Every worker of the plan runs exactly the task list :func:`funcpipe.schedule.worker_tasks`
gives it, on the same three threads as :class:`funcpipe.worker.StageWorker`:

* the **compute** thread runs forward, backward, the all-reduce's additions and
  the optimizer step, each waiting for its inputs;
* the **download** thread fetches, one at a time and in the order they were
  posted, the inputs, targets and gradients (and the four-phase all-reduce's
  chunks); during the pipelined all-reduce, :data:`~funcpipe.protocol.FETCH_CONNECTIONS`
  fetch connections share the downlink;
* the **upload** thread sends outputs in the order they were produced.

A download is posted when the compute thread reaches its ``recv*`` task, as the
worker posts it: under GPipe every ``recv`` is at the front of the list, so the
whole iteration is prefetched; under 1F1B each is posted one step ahead of its
use, so a download can wait for the compute thread to get there.

A request of ``x`` bytes holds the function's uplink or downlink for
``x / bandwidth``, then pays the storage latency; a read starts only once the
object exists (the storage model of :class:`funcpipe.storage.ThrottledStorage`).
With ``poll_s=(initial, largest)`` a read that has to wait finds its object
only at a poll, as :meth:`funcpipe.storage.Storage.wait` polls: the first when
the read starts waiting, each next one a latency (the miss) plus a sleep later,
the sleeps doubling from ``initial`` to ``largest``.
The driver's inputs and targets are in storage when the iteration starts.
Durations come from the profile and the platform through :mod:`funcpipe.costmodel`.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

from funcpipe import costmodel
from funcpipe.costmodel import StageCost
from funcpipe.errors import ConfigError
from funcpipe.plans import Plan, StageReport
from funcpipe.platforms import Platform, resolve
from funcpipe.platforms.base import MB_RATE
from funcpipe.profiler import ModelProfile
from funcpipe.protocol import FETCH_CONNECTIONS, REPORT_BYTES, piece_count, ring_peers
from funcpipe.schedule import worker_tasks

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Simulation", "Span", "StageReport", "Timeline", "simulate"]


@dataclasses.dataclass(frozen=True)
class Span:
    """One interval of one worker's thread.

    Attributes:
        stage, replica: the worker.
        lane: ``"compute"``, ``"upload"`` or ``"download"``.
        start, end: seconds from the start of the iteration.
        label: what ran: ``F3``/``B3`` (forward/backward of micro-batch 3),
            ``sync``, ``update``, ``act 3``, ``grad 3``, ``input 3``,
            ``target 3``, ``chunk``, ``merged``, ``report``.
    """

    stage: int
    replica: int
    lane: str
    start: float
    end: float
    label: str

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class Timeline:
    """Every span of one simulated iteration."""

    spans: tuple[Span, ...]
    iteration_s: float

    def workers(self) -> list[tuple[int, int]]:
        """``(stage, replica)`` of every worker, in order."""
        return sorted({(span.stage, span.replica) for span in self.spans})

    def lane(self, stage: int, replica: int, lane: str) -> list[Span]:
        """The spans of one thread of one worker, in time order."""
        return sorted(
            (s for s in self.spans if (s.stage, s.replica, s.lane) == (stage, replica, lane)),
            key=lambda s: s.start,
        )

    def plot(self, path: str | None = None, *, title: str | None = None) -> Figure:
        """A Gantt chart: one row per worker thread (compute, upload, download).

        Args:
            path: also save the figure there (PNG by extension).
            title: the figure's title.
        """
        from funcpipe.plot import timeline_figure

        return timeline_figure(self, title=title, path=path)


@dataclasses.dataclass(frozen=True)
class Simulation:
    """The result of :func:`simulate`.

    Attributes:
        plan: the plan simulated, with ``memory_mb`` filled in and carrying
            this simulation's predictions (``platform``, ``predicted_iteration_s``,
            ``predicted_cost_usd``, ``predicted_stages``).
        platform: the platform's name.
        iteration_s: seconds of one iteration.
        cost_usd: dollars of one iteration (functions, invocations, storage requests).
        formula_s: the planner's closed-form estimate of ``iteration_s``, for comparison.
        stages: per-stage report.
        timeline: every span, for :meth:`Timeline.plot`.
    """

    plan: Plan
    platform: str
    iteration_s: float
    cost_usd: float
    formula_s: float
    stages: tuple[StageReport, ...]
    timeline: Timeline

    def __str__(self) -> str:
        from funcpipe.report import simulation_report

        return str(simulation_report(self))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's plain-text display (a terminal, or a notebook without HTML): the table."""
        printer.text(str(self))

    def _repr_html_(self) -> str:
        """The per-stage table as HTML, which Jupyter shows when a simulation is a cell's value."""
        from funcpipe.report import simulation_report

        return simulation_report(self)._repr_html_()


def simulate(
    plan: Plan,
    profile: ModelProfile,
    platform: Platform | str,
    *,
    overlap: bool = True,
    poll_s: tuple[float, float] | None = None,
) -> Simulation:
    """Replay one iteration of ``plan`` on ``platform`` with the profile's durations.

    Args:
        plan: the plan; without ``memory_mb``, each stage gets the smallest tier it fits.
        profile: the model's profile (:func:`funcpipe.profile`).
        platform: a :class:`~funcpipe.platforms.Platform` or its name (``"aws_lambda"``).
        overlap: ``False`` replays a worker that does not overlap transfers with
            compute (an ablation: funcpipe's workers always do): each download
            starts when the computation needs it, and the computation waits for
            each upload to finish. ``formula_s`` stays the overlapped formula.
        poll_s: ``(initial, largest)`` sleep between two polls of a read whose object is
            not there yet (e.g. ``(0.01, 0.2)``, :class:`funcpipe.storage.s3.S3Storage`'s);
            ``None``: a waiting read starts the moment its object is written.

    Raises:
        ConfigError: the plan and the profile disagree, or the platform is unknown.
        PlanInfeasible: a stage does not fit its function's memory.
    """
    spec = resolve(platform)
    stages = costmodel.stage_costs(profile, spec, plan)
    if plan.memory_mb is None:
        plan = dataclasses.replace(plan, memory_mb=tuple(st.tier.memory_mb for st in stages))
    if poll_s is not None and not (0 < poll_s[0] <= poll_s[1]):
        raise ConfigError(f"poll_s must be (initial, largest) with 0 < initial <= largest, got {poll_s!r}")
    spans, ends = _replay(stages, spec, plan, overlap, poll_s)
    iteration_s = max(ends.values())
    cost = costmodel.cost_per_iteration(iteration_s, stages, plan, spec)
    timeline = Timeline(tuple(spans), iteration_s)
    busy = {(st.stage, r): dict.fromkeys(("compute", "sync", "upload", "download"), 0.0)
            for st in stages for r in range(st.replicas)}
    for span in spans:
        busy[(span.stage, span.replica)]["sync" if span.label == "sync" else span.lane] += span.end - span.start
    reports = []
    for st in stages:
        worst = max((busy[(st.stage, r)] for r in range(st.replicas)), key=lambda b: b["compute"] + b["sync"])
        reports.append(
            StageReport(
                stage=st.stage,
                replicas=st.replicas,
                memory_mb=st.tier.memory_mb,
                memory_needed_mb=st.memory_bytes / 2**20,
                compute_s=worst["compute"],
                sync_s=worst["sync"],
                upload_s=worst["upload"],
                download_s=worst["download"],
                idle_s=max(0.0, iteration_s - worst["compute"] - worst["sync"]),
                cost_usd=iteration_s * st.replicas * spec.price_per_s(st.tier),
            )
        )
    reports_t = tuple(reports)
    plan = dataclasses.replace(plan, platform=spec.name, predicted_iteration_s=iteration_s, predicted_cost_usd=cost,
                               predicted_stages=reports_t)
    return Simulation(
        plan=plan,
        platform=spec.name,
        iteration_s=iteration_s,
        cost_usd=cost,
        formula_s=costmodel.formula_iteration_s(stages, spec, plan),
        stages=reports_t,
        timeline=timeline,
    )


# -- the event engine ----------------------------------------------------------


class _Signal:
    """Something that happens once (an object written, a download finished)."""

    __slots__ = ("time", "waiters")

    def __init__(self) -> None:
        self.time: float | None = None
        self.waiters: list[_Process] = []


#: The tasks that post a download.
_RECEIVES = ("recv", "recv_target", "recv_grad")

_Request = float | _Signal
_Process = Generator[_Request, None, None]


class _Engine:
    """Processes yield a delay (seconds) or a :class:`_Signal` to wait for."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, _Process]] = []
        self._seq = 0

    def start(self, process: _Process) -> None:
        self._push(self.now, process)

    def fire(self, signal: _Signal) -> None:
        signal.time = self.now
        for process in signal.waiters:
            self._push(self.now, process)
        signal.waiters = []

    def run(self) -> None:
        while self._queue:
            self.now, _, process = heapq.heappop(self._queue)
            self._advance(process)

    def _push(self, at: float, process: _Process) -> None:
        heapq.heappush(self._queue, (at, self._seq, process))
        self._seq += 1

    def _advance(self, process: _Process) -> None:
        while True:
            try:
                request = next(process)
            except StopIteration:
                return
            if isinstance(request, _Signal):
                if request.time is None:
                    request.waiters.append(process)
                    return
                continue
            if request > 0:
                self._push(self.now + request, process)
                return


class _Link:
    """One direction of a function's network link: FIFO by request time."""

    __slots__ = ("busy_until", "bytes_per_s")

    def __init__(self, mb_s: float) -> None:
        self.busy_until = 0.0
        self.bytes_per_s = mb_s * MB_RATE

    def reserve(self, now: float, nbytes: float) -> float:
        """Reserve the link for ``nbytes`` from ``now``; returns when the bytes are through."""
        end = max(now, self.busy_until) + nbytes / self.bytes_per_s
        self.busy_until = end
        return end


@dataclasses.dataclass
class _Item:
    """One transfer in a worker's upload or download queue."""

    key: tuple[Any, ...]
    nbytes: float
    label: str
    posted: _Signal = dataclasses.field(default_factory=_Signal)  # handed to its thread
    done: _Signal = dataclasses.field(default_factory=_Signal)


def _replay(
    stages: Sequence[StageCost], platform: Platform, plan: Plan, overlap: bool = True,
    poll_s: tuple[float, float] | None = None,
) -> tuple[list[Span], dict[tuple[int, int], float]]:
    engine = _Engine()
    objects: dict[tuple[Any, ...], _Signal] = {}
    spans: list[Span] = []
    ends: dict[tuple[int, int], float] = {}
    lat = platform.latency_s
    count = len(stages)
    m_total = plan.num_micro_batches

    def obj(key: tuple[Any, ...]) -> _Signal:
        signal = objects.get(key)
        if signal is None:
            signal = objects[key] = _Signal()
        return signal

    for m in range(m_total):  # the driver's objects are there from the start
        for key in (("input", m), ("target", m)):
            engine.fire(obj(key))

    for st in stages:
        for r in range(st.replicas):
            _Worker(engine, obj, spans, ends, st, r, stages, plan, lat, count, overlap, poll_s).start()
    engine.run()
    missing = [(st.stage, r) for st in stages for r in range(st.replicas) if (st.stage, r) not in ends]
    if missing:  # pragma: no cover - a schedule bug, not a user error
        raise RuntimeError(f"simulation deadlocked; workers {missing} never finished")
    return spans, ends


class _Worker:
    """The three threads of one (stage, replica) as engine processes."""

    def __init__(
        self,
        engine: _Engine,
        obj: Callable[[tuple[Any, ...]], _Signal],
        spans: list[Span],
        ends: dict[tuple[int, int], float],
        st: StageCost,
        replica: int,
        stages: Sequence[StageCost],
        plan: Plan,
        latency_s: float,
        count: int,
        overlap: bool = True,
        poll_s: tuple[float, float] | None = None,
    ) -> None:
        self.engine, self.obj, self.spans, self.ends = engine, obj, spans, ends
        self.overlap = overlap
        self.poll_s = poll_s
        self.st, self.replica, self.plan, self.lat = st, replica, plan, latency_s
        self.s = st.stage
        self.first, self.last = st.stage == 0, st.stage == count - 1
        self.stages = stages
        self.up = _Link(st.tier.uplink_mb_s)
        self.down = _Link(st.tier.downlink_mb_s)
        self.tasks = worker_tasks(st.stage, replica, replicas=plan.replicas, num_micro_batches=plan.num_micro_batches,
                                  schedule=plan.schedule)
        self.sync = plan.stage_sync(st.stage)
        self.uploads: list[_Item] = []
        self.downloads: list[_Item] = []
        self.received: dict[tuple[Any, ...], _Signal] = {}
        self.posted: dict[tuple[Any, ...], _Signal] = {}
        self.sent: dict[tuple[Any, ...], _Signal] = {}  # an upload's key -> it is in storage
        self.download_items: dict[tuple[Any, ...], _Item] = {}
        self.fetches: list[_Item] = []

    # -- building the queues ---------------------------------------------------

    def start(self) -> None:
        s, st = self.s, self.st
        for op, m in self.tasks:
            if op in _RECEIVES:
                key = self._received_key(op, m)
                nbytes = {"recv": st.input_bytes, "recv_target": st.target_bytes, "recv_grad": st.output_bytes}[op]
                self._download(key, nbytes, f"{key[0]} {m}")
            elif op == "send":
                self._upload(("act", s + 1, m), st.output_bytes, f"act {m}")
            elif op == "send_grad":
                self._upload(("grad", s - 1, m), st.input_bytes, f"grad {m}")
            elif op == "sync" and st.param_bytes > 0:
                self._sync_transfers()
        if self.last:
            self._upload(("report", s, self.replica), REPORT_BYTES, "report")
        self.engine.start(self._compute())
        self.engine.start(self._uploader())
        self.engine.start(self._downloader(self.downloads))
        if self.fetches:
            queue = collections.deque(self.fetches)
            for _ in range(FETCH_CONNECTIONS):
                self.engine.start(self._fetcher(queue))

    def _download(self, key: tuple[Any, ...], nbytes: float, label: str) -> _Item:
        item = _Item(key, nbytes, label)
        self.downloads.append(item)
        self.received[key] = item.done
        self.download_items[key] = item
        return item

    def _upload(self, key: tuple[Any, ...], nbytes: float, label: str) -> _Item:
        item = _Item(key, nbytes, label)
        self.uploads.append(item)
        self.posted[key] = item.posted
        self.sent[key] = item.done
        return item

    def _sync_transfers(self) -> None:
        """Queue the all-reduce's transfers, as :func:`funcpipe.collectives.all_reduce` posts them."""
        d, r, s, p = self.st.replicas, self.replica, self.s, self.st.param_bytes
        to_peers, from_peers = ring_peers(r, d)
        if self.sync == "pipelined":
            q_count = piece_count(p, d)
            piece = p / d / q_count
            for q in range(q_count):
                for peer in to_peers:
                    self._upload(("chunk", s, peer, r, q), piece, "chunk")
            for q in range(q_count):
                self._upload(("merged", s, r, q), piece, "merged")
            self.fetches = [
                _Item(("chunk", s, r, peer, q), piece, "chunk") for q in range(q_count) for peer in from_peers
            ] + [_Item(("merged", s, peer, q), piece, "merged") for q in range(q_count) for peer in from_peers]
            self.fetch_posted = _Signal()
            for item in self.fetches:
                item.posted = self.fetch_posted
                self.received[item.key] = item.done
            self.pieces = q_count
        else:
            chunk = p / d
            for peer in to_peers:
                self._upload(("chunk", s, peer, r, 0), chunk, "chunk")
            for peer in from_peers:
                self._download(("chunk", s, r, peer, 0), chunk, "chunk")
            self._upload(("merged", s, r, 0), chunk, "merged")
            for peer in from_peers:
                self._download(("merged", s, peer, 0), chunk, "merged")
        self.to_peers, self.from_peers = to_peers, from_peers

    # -- the threads -------------------------------------------------------------

    def _span(self, lane: str, start: float, label: str) -> None:
        self.spans.append(Span(self.s, self.replica, lane, start, self.engine.now, label))

    def _compute(self) -> _Process:
        engine, st, s = self.engine, self.st, self.s
        for op, m in self.tasks:
            if op in _RECEIVES:
                # The download is posted here, where the schedule puts it (GPipe: all at the
                # start; 1F1B: one step ahead of its use). Without overlap it waits until the
                # computation needs it (_fetch_now).
                if self.overlap:
                    engine.fire(self.download_items[self._received_key(op, m)].posted)
            elif op == "forward":
                needed = [("input", m) if self.first else ("act", s, m)] + ([("target", m)] if self.last else [])
                for key in needed:
                    yield from self._fetch_now(key)
                    yield self.received[key]
                start = engine.now
                yield st.forward_s
                self._span("compute", start, f"F{m}")
            elif op == "send":
                engine.fire(self.posted[("act", s + 1, m)])
                if not self.overlap:
                    yield self.sent[("act", s + 1, m)]
            elif op == "backward":
                if not self.last:
                    yield from self._fetch_now(("grad", s, m))
                    yield self.received[("grad", s, m)]
                start = engine.now
                yield st.backward_s
                self._span("compute", start, f"B{m}")
            elif op == "send_grad":
                engine.fire(self.posted[("grad", s - 1, m)])
                if not self.overlap:
                    yield self.sent[("grad", s - 1, m)]
            elif op == "sync" and st.param_bytes > 0:
                start = engine.now
                yield from self._sync()
                self._span("compute", start, "sync")
            elif op == "update":
                start = engine.now
                yield st.update_s
                self._span("compute", start, "update")
        if self.last:
            engine.fire(self.posted[("report", s, self.replica)])
        if self.uploads:
            yield self.uploads[-1].done
        self.ends[(s, self.replica)] = engine.now

    def _received_key(self, op: str, m: int) -> tuple[Any, ...]:
        """The object a ``recv*`` task of micro-batch ``m`` downloads."""
        if op == "recv":
            return ("input", m) if self.first else ("act", self.s, m)
        if op == "recv_target":
            return ("target", m)
        return ("grad", self.s, m)

    def _fetch_now(self, key: tuple[Any, ...]) -> _Process:
        """Without overlap: start the download of ``key`` now (it was not prefetched)."""
        item = self.download_items[key]
        if not self.overlap and item.posted.time is None:
            self.engine.fire(item.posted)
        yield from ()

    def _sync(self) -> _Process:
        engine, s, r = self.engine, self.s, self.replica
        if self.sync == "pipelined":
            for peer in self.to_peers:
                for q in range(self.pieces):
                    engine.fire(self.posted[("chunk", s, peer, r, q)])
            engine.fire(self.fetch_posted)
            for q in range(self.pieces):
                for peer in self.from_peers:
                    yield self.received[("chunk", s, r, peer, q)]
                engine.fire(self.posted[("merged", s, r, q)])
            for q in range(self.pieces):
                for peer in self.from_peers:
                    yield self.received[("merged", s, peer, q)]
            yield self.sent[("merged", s, r, self.pieces - 1)]
            return
        shares = [("chunk", s, peer, r, 0) for peer in self.to_peers]
        for share in shares:
            engine.fire(self.posted[share])
        for share in shares:
            yield self.sent[share]
        for phase in ("chunk", "merged"):
            if phase == "merged":
                engine.fire(self.posted[("merged", s, r, 0)])
                yield self.sent[("merged", s, r, 0)]
            for peer in self.from_peers:
                key: tuple[Any, ...] = ("chunk", s, r, peer, 0) if phase == "chunk" else ("merged", s, peer, 0)
                item = self.download_items[key]
                engine.fire(item.posted)
                yield item.done

    def _await_object(self, key: tuple[Any, ...]) -> _Process:
        """Wait until a read of ``key``, starting to wait now, finds the object (see ``poll_s``)."""
        waiting_from = self.engine.now
        written = self.obj(key)
        yield written
        if self.poll_s is None or written.time is None or written.time <= waiting_from:
            return
        initial, largest = self.poll_s
        poll, sleep = waiting_from, initial
        while poll < written.time:  # each poll before the write misses: a latency, then a sleep
            poll += self.lat + sleep
            sleep = min(2 * sleep, largest)
        yield poll - self.engine.now

    def _uploader(self) -> _Process:
        engine = self.engine
        for item in self.uploads:
            yield item.posted
            start = engine.now
            yield self.up.reserve(engine.now, item.nbytes) + self.lat - engine.now
            self._span("upload", start, item.label)
            engine.fire(self.obj(item.key))
            engine.fire(item.done)

    def _fetcher(self, queue: collections.deque[_Item]) -> _Process:
        """One of the all-reduce's download connections: takes the next fetch when free."""
        engine = self.engine
        yield self.fetch_posted
        while queue:
            item = queue.popleft()
            yield from self._await_object(item.key)
            start = engine.now
            yield self.down.reserve(engine.now, item.nbytes) + self.lat - engine.now
            self._span("download", start, item.label)
            engine.fire(item.done)

    def _downloader(self, items: list[_Item]) -> _Process:
        engine = self.engine
        for item in items:
            yield item.posted
            yield from self._await_object(item.key)
            start = engine.now
            yield self.down.reserve(engine.now, item.nbytes) + self.lat - engine.now
            self._span("download", start, item.label)
            engine.fire(item.done)
