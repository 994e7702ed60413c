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
The driver's inputs and targets are in storage when the iteration starts.
Durations come from the profile and the platform through :mod:`funcpipe.costmodel`.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

from funcpipe import costmodel
from funcpipe.costmodel import StageCost
from funcpipe.errors import ConfigError
from funcpipe.plans import Plan, StageReport
from funcpipe.platforms import Platform, resolve
from funcpipe.platforms.base import MB_RATE
from funcpipe.profiler import ModelProfile
from funcpipe.protocol import ABORT_CHECK_S, FETCH_CONNECTIONS, REPORT_BYTES, piece_count, ring_peers
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
        requests: storage requests of the iteration by kind (:data:`REQUEST_KINDS`): writes,
            reads, reads of objects not there yet, LISTs and DELETEs; ``cost_usd`` prices them.
    """

    plan: Plan
    platform: str
    iteration_s: float
    cost_usd: float
    formula_s: float
    stages: tuple[StageReport, ...]
    timeline: Timeline
    requests: dict[str, float] = dataclasses.field(default_factory=dict)

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


#: How a plan's workers run, as :func:`simulate` replays them:
#:
#: * ``"funcpipe"`` — as :class:`funcpipe.Trainer` runs a plan: the driver writes each
#:   micro-batch's inputs and targets, which stage 0 and the last stage download; a worker
#:   reads an object that is not there yet again and again with the storage's back-off
#:   (``Platform.poll_initial_s`` doubling up to ``poll_max_s``), reads the driver's stop
#:   object once per iteration, and writes a heartbeat every :data:`HEARTBEAT_S` on a
#:   serverless platform; the driver polls for the last stage's reports and deletes each
#:   finished iteration's objects in batches of :data:`DELETE_BATCH`.
#: * ``"lambdaml"`` — as LambdaML's workers run (its ``reduce_scatter_batch`` on S3): each
#:   read its data partition once, before training (no input or target per iteration);
#:   the four-phase all-reduce waits for a phase's objects by LISTing the bucket in a loop
#:   without sleeping (one LIST per round trip), deletes each share it read, and a batch
#:   delete (after a LIST) clears the merged chunks; no driver, reports or heartbeats.
RUNTIMES = ("funcpipe", "lambdaml")
#: Where funcpipe's workers get their inputs and targets (``simulate(..., data=...)``).
DATA_SOURCES = ("fed", "stored")
#: funcpipe's serverless executors' default heartbeat (``Timing.heartbeat_s``).
HEARTBEAT_S = 5.0
#: Keys per batch delete (S3's DeleteObjects and OSS's DeleteMultipleObjects take 1,000).
DELETE_BATCH = 1000
#: The request kinds :attr:`Simulation.requests` counts.
REQUEST_KINDS = ("put", "get", "miss", "list", "delete")


def simulate(plan: Plan, profile: ModelProfile, platform: Platform | str, *, overlap: bool = True,
             runtime: str = "funcpipe", data: str = "fed") -> Simulation:
    """Replay one iteration of ``plan`` on ``platform`` with the profile's durations.

    Args:
        plan: the plan; without ``memory_mb``, each stage gets the smallest tier it fits.
        profile: the model's profile (:func:`funcpipe.profile`).
        platform: a :class:`~funcpipe.platforms.Platform` or its name (``"aws_lambda"``).
        overlap: ``False`` replays a worker that does not overlap transfers with
            compute (an ablation: funcpipe's workers always do): each download
            starts when the computation needs it, and the computation waits for
            each upload to finish. ``formula_s`` stays the overlapped formula.
        runtime: ``"funcpipe"`` or ``"lambdaml"`` (:data:`RUNTIMES`): how the workers get
            their data, poll and clean up, which sets the requests counted
            (:attr:`Simulation.requests`) and the delay between an object's arrival and the
            poll that finds it. ``formula_s`` stays funcpipe's formula, without polls.
        data: ``"fed"`` (the driver writes every micro-batch's inputs and targets, which stage 0
            and the last stage download) or ``"stored"`` (:data:`DATA_SOURCES`; a data set in storage,
            :mod:`funcpipe.data`: each worker holds the shards it read, so in the steady state an
            iteration downloads no inputs or targets; on a serverless platform the driver writes one
            go object per iteration, which stage 0's replicas read). The first reads of a call, one
            per shard, are not in an iteration: :func:`funcpipe.data` documents them.

    Raises:
        ConfigError: the plan and the profile disagree, or the platform is unknown.
        PlanInfeasible: a stage does not fit its function's memory.
    """
    spec = resolve(platform)
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}; hint: 'funcpipe' is how "
                          "Trainer runs a plan, 'lambdaml' how LambdaML's workers run")
    if data not in DATA_SOURCES:
        raise ConfigError(f"data must be one of {list(DATA_SOURCES)}, got {data!r}; hint: 'fed' when fit is given "
                          "batches, 'stored' for a data set uploaded with funcpipe.data.upload")
    held = runtime == "lambdaml" or data == "stored"
    stages = costmodel.stage_costs(profile, spec, plan)
    if plan.memory_mb is None:
        plan = dataclasses.replace(plan, memory_mb=tuple(st.tier.memory_mb for st in stages))
    counts = dict.fromkeys(REQUEST_KINDS, 0.0)
    spans, ends = _replay(stages, spec, plan, overlap, runtime=runtime, counts=counts, held=held)
    iteration_s = max(ends.values())
    timeline = Timeline(tuple(spans), iteration_s)
    busy = {(st.stage, r): dict.fromkeys(("compute", "sync", "upload", "download"), 0.0)
            for st in stages for r in range(st.replicas)}
    for span in spans:
        busy[(span.stage, span.replica)]["sync" if span.label == "sync" else span.lane] += span.end - span.start
    _count_the_rest(counts, stages, spec, plan, iteration_s, runtime, held)
    if runtime == "funcpipe":  # while its compute thread waits, a worker reads the abort and stop objects
        idle = sum(max(0.0, iteration_s - b["compute"] - b["sync"]) for b in busy.values())
        counts["miss"] += 2 * idle / ABORT_CHECK_S
    cost = (costmodel.cost_per_iteration(iteration_s, stages, plan, spec, requests=False)
            + request_cost(counts, spec))
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
        requests=counts,
    )


def request_cost(counts: dict[str, float], platform: Platform) -> float:
    """Dollars of an iteration's storage requests, by kind (:data:`REQUEST_KINDS`)."""
    return (counts["put"] * platform.price_per_put + counts["get"] * platform.price_per_get
            + counts["miss"] * platform.price_per_miss + counts["list"] * platform.price_per_list
            + counts["delete"] * platform.price_per_delete)


def polls(wait_s: float, latency_s: float, initial_s: float, max_s: float) -> tuple[int, float]:
    """``(misses, delay)`` of a worker that starts reading an object ``wait_s`` before it exists.

    It reads at ``t0 = 0``; each read takes ``latency_s`` and finds nothing while ``t_k < wait_s``;
    then it sleeps ``initial_s``, doubling up to ``max_s``, and reads again. ``misses`` counts the
    reads before the object exists, ``delay`` the time from its arrival to the read that finds it.
    """
    if wait_s <= 0:
        return 0, 0.0
    t, sleep, misses = 0.0, initial_s, 0
    while t < wait_s:
        step = latency_s + sleep
        if step <= 0:  # reads without cost or pause: found the moment it exists
            return misses, 0.0
        if sleep >= max_s:  # a constant step from here: jump
            k = math.ceil((wait_s - t) / step)
            return misses + k, t + k * step - wait_s
        t += step
        misses += 1
        sleep = min(2 * sleep, max_s) if sleep > 0 else min(initial_s, max_s)
    return misses, t - wait_s


def _count_the_rest(counts: dict[str, float], stages: Sequence[StageCost], platform: Platform, plan: Plan,
                    iteration_s: float, runtime: str, held: bool = False) -> None:
    """Add the requests the replay does not see object by object: its messages and pieces' writes and
    reads, the driver's and the runtime's own (stop reads, reports, heartbeats, deletes)."""
    writes, reads = costmodel.requests_per_iteration(stages, plan, fed=not held)
    workers = sum(st.replicas for st in stages)
    last = stages[-1].replicas
    if runtime == "lambdaml":
        writes, reads = writes - last, reads - last  # no driver to report to
        for st in stages:
            d = st.replicas
            if d > 1 and st.param_bytes > 0 and plan.stage_sync(st.stage) == "four_phase":
                counts["delete"] += d * (d - 1) + 1  # each share read, then one batch of merged chunks
                counts["list"] += 1  # the batch delete's listing
    else:
        counts["miss"] += workers  # each worker reads the stop object once an iteration, mostly not there
        # The driver waits about an iteration for the reports, reading with the back-off.
        if platform.poll_max_s > 0:  # the first report it waits for; the others are there by then
            counts["miss"] += polls(iteration_s, platform.latency_s, platform.poll_initial_s, platform.poll_max_s)[0]
        counts["delete"] += math.ceil(writes / DELETE_BATCH)
        if platform.storage != "file":  # a serverless platform: status heartbeats, read by the driver
            beats = workers * iteration_s / HEARTBEAT_S
            counts["put"] += beats
            counts["get"] += beats
            if held:  # a stored data set: the driver's go object, read by every replica of stage 0
                counts["put"] += 1
                counts["get"] += stages[0].replicas
    counts["put"] += writes
    counts["get"] += reads


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
    stages: Sequence[StageCost], platform: Platform, plan: Plan, overlap: bool, *, runtime: str,
    counts: dict[str, float], held: bool = False,
) -> tuple[list[Span], dict[tuple[int, int], float]]:
    engine = _Engine()
    objects: dict[tuple[Any, ...], _Signal] = {}
    spans: list[Span] = []
    ends: dict[tuple[int, int], float] = {}
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
            _Worker(engine, obj, spans, ends, st, r, stages, plan, platform, count, overlap, runtime, counts,
                    held).start()
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
        platform: Platform,
        count: int,
        overlap: bool,
        runtime: str,
        counts: dict[str, float],
        held: bool = False,
    ) -> None:
        self.engine, self.obj, self.spans, self.ends = engine, obj, spans, ends
        self.overlap = overlap
        # LambdaML's runtime: inputs and targets already in memory, the four-phase waits LIST in a loop.
        self.lambdaml = runtime == "lambdaml"
        # Inputs and targets already in memory: LambdaML's, or a stored data set's shards held.
        self.held = held
        self.platform, self.counts = platform, counts
        self.st, self.replica, self.plan, self.lat = st, replica, plan, platform.latency_s
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
                if self.held and key[0] in ("input", "target"):
                    self.received[key] = self.obj(key)  # the driver's objects: there from the start
                    continue
                nbytes = {"recv": st.input_bytes, "recv_target": st.target_bytes, "recv_grad": st.output_grad_bytes}[op]
                self._download(key, nbytes, f"{key[0]} {m}")
            elif op == "send":
                self._upload(("act", s + 1, m), st.output_bytes, f"act {m}")
            elif op == "send_grad":
                self._upload(("grad", s - 1, m), st.input_grad_bytes, f"grad {m}")
            elif op == "sync" and st.param_bytes > 0:
                self._sync_transfers()
            elif op == "update":
                for other, nbytes in st.tied:  # the tie's gradient, exchanged with the other stage
                    if self.replica == 0:
                        self._upload(("tie", s, other), nbytes, "tie")
                    self._download(("tie", other, s), nbytes, "tie")
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
                item = self.download_items.get(self._received_key(op, m))
                if self.overlap and item is not None:
                    engine.fire(item.posted)
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
                for other, _ in st.tied:
                    if self.replica == 0:
                        engine.fire(self.posted[("tie", s, other)])
                    engine.fire(self.download_items[("tie", other, s)].posted)
                    yield self.received[("tie", other, s)]
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
        item = self.download_items.get(key)
        if not self.overlap and item is not None and item.posted.time is None:
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

    def _uploader(self) -> _Process:
        engine = self.engine
        for item in self.uploads:
            yield item.posted
            start = engine.now
            yield self.up.reserve(engine.now, item.nbytes) + self.lat - engine.now
            self._span("upload", start, item.label)
            engine.fire(self.obj(item.key))
            engine.fire(item.done)

    def _await(self, item: _Item) -> _Process:
        """Wait for ``item``'s object as the runtime polls for it: count the reads that miss it, and
        add the time from its arrival to the read that finds it."""
        engine = self.engine
        asked = engine.now
        yield self.obj(item.key)
        listing = self.lambdaml and item.key[0] in ("chunk", "merged") and self.sync == "four_phase"
        if listing:  # LambdaML: LIST after LIST, no sleep
            misses, delay = polls(engine.now - asked, self.lat, 0.0, 0.0)
            self.counts["list"] += misses + 1
        elif self.platform.poll_max_s > 0:  # 0: a platform that does not model polling
            misses, delay = polls(engine.now - asked, self.lat, self.platform.poll_initial_s,
                                  self.platform.poll_max_s)
            self.counts["miss"] += misses
        else:
            delay = 0.0
        if delay > 0:
            yield delay

    def _fetcher(self, queue: collections.deque[_Item]) -> _Process:
        """One of the all-reduce's download connections: takes the next fetch when free."""
        engine = self.engine
        yield self.fetch_posted
        while queue:
            item = queue.popleft()
            yield from self._await(item)
            start = engine.now
            yield self.down.reserve(engine.now, item.nbytes) + self.lat - engine.now
            self._span("download", start, item.label)
            engine.fire(item.done)

    def _downloader(self, items: list[_Item]) -> _Process:
        engine = self.engine
        for item in items:
            yield item.posted
            yield from self._await(item)
            start = engine.now
            yield self.down.reserve(engine.now, item.nbytes) + self.lat - engine.now
            self._span("download", start, item.label)
            engine.fire(item.done)
