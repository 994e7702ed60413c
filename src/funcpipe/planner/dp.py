"""An exact dynamic program over contiguous partitions: the planner's formula optimum.

It minimises the closed formula of :mod:`funcpipe.costmodel` — iteration seconds,
dollars per iteration, or a weighted sum of the two, under an optional deadline on
the seconds and budget on the dollars — over the cuts, 1 to ``max_stages`` stages,
and per stage a tier, 1 to ``max_replicas`` replicas and (with replicas) one of the
problem's all-reduce algorithms, every stage fitting its tier's memory under the
problem's schedule. The micro-batch size and the schedule are fixed per problem;
the planner runs the program once per pair. CP-SAT's LP bound is weak for
contiguous partitions; this program proves the optimum in seconds, and the planner
re-ranks its plans with the simulator (and falls back on CP-SAT when it runs out
of time).

**Why a left-to-right program works.** The formula is max-plus: every time is a
maximum of sums. Write ``a`` for the time stage ``s``'s first input is in storage and
``uo = a' + Δ`` for the time its last activation is up (``a'`` the next stage's
``a``); ``Δ`` is a running maximum of per-stage terms. Every forward time of stage
``s`` is ``a`` plus a maximum of constants of the stage and ``Δ`` of the stage
before. The backward recursion reaches stage ``s`` from stage ``s+1`` only
through ``e[s+1]`` (end of its last backward) and ``B[s+1]`` (``max(b0, uo)`` under
GPipe, ``b0`` under 1F1B):

    e[s] = max(κ_s, e[s+1] + c_s, B[s+1] + δ_s)        B[s] = max(γ_s, B[s+1] + c_s)
    c_s = u + D + g      δ_s = D + g + max(u + max((n-1) g, n D), n' u)

(``u``, ``n'`` the next stage's input-gradient upload and micro-batch count, ``D``,
``g``, ``n`` this stage's gradient download, backward and micro-batches), and the
iteration is ``max_s e[s] + L_s`` (``L_s`` the update, upload and sync tail). So the
part of the iteration fixed by stages ``0..s`` is ``max(C, e[s+1] + P, B[s+1] + Q)``
with ``P = π + u``, ``Q = max(ρ + u, π + n' u)``; under 1F1B also
``a' + π + Z'`` with ``Z'`` the next stage's own uplink term, which is added when
that stage is. A *label* at a cut holds ``(a, Δ, C, π, ρ)``, the stages used and,
for cost, the sums of replica prices, request dollars and replicas. Everything the
rest of the pipeline adds is non-decreasing in each coordinate, so a label no worse
in every coordinate than another at the same cut dominates it: the program keeps,
at each cut, the labels no other label dominates (exact: no approximation, no
bucketing), and drops those whose lower bound on any completion is no better than
the incumbent.

**1F1B's window** depends on the workers *after* a stage (:func:`funcpipe.schedule.in_flight`:
``k = min(n, ceil(W_s / d_s))``), which a left-to-right program does not know yet.
A stage that does not fit with every micro-batch in flight fits while ``W_{s+1} <=
(k_max - 1) d_s`` (``k_max`` the largest window its tier holds; the memory model is
linear in the window); a label carries ``σ``, the most workers the cuts after it
may hold so that every stage before fits, and a completion must respect it. More
``σ`` is better, so ``-σ`` is one more coordinate of the dominance.

The returned value is the formula of :mod:`funcpipe.costmodel` evaluated on the
returned plan (the program's own float arithmetic differs from it by rounding only).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from funcpipe import costmodel
from funcpipe.errors import PlanInfeasible
from funcpipe.planner.model import Candidate, Problem
from funcpipe.platforms.base import MB_RATE, MIB
from funcpipe.protocol import MAX_PIECES, PIECE_BYTES, REPORT_BYTES

__all__ = ["Optimum", "optimum"]

Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
#: Slack on the deadline and budget in the program's own arithmetic; plans this close to
#: them are checked with :mod:`funcpipe.costmodel` itself.
LIMIT_SLACK = 1e-9
#: Labels per cut of the narrow first pass, which finds the incumbent.
BEAM = 16
#: Layers x options above which the narrow pass is coarse: fewer options, a beam shrinking with depth.
COARSE_ABOVE = 150 * 128
#: Levels of the iteration seconds at which the cost bound of the rest is tabulated.
GRID = 48
#: The grid spans iteration seconds from its top divided by this to its top.
SPAN = 12.0
#: "No limit" on the workers after a cut (1F1B's σ), kept finite so coordinates sum.
NO_LIMIT = 1e9
#: Most bytes of per-column tables kept between the passes of one search.
CACHE_BYTES = 400 * 2**20


@dataclasses.dataclass(frozen=True)
class Optimum:
    """The formula's optimum: the plan, its formula values and what the search took.

    ``candidate`` is ``None`` when no plan beats the ``incumbent`` the search was given
    (``bound`` then says how good any plan can be).
    """

    candidate: Candidate | None
    value: float  # the objective by funcpipe.costmodel (inf without a candidate)
    bound: float  # a proven lower bound on every plan's objective (= value when solved with gap 0)
    iteration_s: float
    cost_usd: float
    seconds: float
    labels: int  # labels kept over all cuts (the search's size)
    fits: bool = True  # False only with memory_slack_bytes: the plan needs more than its tier
    #: Other plans the search completed, best first, as ``(value, candidate)`` (``alternatives``).
    others: tuple[tuple[float, Candidate], ...] = ()
    #: False when the exact pass ran out of time: the plans are the narrow pass's, ``bound`` 0.
    proven: bool = True


@dataclasses.dataclass(frozen=True)
class _Goal:
    """``time_weight * seconds + cost_weight * dollars``, under a deadline and a budget."""

    time_weight: float
    cost_weight: float
    deadline_s: float | None
    budget_usd: float | None
    invocations: bool

    @property
    def tracks_cost(self) -> bool:
        return self.cost_weight > 0 or self.budget_usd is not None


class _Column:
    """Per-stage constants of the formula for the stages ``[i, j)`` ending at one cut ``j``.

    Arrays are ``[i, o]``: every start ``i < j`` and every option ``o`` (tier, replicas, sync).
    """

    def __init__(self, **arrays: Any) -> None:
        self.__dict__.update(arrays)

    def __getattr__(self, name: str) -> Any:  # pragma: no cover - a typo in this module
        raise AttributeError(name)


class _Tables:
    """The formula's constants by segment, and the options of a stage."""

    def __init__(self, problem: Problem, memory_slack_bytes: float = 0.0, *, coarse: bool = False) -> None:
        prof, plat = problem.profile, problem.platform
        self.p = problem
        b = problem.micro_batch_size
        m = problem.num_micro_batches
        layers = prof.layers
        count = len(layers)
        self.count, self.m = count, m
        self.lat = plat.latency_s
        self.gpipe = problem.schedule == "gpipe"

        def seg(values: list[float]) -> Array:
            # Sums over layers i..j-1 in the order funcpipe.costmodel adds them (sequentially from 0).
            out = np.zeros((count + 1, count + 1))
            arr = np.asarray(values, dtype=np.float64)
            for i in range(count):
                out[i, i + 1:] = np.cumsum(arr[i:])
            return out

        self.fsum = seg([lp.forward_s(b) for lp in layers])
        self.gsum = seg([lp.backward_s(b) for lp in layers])
        self.usum = seg([lp.update_s for lp in layers])
        self.held = seg([lp.held_bytes_per_sample for lp in layers]) * b
        # Integer sums (exact in float64 below 2**53), as costmodel's sum() of ints.
        params = np.zeros((count + 1, count + 1))
        opt = np.zeros((count + 1, count + 1))
        for i in range(count):
            params[i, i + 1:] = np.cumsum(np.array([lp.param_bytes for lp in layers[i:]], dtype=np.int64))
            opt[i, i + 1:] = np.cumsum(np.array([lp.optimizer_bytes for lp in layers[i:]], dtype=np.int64))
        self.params, self.opt = params, opt
        self.cross = np.array([prof.input_bytes_per_sample * b] + [lp.output_bytes_per_sample * b for lp in layers])
        # The gradient crossing back over each cut (none into the model's input).
        self.gcross = np.array([0.0] + [lp.gradient_bytes_per_sample * b for lp in layers])
        self.target = prof.target_bytes_per_sample * b

        # The options of a stage: (tier, replicas, sync); one sync where there are no replicas.
        tiers = problem.tiers
        # Coarse (the narrow pass's): replica counts that are powers of two, the first all-reduce.
        opts = [(t, d, v) for t in range(len(tiers)) for d in range(1, problem.max_replicas + 1)
                for v in (range(len(problem.syncs)) if d > 1 and not coarse else range(1))
                if not coarse or d & (d - 1) == 0]
        self.opts = opts
        self.o_tier = np.array([t for t, _, _ in opts], dtype=np.int64)
        self.o_d = np.array([d for _, d, _ in opts], dtype=np.float64)
        self.o_v = np.array([v for _, _, v in opts], dtype=np.int64)
        self.o_four = np.array([problem.syncs[v] == "four_phase" for _, _, v in opts])
        self.o_n = np.array([-(-m // d) for _, d, _ in opts], dtype=np.float64)
        self.o_nmin = np.array([m // d for _, d, _ in opts], dtype=np.float64)
        self.o_speed = np.array([tiers[t].speed for t, _, _ in opts])
        self.o_up = np.array([tiers[t].uplink_mb_s * MB_RATE for t, _, _ in opts])
        self.o_down = np.array([tiers[t].downlink_mb_s * MB_RATE for t, _, _ in opts])
        self.o_cap = np.array([tiers[t].memory_mb * MIB + memory_slack_bytes for t, _, _ in opts])
        self.tier_price = np.array([plat.price_per_s(t) for t in tiers])
        self.o_price = self.o_d * self.tier_price[self.o_tier]
        self.put, self.get = plat.price_per_put, plat.price_per_get
        self.base_req = 2 * m * self.put + 2 * m * self.get
        self._cache: dict[int, _Column] = {}
        # Keep every column when the tables are small: a column holds about 30 arrays of
        # (starts x options) floats.
        self._cacheable = count * count / 2 * len(opts) * 30 * 8 < CACHE_BYTES
        self._rest: tuple[Array, Array, Array, Array, float] | None = None

    # -- columns ----------------------------------------------------------------------

    def cached(self, j: int) -> _Column:
        """:meth:`column`, kept for the next pass when the tables are small enough."""
        col = self._cache.get(j)
        if col is None:
            col = self.column(j)
            if self._cacheable:
                self._cache[j] = col
        return col

    def rest_time(self) -> tuple[Array, Array, Array, Array, float]:
        """Lower bounds on what stages from a cut ``j`` on add (see :meth:`_Search._time_bound`):
        ``rest_e[j] <= e[s+1] - a[s+1] + u[s+1]``, ``rest_b[j] <= B[s+1] - a[s+1] + u[s+1]``
        and ``rest_d`` (as ``rest_e`` less the Δ of the stage before), over every sequence of
        stages that fit, by the recursions of e and B without their Δ, B (for e) and
        next-input terms (all non-negative); ``rest_t[r, j] <= max_t (e_t + L_t) - a[s+1]`` over
        the stages ``t`` of every sequence of at most ``r`` stages (each stage's own last
        backward and tail, after the first inputs of the stages before it); and the least sum
        of replica prices of a plan. Computed once, by a sweep from the end."""
        if self._rest is not None:
            return self._rest
        count = self.count
        inf = np.inf
        rest_e = np.full(count + 1, inf)
        rest_b = np.full(count + 1, inf)
        rest_d = np.full(count + 1, inf)
        rest_r = np.full(count + 1, inf)
        stages = self.p.max_stages
        rest_t = np.full((stages + 1, count + 1), inf)  # rest_t[0] = inf: no stage left
        col = self.cached(count)
        ok = col.ok
        k_last = np.maximum(col.K, col.A1 + col.g)
        rest_t[1:, :count] = np.where(ok, k_last + col.tail, inf).min(axis=1)[None, :]
        rest_e[:count] = np.where(ok, col.u + k_last, inf).min(axis=1)
        rest_b[:count] = np.where(ok, col.u + col.G, inf).min(axis=1)
        rest_d[:count] = np.where(ok, col.u + col.a2 + col.g, inf).min(axis=1)
        rest_r[:count] = np.where(ok, col.price, inf).min(axis=1)
        for j2 in range(count - 1, 0, -1):
            if not np.isfinite(rest_r[j2]):
                continue
            col = self.cached(j2)
            chain = col.inc + col.Dg
            e_val = col.u + np.maximum(col.K, chain + rest_e[j2])
            b_val = col.u + np.maximum(col.G, chain + rest_b[j2])
            d_val = col.u + np.maximum(col.a2 + col.Kx, chain + rest_d[j2])
            rest_e[:j2] = np.minimum(rest_e[:j2], np.where(col.ok, e_val, inf).min(axis=1))
            rest_b[:j2] = np.minimum(rest_b[:j2], np.where(col.ok, b_val, inf).min(axis=1))
            rest_d[:j2] = np.minimum(rest_d[:j2], np.where(col.ok, d_val, inf).min(axis=1))
            rest_r[:j2] = np.minimum(rest_r[:j2], np.where(col.ok, col.price + rest_r[j2], inf).min(axis=1))
            t_val = np.maximum((col.K + col.tail)[None], col.inc[None] + rest_t[:-1, j2, None, None])  # [r-1, i, o]
            rest_t[1:, :j2] = np.minimum(rest_t[1:, :j2], np.where(col.ok[None], t_val, inf).min(axis=2))
        self._rest = (rest_e, rest_b, rest_d, rest_t, float(rest_r[0]))
        return self._rest


    def column(self, j: int) -> _Column:
        """The stages ``[i, j)`` for every ``i < j`` (the last stage when ``j`` is the model's end)."""
        count, lat = self.count, self.lat
        last = j == count
        i_idx = np.arange(j)
        first = (i_idx == 0)[:, None]
        speed, up, down = self.o_speed[None, :], self.o_up[None, :], self.o_down[None, :]
        n, d = self.o_n[None, :], self.o_d[None, :]
        f = self.fsum[:j, j][:, None] / speed
        g = self.gsum[:j, j][:, None] / speed
        upd = self.usum[:j, j][:, None] / speed
        cross_i = self.cross[:j][:, None]
        dn_in = cross_i / down + lat
        u = np.where(first, 0.0, self.gcross[:j][:, None] / up + lat)  # this stage's input-gradient upload
        p = self.params[:j, j][:, None]

        # The all-reduce's bounds, as funcpipe.costmodel.sync_bounds (same operations, vectorised).
        chunk = p / d
        four = ((d - 1) * (chunk / up + lat) + (d - 1) * (chunk / down + lat) + (chunk / up + lat)
                + (d - 1) * (chunk / down + lat))
        largest = np.ceil(p / d)  # exact: -(-P // d) for P < 2**53
        pieces = np.maximum(1.0, np.minimum(MAX_PIECES, np.ceil(largest / PIECE_BYTES)))
        piece = p / d / pieces
        u_p = piece / up + lat
        dn_p = piece / down + lat
        after_upload = np.maximum(np.maximum(d * pieces * u_p + dn_p, ((d - 1) * pieces + 1) * u_p + 2 * dn_p),
                                  u_p + 2 / d * p / down + lat)
        after_backward = np.maximum(2 * (d - 1) / d * p / down + lat,
                                    (d - 1) / 2 * pieces * lat + (d - 1) / (2 * d) * p / down)
        after_all = np.maximum(np.maximum(
            np.maximum(d * pieces * u_p, (d - 1) * pieces * u_p + u_p + dn_p) + (d - 1) * piece / down + lat,
            u_p + 2 * (d - 1) / d * p / down + lat),
            ((d - 1) * pieces + 1) * u_p + (d - 1) / d * p / down + lat)
        four_phase = self.o_four[None, :]
        synced = (d > 1) & (p > 0)  # the simulator skips an empty all-reduce
        after_upload = np.where(four_phase, four, after_upload)
        after_backward = np.where(four_phase, 0.0, after_backward)
        after_all = np.where(four_phase, 0.0, after_all)
        q = np.where(four_phase, 1.0, pieces)
        tail = np.maximum(upd, u)
        tail = np.where(synced, np.maximum(np.maximum(tail, u + after_upload + upd), after_backward + upd), tail)
        # Every replica's last backward ends no earlier than with the fewest micro-batches, n_min;
        # the all-reduce's third bound runs from there (relative to the stage's first input).
        n_min = self.o_nmin[None, :]
        k1 = dn_in + (self.target / down + lat if last else 0.0)
        dn_grad_j = 0.0 if last else self.gcross[j] / down + lat
        e_min = np.maximum(k1 + n_min * (f + g), n_min * (k1 + dn_grad_j) + g)
        min_tail = np.where(synced, e_min + u + after_all + upd, -np.inf)
        sync_writes = np.where(synced, d * d * q, 0.0)
        sync_reads = np.where(synced, d * 2 * (d - 1) * q, 0.0)
        price = np.broadcast_to(self.o_price[None, :], f.shape)
        work_usd = self.m * (f + g) * self.tier_price[self.o_tier][None, :]

        grad_j = 0.0 if last else self.gcross[j]

        def memory(activations: Any, inputs: Any, grads: Any, targets: Any, output: Any) -> Array:
            need: Array = np.ceil(costmodel.memory_terms(
                self.p.platform, param_bytes=p, optimizer_bytes=self.opt[:j, j][:, None],
                held_bytes=self.held[:j, j][:, None], input_bytes=cross_i, output_bytes=output,
                target_bytes=self.target if last else 0.0, replicas=d, activations=activations,
                inputs=inputs, grads=grads, targets=targets, grad_bytes=grad_j))
            return need

        cap = self.o_cap[None, :]
        if last:
            if self.gpipe:
                need = memory(1.0, n, 0.0, n, 0.0)
            else:
                need = memory(np.minimum(n, 1.0), np.minimum(n, 2.0), 0.0, np.minimum(n, 2.0), 0.0)
            ok = need <= cap
            a1 = np.maximum(k1 + n * f, n * k1 + f)
            kk = np.maximum(k1 + n * (f + g), n * k1 + g)
            report = REPORT_BYTES / up + lat
            full_tail = tail + report
            req = (sync_writes + d) * self.put + (sync_reads + d) * self.get + 0.0 * f
            return _Column(
                ok=ok, u=u, a2=dn_in + f, A1=a1, K=kk, g=g + 0.0 * n, G=k1 + f + g + 0.0 * n, tail=full_tail,
                Y=min_tail + report,
                price=price, req=req, d=d + 0.0 * f, time_alone=np.maximum(kk, a1 + g) + full_tail,
                work_usd=work_usd,
            )
        cross_j = self.cross[j]
        dn_grad = self.gcross[j] / down + lat
        up_out = cross_j / up + lat
        out_b = cross_j + 0.0 * f
        if self.gpipe:
            ok = memory(n, n, n, 0.0, out_b) <= cap
            wcap = np.full(f.shape, NO_LIMIT)
        else:
            ok, wcap = self._window(memory, n, d, out_b, cap)
        a1 = np.maximum(dn_in + n * f, n * dn_in + f)
        # Replica 0's last forward (F0) carries the upstream wave only when the stage has one replica.
        alone = d == 1
        if self.gpipe:
            kk = np.maximum(np.maximum(dn_in + n * (f + g), a1 + n * g), n * (dn_in + dn_grad) + g)
            kx = np.where(alone, n * g, g)
            gg = np.maximum(np.maximum(a1 + g, dn_in + f + n * up_out), a1 + up_out)
            gx: Array | None = np.where(alone, np.maximum(g, up_out), -np.inf)
            z: Array | None = None
        else:
            kk = np.maximum(np.maximum(dn_in + n * (f + g), a1 + g), n * (dn_in + dn_grad) + g)
            kx = g + 0.0 * n
            gg = dn_in + f + g + 0.0 * n
            gx = None
            z = dn_in + f + n * (up_out + u)
        req = (2 * self.m + sync_writes) * self.put + (2 * self.m + sync_reads) * self.get + 0.0 * f
        return _Column(
            ok=ok, wcap=wcap, u=u, a2=dn_in + f, K=kk, Kx=kx, G=gg, Gx=gx, Z=z, tail=tail, Y=min_tail,
            Dg=dn_grad + g, w=(n - 1) * np.maximum(g, dn_grad), dl=np.maximum((n - 1) * up_out, a1 - dn_in - f),
            inc=dn_in + f + up_out, price=price, req=req, d=d + 0.0 * f, time_alone=kk + tail, work_usd=work_usd,
        )

    @staticmethod
    def _window(memory: Any, n: Array, d: Array, out_b: Array, cap: Array) -> tuple[npt.NDArray[np.bool_], Array]:
        """1F1B, a stage that is not the last: whether it fits with one micro-batch in flight, and the
        most workers the stages after it may have (``W_{s+1} <= (k_max - 1) d`` unless every one fits)."""
        shape = out_b.shape
        n = np.broadcast_to(n, shape)
        full = memory(n, n, np.minimum(n, 1.0), 0.0, out_b) <= cap

        def fits(k: Array) -> npt.NDArray[np.bool_]:
            ok: npt.NDArray[np.bool_] = memory(k, np.minimum(n, k + 1), np.minimum(n, 1.0), 0.0, out_b) <= cap
            return ok

        # memory(k) is linear in k below n: estimate the largest k that fits, then correct the
        # estimate by whole steps against the exact function (float rounding).
        m0 = memory(0.0, 1.0, 1.0, 0.0, out_b)
        m1 = memory(1.0, 2.0, 1.0, 0.0, out_b)
        slope = np.maximum(m1 - m0, 1.0)
        k = np.clip(np.floor((cap - m0) / slope), 0.0, np.maximum(n - 1, 0.0))
        for _ in range(2):
            up_ok = (k + 1 <= n - 1) & fits(k + 1)
            k = np.where(up_ok, k + 1, k)
            down = (k >= 1) & ~fits(np.maximum(k, 1.0))
            k = np.where(down, k - 1, k)
        ok = full | (k >= 1)
        wcap = np.where(full, NO_LIMIT, (k - 1) * d)
        return ok, wcap


# Coordinates of a label.
A, DL, C, PI, RHO, K, SG, R, W, ND = range(10)
NCOORD = 10


class _Labels:
    """Labels at one cut: coordinates (rows) and back-pointers."""

    __slots__ = ("opt", "parent_cut", "parent_row", "vals")

    def __init__(self, vals: Array, parent_cut: IntArray, parent_row: IntArray, opt: IntArray) -> None:
        self.vals, self.parent_cut, self.parent_row, self.opt = vals, parent_cut, parent_row, opt


def _pareto(vals: Array) -> IntArray:
    """Rows of ``vals`` no other row is at most in every coordinate (one of equal rows kept).

    In order of the coordinates' sum: the first remaining row is dominated by no other
    (a row at most another in every coordinate has at most its sum, floats included);
    keep it and drop every row it dominates.
    """
    order = np.argsort(vals.sum(axis=1), kind="stable")
    rest = vals[order]
    kept: list[int] = []
    while len(order):
        kept.append(int(order[0]))
        alive = ~(rest[0] <= rest).all(axis=1)
        order, rest = order[alive], rest[alive]
    return np.array(kept, dtype=np.int64)


def optimum(problem: Problem, objective: str | tuple[float, float], *, deadline_s: float | None = None,
            budget_usd: float | None = None, gap: float = 0.0, invocations: bool = True,
            time_limit_s: float = math.inf, memory_slack_bytes: float = 0.0, incumbent: float = math.inf,
            alternatives: int = 0) -> Optimum | None:
    """The plan with the smallest formula value, or ``None`` when no plan fits (or meets the limits).

    Args:
        problem: the planner's problem (profile, platform, tiers, micro-batch, schedule, limits).
        objective: ``"time"`` (iteration seconds), ``"cost"`` (dollars per iteration), or
            ``(time_weight, cost_weight)``: minimise ``time_weight * seconds + cost_weight * dollars``.
        deadline_s: the most iteration seconds a plan may take by the formula.
        budget_usd: the most dollars an iteration may cost by the formula.
        gap: 0 for the optimum; else stop proving below ``best / (1 + gap)``: the plan is
            then within ``gap`` of :attr:`Optimum.bound`, a proven lower bound.
        invocations: with ``False``, cost leaves out the invocation fee (as the CP-SAT model does).
        time_limit_s: wall seconds after which to give up.
        memory_slack_bytes: let stages exceed their tier by this much (a relaxation: the
            bound is then a lower bound over more plans, and the plan may not fit,
            :attr:`Optimum.fits`).
        incumbent: the objective of a plan known from elsewhere: look only for better ones
            (the result has no candidate, and its bound, when none is).
        alternatives: also return up to this many other plans the search completes.

    Raises:
        TimeoutError: the search took longer than ``time_limit_s``.
    """
    if objective == "time":
        weights = (1.0, 0.0)
    elif objective == "cost":
        weights = (0.0, 1.0)
    elif isinstance(objective, tuple) and len(objective) == 2 and min(objective) >= 0 and max(objective) > 0:
        weights = (float(objective[0]), float(objective[1]))
    else:
        raise ValueError(f"objective must be 'time', 'cost' or (time_weight, cost_weight), got {objective!r}")
    goal = _Goal(weights[0], weights[1], deadline_s, budget_usd, invocations)
    started = time.perf_counter()
    tab = _Tables(problem, memory_slack_bytes)
    give_up = started + time_limit_s
    # A narrow pass first (the best few labels per cut): a good incumbent prunes the exact pass,
    # and the plans it completes are the alternatives (the exact pass keeps only the best, so
    # that it prunes as hard as it can).
    # It runs to the end whatever the time limit (a beam of labels per cut: fractions of a second),
    # so that out of time there is a plan.
    # On deep models with many options it keeps fewer labels, over fewer options (_Tables coarse).
    count, options = problem.profile.num_layers, len(tab.opts)
    coarse = count * options > COARSE_ABOVE
    narrow_tab = _Tables(problem, memory_slack_bytes, coarse=True) if coarse else tab
    beam = max(4, int(BEAM * min(1.0, 100 / count))) if coarse else BEAM
    narrow = _Search(problem, narrow_tab, goal, math.inf, keep=1 + max(0, alternatives), incumbent=incumbent,
                     beam=beam)
    narrow.run()
    seeds = sorted(narrow.found, key=lambda pair: pair[0])
    proven = True
    try:
        search = _Search(problem, tab, goal, give_up, keep=1, incumbent=incumbent, gap=gap, found=seeds[:1])
        search.run()
        bound = search.threshold()
    except TimeoutError:
        if not narrow.found and not math.isfinite(incumbent):
            raise
        search, proven, bound = narrow, False, 0.0
    seconds = time.perf_counter() - started
    if not search.found:
        if math.isfinite(incumbent):
            return Optimum(None, math.inf, bound, math.nan, math.nan, seconds, search.kept, proven=proven)
        return None
    others = [pair for pair in seeds if pair[1] not in {c for _, c in search.found}]
    found = sorted(search.found, key=lambda pair: pair[0]) + others[:max(0, alternatives)]
    value_rows = []
    for value, candidate in found:
        plan = candidate.to_plan(problem)
        try:
            stages = costmodel.stage_costs(problem.profile, problem.platform, plan)
        except PlanInfeasible:  # only with memory_slack_bytes: the program's own values
            value_rows.append((value, candidate, math.nan, math.nan, False))
            continue
        secs = costmodel.formula_iteration_s(stages, problem.platform, plan, windows=False)
        dollars = costmodel.cost_per_iteration(secs, stages, plan, problem.platform)
        if not invocations:
            writes, reads = costmodel.requests_per_iteration(stages, plan)
            plat = problem.platform
            dollars = (secs * sum(st.replicas * plat.price_per_s(st.tier) for st in stages)
                       + writes * plat.price_per_put + reads * plat.price_per_get)
        value_rows.append((goal.time_weight * secs + goal.cost_weight * dollars, candidate, secs, dollars, True))
    best_value, best, secs, dollars, fits = value_rows[0]
    # Every plan the exact pass did not complete had a bound at or above the threshold it was
    # pruned at, which only falls as better plans are found: at or above the final one.
    bound = best_value if proven and gap == 0 else min(best_value, bound)  # proven optimal: exactly its value
    rest = tuple((v, c) for v, c, *_ in value_rows[1:])
    return Optimum(best, best_value, bound, secs, dollars, seconds, search.kept, fits, rest, proven)


class _Search:
    def __init__(self, problem: Problem, tab: _Tables, goal: _Goal, give_up: float, *, keep: int,
                 incumbent: float, beam: int | None = None, gap: float = 0.0,
                 found: list[tuple[float, Candidate]] | None = None) -> None:
        self.p, self.tab, self.goal, self.beam = problem, tab, goal, beam
        self.give_up, self.gap, self.keep = give_up, gap, keep
        self.incumbent = incumbent
        inf = math.inf
        self.deadline = inf if goal.deadline_s is None else goal.deadline_s * (1 + LIMIT_SLACK)
        self.budget = inf if goal.budget_usd is None else goal.budget_usd * (1 + LIMIT_SLACK)
        self.cost = goal.tracks_cost
        # The best completions so far, as a max-heap of (-value, seq, candidate).
        self._heap: list[tuple[float, int, Candidate]] = []
        self._seq = 0
        for value, candidate in found or []:
            self._offer(value, candidate)
        self.kept = 0
        self.labels: list[_Labels | None] = [None] * (tab.count + 1)
        self.rest_e, self.rest_b, self.rest_d, self.rest_t, self.least_price = tab.rest_time()
        self._prepare_cost()

    @property
    def found(self) -> list[tuple[float, Candidate]]:
        return [(-v, c) for v, _, c in self._heap]

    def _offer(self, value: float, candidate: Candidate) -> None:
        if value >= self.incumbent:
            return
        if any(c == candidate for _, _, c in self._heap):
            return
        heapq.heappush(self._heap, (-value, self._seq, candidate))
        self._seq += 1
        if len(self._heap) > self.keep:
            heapq.heappop(self._heap)

    def threshold(self) -> float:
        """Labels whose bound is at least this cannot improve what is kept."""
        worst = -self._heap[0][0] if len(self._heap) >= self.keep else math.inf
        return min(worst, self.incumbent) / (1 + self.gap)

    def _col(self, j: int) -> _Column:
        return self.tab.cached(j)

    # -- bounds -------------------------------------------------------------------

    def _prepare_cost(self) -> None:
        """The least dollars of the stages from each cut on, on a geometric grid of iteration seconds
        up to the longest a plan better than the threshold (or within the deadline, budget) can take."""
        tab, goal = self.tab, self.goal
        count = tab.count
        self.grid = np.zeros(1)
        if not self.cost:
            self.rest = np.zeros((1, count + 1))
            return
        least = self.least_price
        top = math.inf
        best = min(self.threshold() * (1 + self.gap), self.incumbent)
        if math.isfinite(best) and least > 0:
            if goal.cost_weight > 0:
                top = min(top, best / (goal.cost_weight * least))
            if goal.time_weight > 0:
                top = min(top, best / goal.time_weight)
        if goal.budget_usd is not None and least > 0:
            top = min(top, goal.budget_usd / least)
        if goal.deadline_s is not None:
            top = min(top, goal.deadline_s)
        levels = [0.0]
        # The narrow pass, which must finish, prices the rest at one level (a weaker bound, cheap).
        if math.isfinite(top) and top > 0 and self.beam is None:
            levels += list(np.geomspace(top / SPAN, top, GRID))
        self.grid = np.array(levels)
        self.rest = self._rest_usd(self.grid)

    def _rest_usd(self, levels: Array) -> Array:
        """``[k, j]``: the least dollars stages from cut ``j`` to the end cost in an iteration of
        ``levels[k]`` to ``levels[k+1]`` seconds (``inf`` for ``k`` last): per stage
        ``max(levels[k] d price, M (f + g) price)`` plus its requests, over the stages whose own lower
        bound on the iteration (``time_alone``) is below ``levels[k+1]``."""
        tab = self.tab
        count = tab.count
        tops = np.append(levels[1:], np.inf)
        rest = np.full((len(levels), count + 1), np.inf)
        rest[:, count] = 0.0

        def stage_usd(col: _Column) -> Array:
            usd = np.maximum(levels[:, None, None] * col.price[None], col.work_usd[None]) + col.req[None]
            ok = col.ok[None] & (col.time_alone[None] < tops[:, None, None])
            out: Array = np.where(ok, usd, np.inf).min(axis=2)  # [k, i]
            return out

        col = tab.cached(count)
        rest[:, :count] = stage_usd(col)
        for j2 in range(count - 1, 0, -1):
            if time.perf_counter() > self.give_up:
                raise TimeoutError("the dynamic program ran out of time")
            col = tab.cached(j2)
            rest[:, :j2] = np.minimum(rest[:, :j2], stage_usd(col) + rest[:, j2:j2 + 1])
        return rest

    def _bound(self, vals: Array, cut: int) -> Array:
        """A lower bound on the objective of every plan that completes labels at ``cut`` (not the end)."""
        goal = self.goal
        seconds = self._time_bound(vals, cut)
        if not self.cost:
            return goal.time_weight * seconds
        usd = self._cost_levels(vals, seconds, cut)
        tops = np.append(self.grid[1:], np.inf)
        lvl = np.maximum(self.grid[None, :], seconds[:, None])
        value = (goal.cost_weight * usd if goal.cost_weight > 0 else 0.0) + (
            goal.time_weight * lvl if goal.time_weight > 0 else 0.0)
        value = np.where(tops[None, :] > seconds[:, None], value, np.inf)
        bound: Array = value.min(axis=1)
        return bound

    def _cost_levels(self, vals: Array, seconds: Array, cut: int) -> Array:
        """``[row, k]``: the least dollars of a completion whose iteration lies at level ``k``."""
        lvl = np.maximum(self.grid[None, :], seconds[:, None])
        usd: Array = lvl * vals[:, R, None] + self.rest[None, :, cut] + vals[:, W, None] + self.tab.base_req
        return usd

    def _cost_bound(self, vals: Array, seconds: Array, cut: int) -> Array:
        tops = np.append(self.grid[1:], np.inf)
        usd = self._cost_levels(vals, seconds, cut)
        usd = np.where(tops[None, :] > seconds[:, None], usd, np.inf)
        out: Array = usd.min(axis=1)
        return out

    def _time_bound(self, vals: Array, cut: int) -> Array:
        """A lower bound on the iteration seconds of every plan that completes labels at ``cut``.

        The iteration is at least ``C``, ``e[s+1] + P`` and ``B[s+1] + Q`` with ``P = π + u``
        and ``Q >= ρ + u`` (``u`` the next stage's input-gradient upload).
        """
        left = np.clip(self.p.max_stages - vals[:, K], 0, self.p.max_stages).astype(np.int64)  # stages still allowed
        bound: Array = np.maximum(np.maximum(vals[:, C], vals[:, A] + vals[:, PI] + self.rest_e[cut]),
                                  np.maximum(vals[:, A] + vals[:, RHO] + self.rest_b[cut],
                                             vals[:, A] + vals[:, DL] + vals[:, PI] + self.rest_d[cut]))
        bound = np.maximum(bound, vals[:, A] + self.rest_t[left, cut])
        return bound

    # -- the program ---------------------------------------------------------------

    def run(self) -> None:
        tab = self.tab
        count = tab.count
        start = np.zeros((1, NCOORD))
        start[0, [DL, C, PI, RHO]] = -np.inf
        start[0, SG] = -NO_LIMIT
        self.labels[0] = _Labels(start, np.array([-1]), np.array([-1]), np.array([-1]))
        for j in range(1, count + 1):
            if time.perf_counter() > self.give_up:
                raise TimeoutError("the dynamic program ran out of time")
            src_cut, src_row, vals = self._sources(j, last=j == count)
            if vals is None:
                continue
            if j == count:
                self._finish(src_cut, src_row, vals)
            else:
                self._extend(j, src_cut, src_row, vals)

    def _sources(self, j: int, last: bool) -> tuple[IntArray, IntArray, Array | None]:
        cuts, rows, vals = [], [], []
        room = self.p.max_stages - (1 if last else 2)  # stages a source may have used
        for i in range(j):
            lab = self.labels[i]
            if lab is None or not len(lab.vals):
                continue
            idx = np.flatnonzero(lab.vals[:, K] <= room)
            if not len(idx):
                continue
            cuts.append(np.full(len(idx), i))
            rows.append(idx)
            vals.append(lab.vals[idx])
        if not vals:
            return np.empty(0, np.int64), np.empty(0, np.int64), None
        return np.concatenate(cuts), np.concatenate(rows), np.concatenate(vals)

    def _step(self, col: _Column, src_cut: IntArray, vals: Array, last: bool) -> tuple[dict[str, Array], Any]:
        """The new stage ``[i, j)`` for every source label and every option: ``[N, O]`` arrays."""
        i = src_cut
        v = vals[:, :, None]  # [N, coord, 1]
        u = col.u[i]  # [N, O]
        n = self.tab.o_n[None, :]
        pp = v[:, PI] + u
        qq = np.maximum(v[:, RHO] + u, v[:, PI] + n * u)
        x = v[:, DL] + col.a2[i]
        out: dict[str, Array] = {}
        ok = col.ok[i]
        if last:
            tail = col.tail[i]
            fw = np.maximum(col.A1[i], x)
            kappa = np.maximum(col.K[i], fw + col.g[i])
            ppt = np.maximum(pp, tail)
            out["T"] = np.maximum(np.maximum(np.maximum(v[:, C], v[:, A] + kappa + ppt), v[:, A] + col.G[i] + qq),
                                  v[:, A] + col.Y[i])
            # 1F1B's window: the workers from the cut on (this stage's) within what the stages before allow.
            ok = ok & (-v[:, SG] >= col.d[i])
        else:
            tail = col.tail[i]
            kappa = np.maximum(col.K[i], x + col.Kx[i])
            gamma = col.G[i] if col.Gx is None else np.maximum(col.G[i], x + col.Gx[i])
            ppt = np.maximum(pp, tail)
            a = v[:, A]
            c_new = np.maximum(np.maximum(np.maximum(v[:, C], a + kappa + ppt), a + gamma + qq), a + col.Y[i])
            if col.Z is not None:
                c_new = np.maximum(c_new, a + v[:, PI] + col.Z[i])
            out["C"] = c_new
            dg = col.Dg[i]
            out["PI"] = dg + ppt
            out["RHO"] = np.maximum(out["PI"] + col.w[i], dg + qq)
            out["A"] = a + col.inc[i]
            out["DL"] = np.maximum(col.dl[i], v[:, DL])
            # σ' = min(σ - d, this stage's cap); "no limit" stays no limit (GPipe: always).
            unlimited = v[:, SG] <= -NO_LIMIT / 2
            sg = np.where(unlimited, -col.wcap[i], np.maximum(v[:, SG] + col.d[i], -col.wcap[i]))
            out["SG"] = sg
            ok = ok & (sg <= -1.0)  # at least one worker after the cut
        out["R"] = v[:, R] + col.price[i]
        out["W"] = v[:, W] + col.req[i]
        out["ND"] = v[:, ND] + col.d[i]
        return out, ok

    def _value(self, seconds: Array, price: Array, req: Array, replicas: Array) -> tuple[Array, Array]:
        """(objective, dollars) of completed plans."""
        goal = self.goal
        if not self.cost:
            return goal.time_weight * seconds, np.zeros_like(seconds)
        plat = self.p.platform
        per_invocation = np.maximum(1.0, np.floor(plat.lifetime_s / np.maximum(seconds, 1e-9)))
        fee = replicas * plat.price_per_invocation / per_invocation if goal.invocations else 0.0
        dollars = seconds * price + req + self.tab.base_req + fee
        return goal.time_weight * seconds + goal.cost_weight * dollars, dollars

    def _finish(self, src_cut: IntArray, src_row: IntArray, vals: Array) -> None:
        col = self._col(self.tab.count)
        out, ok = self._step(col, src_cut, vals, last=True)
        seconds = out["T"]
        value, dollars = self._value(seconds, out["R"], out["W"], out["ND"])
        ok = ok & (seconds <= self.deadline) & (dollars <= self.budget)
        value = np.where(ok, value, np.inf)
        order = np.argsort(value, axis=None)
        for flat in order:
            if not np.isfinite(value.flat[flat]) or value.flat[flat] >= self.threshold() * (1 + self.gap):
                break
            row, o = np.unravel_index(flat, value.shape)
            candidate = self._plan(int(src_cut[row]), int(src_row[row]), int(o))
            if self._meets_limits(candidate):
                self._offer(float(value.flat[flat]), candidate)

    def _meets_limits(self, candidate: Candidate) -> bool:
        goal = self.goal
        if goal.deadline_s is None and goal.budget_usd is None:
            return True
        p = self.p
        plan = candidate.to_plan(p)
        stages = costmodel.stage_costs(p.profile, p.platform, plan)
        seconds = costmodel.formula_iteration_s(stages, p.platform, plan, windows=False)
        if goal.deadline_s is not None and seconds > goal.deadline_s:
            return False
        if goal.budget_usd is None:
            return True
        return costmodel.cost_per_iteration(seconds, stages, plan, p.platform) <= goal.budget_usd

    def _extend(self, j: int, src_cut: IntArray, src_row: IntArray, vals: Array) -> None:
        col = self._col(j)
        out, ok = self._step(col, src_cut, vals, last=False)
        shape = ok.shape
        cols = [out["A"], out["DL"], out["C"], out["PI"], out["RHO"],
                np.broadcast_to(vals[:, K, None] + 1, shape), out["SG"], out["R"], out["W"], out["ND"]]
        if not self.cost:
            cols[R] = cols[W] = cols[ND] = np.zeros(shape)
        new = np.stack([np.broadcast_to(c, shape) for c in cols], axis=-1).reshape(-1, NCOORD)
        rows = np.flatnonzero(ok.reshape(-1))
        new = new[rows]
        seconds = self._time_bound(new, j)
        alive = np.isfinite(seconds) & (seconds <= self.deadline)  # inf: nothing after the cut fits
        if self.goal.budget_usd is not None:
            alive &= self._cost_bound(new, seconds, j) <= self.budget
        rows, new, seconds = rows[alive], new[alive], seconds[alive]
        bound = self._bound(new, j)
        alive = bound < self.threshold()
        rows, new, bound = rows[alive], new[alive], bound[alive]
        if self.beam is not None and len(new) > 8 * self.beam:
            keep = np.argpartition(bound, 8 * self.beam)[:8 * self.beam]
            rows, new, bound = rows[keep], new[keep], bound[keep]
        keep = _pareto(new if self.cost else new[:, :SG + 1])
        rows, new, bound = rows[keep], new[keep], bound[keep]
        if self.beam is not None and len(new) > self.beam:
            keep = np.argsort(bound, kind="stable")[:self.beam]
            rows, new = rows[keep], new[keep]
        row, o = np.unravel_index(rows, shape)
        self.labels[j] = _Labels(new, src_cut[row], src_row[row], o.astype(np.int64))
        self.kept += len(new)

    def _plan(self, cut: int, row: int, o: int) -> Candidate:
        """Follow the back-pointers from a last stage ``[cut, L)`` with option ``o``."""
        tiers, tab = self.p.tiers, self.tab
        bounds = [tab.count, cut]
        opts = [o]
        while cut > 0:
            lab = self.labels[cut]
            assert lab is not None
            opts.append(int(lab.opt[row]))
            cut, row = int(lab.parent_cut[row]), int(lab.parent_row[row])
            bounds.append(cut)
        bounds.reverse()
        opts.reverse()
        balance = tuple(bounds[k + 1] - bounds[k] for k in range(len(bounds) - 1))
        memory = tuple(tiers[tab.opts[x][0]].memory_mb for x in opts)
        replicas = tuple(tab.opts[x][1] for x in opts)
        syncs = self.p.syncs
        sync = tuple(syncs[tab.opts[x][2]] for x in opts) if len(syncs) > 1 else ()
        return Candidate(balance, memory, replicas, sync)
