"""An exact dynamic program over contiguous partitions: the planner's formula optimum.

It minimises the same objective as the CP-SAT model of :mod:`funcpipe.planner.model`,
the closed formula of :mod:`funcpipe.costmodel` (iteration seconds, or dollars per
iteration with an optional deadline on the seconds), over the cuts, 1 to
``max_stages`` stages, one tier and 1 to ``max_replicas`` replicas per stage, every
stage fitting its tier's memory. CP-SAT's LP bound is weak for contiguous
partitions; this program proves the optimum in seconds, and the planner hands it
to CP-SAT as a hint and as a lower bound.

**Why a left-to-right program works.** The formula is max-plus: every time is a
maximum of sums. Write ``a`` for the time stage ``s``'s first input is in storage and
``uo = a' + Δ`` for the time its last activation is up (``a'`` the next stage's
``a``); ``Δ`` is a running maximum of per-stage terms. Every forward time of stage
``s`` is ``a`` plus a maximum of constants of the stage and ``Δ`` of the stage
before. The backward recursion reaches stage ``s`` from stage ``s+1`` only
through ``e[s+1]`` (end of its last backward) and ``B[s+1] = max(b0, uo)[s+1]``:

    e[s] = max(κ_s, e[s+1] + c_s, B[s+1] + δ_s)        B[s] = max(γ_s, B[s+1] + c_s)
    c_s = u + D + g      δ_s = D + g + max(u + max((n-1) g, n D), n' u)

(``u``, ``n'`` the next stage's input-gradient upload and micro-batch count, ``D``,
``g``, ``n`` this stage's gradient download, backward and micro-batches), and the
iteration is ``max_s e[s] + L_s`` (``L_s`` the update, upload and sync tail). So the
part of the iteration fixed by stages ``0..s`` is ``max(C, e[s+1] + P, B[s+1] + Q)``
with ``P = π + u``, ``Q = max(ρ + u, π + n' u)``. A *label* at a cut holds
``(a, Δ, C, π, ρ)``, the stages used and, for cost, the sums of replica prices,
request dollars and replicas. Everything the rest of the pipeline adds is
non-decreasing in each coordinate, so a label no worse in every coordinate than
another at the same cut dominates it: the program keeps, at each cut, the labels
no other label dominates (exact: no approximation, no bucketing), and drops those
whose lower bound on any completion is no better than the incumbent.

The returned value is the formula of :mod:`funcpipe.costmodel` evaluated on the
returned plan (the program's own float arithmetic differs from it by rounding only).

**Speed.** For time the bounds are tight: the 100-layer benchmark profile (one
undominated Lambda tier, 8 stages, 8 replicas) takes about half a second. For cost
the bound on the rest of the pipeline is loose (it prices the remaining stages
without the pipeline time they add), so labels pile up in the middle of deep
models: 20 to 50 layers take under a second, the 100-layer profile about four
minutes (``gap=0.005`` does not change that). The planner gives the program a
share of its time limit and lets CP-SAT solve alone when it runs out.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import numpy.typing as npt

from funcpipe import costmodel
from funcpipe.collectives import MAX_PIECES, PIECE_BYTES
from funcpipe.errors import PlanInfeasible
from funcpipe.plan import Plan
from funcpipe.planner.model import Candidate, Problem
from funcpipe.platforms.base import MB_RATE, MIB

__all__ = ["Optimum", "optimum"]

Array = npt.NDArray[np.float64]
NEG = -np.inf
#: Slack on the deadline in the program's own arithmetic; plans this close to it are
#: checked with :mod:`funcpipe.costmodel` itself.
DEADLINE_SLACK = 1e-9
#: Labels per cut of the narrow first pass, which finds the incumbent.
BEAM = 16
#: Levels of the iteration seconds at which the cost bound of the rest is tabulated.
GRID = 64
#: The grid spans iteration seconds from its top divided by this to its top.
SPAN = 12.0


@dataclasses.dataclass(frozen=True)
class Optimum:
    """The formula's optimum: the plan, its formula values and what the search took."""

    candidate: Candidate
    value: float  # the objective: iteration seconds or dollars, by funcpipe.costmodel
    bound: float  # a proven lower bound on every plan's objective (= value when solved with gap 0)
    iteration_s: float
    cost_usd: float
    seconds: float
    labels: int  # labels kept over all cuts (the search's size)
    fits: bool = True  # False only with memory_slack_bytes: the plan needs more than its tier


class _Tables:
    """Per-stage constants of the formula for every segment ``[i, j)``, tier and replica count.

    Arrays are indexed ``[i, j, t, r]`` (``r = replicas - 1``). ``nl_*`` are for a stage that
    is not the last (``j < L``), ``ls_*`` for the last (``j == L``).
    """

    def __init__(self, problem: Problem, memory_slack_bytes: float = 0.0) -> None:
        prof, plat = problem.profile, problem.platform
        b = problem.micro_batch_size
        m = problem.num_micro_batches
        layers = prof.layers
        count = len(layers)
        tiers = problem.tiers
        lat = plat.latency_s
        self.count, self.m = count, m
        nt, nr = len(tiers), problem.max_replicas
        self.nt, self.nr = nt, nr

        def seg(values: list[float]) -> Array:
            # Sums over layers i..j-1 in the order funcpipe.costmodel adds them (sequentially from 0).
            out = np.zeros((count + 1, count + 1))
            arr = np.asarray(values, dtype=np.float64)
            for i in range(count):
                out[i, i + 1:] = np.cumsum(arr[i:])
            return out

        fsum = seg([lp.forward_s(b) for lp in layers])
        gsum = seg([lp.backward_s(b) for lp in layers])
        usum = seg([lp.update_s for lp in layers])
        held = seg([lp.held_bytes_per_sample for lp in layers]) * b
        params = [[0] * (count + 1) for _ in range(count + 1)]
        base = [[[0.0] * 2 for _ in range(count + 1)] for _ in range(count + 1)]  # memory without messages
        for i in range(count):
            p_acc = o_acc = 0
            for j in range(i + 1, count + 1):
                p_acc += layers[j - 1].param_bytes
                o_acc += layers[j - 1].optimizer_bytes
                params[i][j] = p_acc
                for with_sync in (0, 1):
                    sync_buffers = 2 * p_acc if with_sync else 0
                    base[i][j][with_sync] = plat.runtime_overhead_mb * MIB + 2 * p_acc + o_acc + sync_buffers
        pbytes = np.array(params, dtype=np.float64)
        cross = np.array([prof.input_bytes_per_sample * b] + [lp.output_bytes_per_sample * b for lp in layers])
        target = prof.target_bytes_per_sample * b

        speed = np.array([t.speed for t in tiers])
        up = np.array([t.uplink_mb_s * MB_RATE for t in tiers])
        down = np.array([t.downlink_mb_s * MB_RATE for t in tiers])
        cap = np.array([t.memory_mb * MIB + memory_slack_bytes for t in tiers], dtype=np.float64)
        reps = np.arange(1, nr + 1, dtype=np.float64)
        n = np.array([-(-m // d) for d in range(1, nr + 1)], dtype=np.float64)
        self.n = n

        # Shapes: I = [i, 1, 1, 1], J = [1, j, 1, 1], T = [1, 1, t, 1], R = [1, 1, 1, r].
        sh_i, sh_j = (count + 1, 1, 1, 1), (1, count + 1, 1, 1)
        sh_t, sh_r = (1, 1, nt, 1), (1, 1, 1, nr)
        n4 = n.reshape(sh_r)
        d4 = reps.reshape(sh_r)
        up4, down4, speed4 = up.reshape(sh_t), down.reshape(sh_t), speed.reshape(sh_t)
        seg4 = (count + 1, count + 1, 1, 1)
        f = fsum.reshape(seg4) / speed4
        g = gsum.reshape(seg4) / speed4
        upd = usum.reshape(seg4) / speed4
        cross_i = cross.reshape(sh_i)
        cross_j = cross.reshape(sh_j)
        first = (np.arange(count + 1) == 0).reshape(sh_i)
        dn_in = cross_i / down4 + lat
        u = np.where(first, 0.0, cross_i / up4 + lat)  # this stage's input-gradient upload
        self.u = np.broadcast_to(u[:, 0, :, 0], (count + 1, nt)).copy()  # [i, t]
        dn_grad = cross_j / down4 + lat
        up_out = cross_j / up4 + lat
        dn_tgt = target / down4 + lat
        report = costmodel.REPORT_BYTES / up4 + lat

        # The all-reduce, as funcpipe.costmodel.sync_s (same operations, vectorised).
        p4 = pbytes.reshape(seg4)
        if problem.sync == "four_phase":
            chunk = p4 / d4
            sync = ((d4 - 1) * (chunk / up4 + lat) + (d4 - 1) * (chunk / down4 + lat) + (chunk / up4 + lat)
                    + (d4 - 1) * (chunk / down4 + lat))
            pieces = np.ones_like(p4 * d4)
        else:
            largest = np.ceil(p4 / d4)  # exact: -(-P // d) for P < 2**53
            pieces = np.maximum(1.0, np.minimum(MAX_PIECES, np.ceil(largest / PIECE_BYTES)))
            upload = p4 / up4 + d4 * pieces * lat
            download = np.maximum(2 * (d4 - 1) / d4 * p4 / down4 + lat,
                                  (d4 - 1) / 2 * pieces * lat + (d4 - 1) / (2 * d4) * p4 / down4)
            piece = np.minimum(p4 / d4, PIECE_BYTES)
            sync = np.maximum(upload, download) + piece / up4 + piece / down4 + 2 * lat
        synced = (d4 > 1) & (p4 > 0)
        sync = np.where(synced, sync, 0.0)
        tail = np.maximum(upd, u)
        tail = np.where(d4 > 1, np.maximum(tail, u + sync + upd), tail)

        # Memory, as funcpipe.costmodel.memory_bytes (same order of operations).
        base_arr = np.array(base, dtype=np.float64)  # [i, j, synced]
        base4 = np.where(d4 > 1, base_arr[:, :, 1].reshape(seg4), base_arr[:, :, 0].reshape(seg4))
        held4 = held.reshape(seg4)
        valid_seg = (np.arange(count + 1).reshape(sh_i) < np.arange(count + 1).reshape(sh_j))
        nl_msg = cross_i + cross_j + 0.0
        ls_msg = cross_i + 0.0 + target
        nl_fit = np.ceil(base4 + n4 * (held4 + nl_msg)) <= cap.reshape(sh_t)
        ls_fit = np.ceil(base4 + n4 * (held4 + ls_msg)) <= cap.reshape(sh_t)
        last_j = (np.arange(count + 1) == count).reshape(sh_j)
        self.nl_ok = valid_seg & nl_fit & ~last_j
        self.ls_ok = valid_seg & ls_fit & last_j

        # Not last: k1 = dn_in.
        a1 = np.maximum(dn_in + n4 * f, n4 * dn_in + f)
        self.a2 = dn_in + f  # + Δ of the stage before: its last activation's wave
        self.nl_K = np.maximum(np.maximum(dn_in + n4 * (f + g), a1 + n4 * g), n4 * (dn_in + dn_grad) + g)
        self.nl_Kx = n4 * g  # κ's Δ term: Δ + a2 + n g
        self.nl_G = np.maximum(np.maximum(a1 + g, dn_in + f + n4 * up_out), a1 + up_out)
        self.nl_Gx = np.maximum(g, up_out)  # γ's Δ term: Δ + a2 + max(g, up_out)
        self.nl_dl = np.maximum((n4 - 1) * up_out, a1 - dn_in - f)
        self.nl_inc = dn_in + f + up_out
        self.nl_Dg = dn_grad + g
        self.nl_w = np.maximum((n4 - 1) * g, n4 * dn_grad)
        self.nl_tail = tail
        # Last: k1 = dn_in + dn_tgt, no gradient download, the report after the update.
        k1 = dn_in + dn_tgt
        self.ls_A1 = np.maximum(k1 + n4 * f, n4 * k1 + f)
        self.ls_K = np.maximum(k1 + n4 * (f + g), n4 * k1 + g)
        self.ls_g = g + 0.0 * n4
        self.ls_G = k1 + f + g + 0.0 * n4
        self.ls_tail = tail + report
        # What one stage alone forces on the iteration: its last backward and its tail.
        self.nl_time = self.nl_K + self.nl_tail
        self.ls_time = np.maximum(self.ls_K, self.ls_A1 + self.ls_g) + self.ls_tail

        # Cost: replica prices and request dollars per stage.
        prices = np.array([plat.price_per_s(t) for t in tiers])
        self.price = (d4 * prices.reshape(sh_t)) + 0.0 * p4
        sync_writes = np.where(synced, d4 * d4 * pieces, 0.0)
        sync_reads = np.where(synced, d4 * 2 * (d4 - 1) * pieces, 0.0)
        put, get = plat.price_per_put, plat.price_per_get
        self.nl_req = (2 * m + sync_writes) * put + (2 * m + sync_reads) * get
        self.ls_req = (sync_writes + d4) * put + (sync_reads + d4) * get + 0.0 * p4
        self.base_req = 2 * m * put + 2 * m * get
        self.d4 = d4

        # Lower bounds on what the rest adds after a cut at j (see _Search._time_bound):
        # rest_e[j] <= e[s+1] - a[s+1] + u[s+1] and rest_b[j] <= B[s+1] - a[s+1] + u[s+1] for
        # any stages s+1.. starting at j, by the recursions of e and B without the terms
        # in Δ, in B (for e) and in the next stages' inputs (all non-negative).
        rest_e = np.full(count + 1, np.inf)
        rest_b = np.full(count + 1, np.inf)
        rest_d = np.full(count + 1, np.inf)  # as rest_e, less the Δ of the stage before
        u3 = self.u[:, :, None]  # [i, t, 1]
        for j in range(count - 1, 0, -1):
            k_last = np.maximum(self.ls_K[j, count], self.ls_A1[j, count] + self.ls_g[j, count])
            e_best = np.min(np.where(self.ls_ok[j, count], u3[j] + k_last, np.inf), initial=np.inf)
            b_best = np.min(np.where(self.ls_ok[j, count], u3[j] + self.ls_G[j, count], np.inf), initial=np.inf)
            d_best = np.min(np.where(self.ls_ok[j, count], u3[j] + self.a2[j, count] + self.ls_g[j, count], np.inf),
                            initial=np.inf)
            for j2 in range(j + 1, count):
                ok = self.nl_ok[j, j2]
                if not ok.any():
                    continue
                chain = self.nl_inc[j, j2] + self.nl_Dg[j, j2]
                e_val = u3[j] + np.maximum(self.nl_K[j, j2], chain + rest_e[j2])
                b_val = u3[j] + np.maximum(self.nl_G[j, j2], chain + rest_b[j2])
                d_val = u3[j] + np.maximum(self.a2[j, j2] + self.nl_Kx[j, j2], chain + rest_d[j2])
                e_best = min(e_best, float(np.min(np.where(ok, e_val, np.inf))))
                d_best = min(d_best, float(np.min(np.where(ok, d_val, np.inf))))
                b_best = min(b_best, float(np.min(np.where(ok, b_val, np.inf))))
            rest_e[j], rest_b[j], rest_d[j] = e_best, b_best, d_best
        self.rest_e, self.rest_b, self.rest_d = rest_e, rest_b, rest_d
        # Dollars of a stage at least, besides its requests: every replica is billed for the
        # whole iteration, which lasts at least the stage's n (f + g), and d n >= M.
        self.work_usd = m * (fsum.reshape(seg4) + gsum.reshape(seg4)) / speed4 * prices.reshape(sh_t) + 0.0 * d4
        self.min_price = float(prices.min())

    def rest_usd(self, levels: Array) -> Array:
        """``[k, j]``: the least dollars stages from cut ``j`` to the end cost in an iteration
        of ``levels[k]`` to ``levels[k+1]`` seconds (``inf`` for ``k`` last).

        Per stage ``max(levels[k] d price, M (f + g) price)`` plus its requests, over the
        stages whose own lower bound on the iteration (:attr:`nl_time`) is below
        ``levels[k+1]``.
        """
        count = self.count
        tops = np.append(levels[1:], np.inf)
        out = np.empty((len(levels), count + 1))
        for k, (seconds, top) in enumerate(zip(levels, tops, strict=True)):
            usd = np.maximum(seconds * self.price, self.work_usd)
            nl = np.where(self.nl_ok & (self.nl_time < top), usd + self.nl_req, np.inf)
            ls = np.where(self.ls_ok & (self.ls_time < top), usd + self.ls_req, np.inf)
            nl_min = nl.min(axis=(2, 3))  # [i, j]
            ls_min = ls[:, count].min(axis=(1, 2))  # [i]
            rest = out[k]
            rest[count] = 0.0
            for i in range(count - 1, -1, -1):
                rest[i] = min(float(ls_min[i]), float(np.min(nl_min[i, i + 1:count] + rest[i + 1:count],
                                                             initial=np.inf)))
        return out

    def least_price(self) -> float:
        """The least sum of replica prices of any plan whose stages fit."""
        count = self.count
        nl = np.where(self.nl_ok, self.price, np.inf).min(axis=(2, 3))
        ls = np.where(self.ls_ok, self.price, np.inf)[:, count].min(axis=(1, 2))
        rest = np.full(count + 1, np.inf)
        rest[count] = 0.0
        for i in range(count - 1, -1, -1):
            rest[i] = min(float(ls[i]), float(np.min(nl[i, i + 1:count] + rest[i + 1:count], initial=np.inf)))
        return float(rest[0])


class _Labels:
    """Labels at one cut: coordinates (rows) and back-pointers."""

    __slots__ = ("parent_cut", "parent_row", "reps", "tier", "vals")

    def __init__(self, vals: Array, parent_cut: npt.NDArray[np.int64], parent_row: npt.NDArray[np.int64],
                 tier: npt.NDArray[np.int64], reps: npt.NDArray[np.int64]) -> None:
        self.vals, self.parent_cut, self.parent_row, self.tier, self.reps = vals, parent_cut, parent_row, tier, reps


# Coordinates of a label.
A, DL, C, PI, RHO, K, R, W, ND = range(9)


def _pareto(vals: Array) -> npt.NDArray[np.int64]:
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


def optimum(problem: Problem, objective: str, *, deadline_s: float | None = None, gap: float = 0.0,
            invocations: bool = True, time_limit_s: float = math.inf,
            memory_slack_bytes: float = 0.0) -> Optimum | None:
    """The plan with the smallest formula value, or ``None`` when no plan fits (or meets the deadline).

    Args:
        problem: the planner's problem (profile, platform, tiers, batch, limits).
        objective: ``"time"`` (iteration seconds) or ``"cost"`` (dollars per iteration).
        deadline_s: for ``"cost"``, the most iteration seconds a plan may take by the formula.
        gap: 0 for the optimum; else stop proving below ``incumbent / (1 + gap)``: the plan is
            then within ``gap`` of :attr:`Optimum.bound`, a proven lower bound.
        invocations: with ``False``, cost leaves out the invocation fee (as the CP-SAT model does).
        time_limit_s: wall seconds after which to give up.
        memory_slack_bytes: let stages exceed their tier by this much (a relaxation: the
            bound is then a lower bound over more plans, and the plan may not fit,
            :attr:`Optimum.fits`).

    Raises:
        TimeoutError: the search took longer than ``time_limit_s``.
    """
    if objective not in ("time", "cost"):
        raise ValueError(f"objective must be 'time' or 'cost', got {objective!r}")
    started = time.perf_counter()
    cost = objective == "cost"
    tab = _Tables(problem, memory_slack_bytes)
    give_up = started + time_limit_s
    # A narrow pass first (the best few labels per cut): a good incumbent prunes the exact pass.
    narrow = _Search(problem, tab, cost, deadline_s, invocations, give_up, beam=BEAM)
    narrow.prepare(math.inf)
    narrow.run()
    search = _Search(problem, tab, cost, deadline_s, invocations, give_up, gap=gap)
    search.best, search.best_plan = narrow.best, narrow.best_plan
    search.prepare(search.best)
    threshold = search.best / (1 + gap)
    candidate = search.run()
    if candidate is None:
        return None
    plan = Plan(candidate.balance, candidate.replicas, problem.micro_batch_size,
                problem.micro_batch_size * problem.num_micro_batches, candidate.memory_mb, problem.sync)
    try:
        stages = costmodel.stage_costs(problem.profile, problem.platform, plan)
    except PlanInfeasible:  # only with memory_slack_bytes: the program's own values
        bound = search.best if gap == 0 else min(search.best, threshold)
        return Optimum(candidate, search.best, bound, math.nan, math.nan, time.perf_counter() - started,
                       search.kept, fits=False)
    seconds = costmodel.formula_iteration_s(stages, problem.platform, plan)
    dollars = costmodel.cost_per_iteration(seconds, stages, plan, problem.platform)
    if not invocations:
        writes, reads = costmodel.requests_per_iteration(stages, plan)
        plat = problem.platform
        dollars = (seconds * sum(st.replicas * plat.price_per_s(st.tier) for st in stages)
                   + writes * plat.price_per_put + reads * plat.price_per_get)
    value = dollars if cost else seconds
    bound = value if gap == 0 else min(value, threshold)
    return Optimum(candidate, value, bound, seconds, dollars, time.perf_counter() - started, search.kept)


class _Search:
    def __init__(self, problem: Problem, tab: _Tables, cost: bool, deadline_s: float | None, invocations: bool,
                 give_up: float, *, beam: int | None = None, gap: float = 0.0) -> None:
        self.p, self.tab, self.cost, self.beam = problem, tab, cost, beam
        self.invocations, self.give_up, self.gap = invocations, give_up, gap
        self.deadline = math.inf if deadline_s is None else deadline_s * (1 + DEADLINE_SLACK)
        self.exact_deadline = deadline_s
        self.best = math.inf
        self.best_plan: Candidate | None = None
        self.kept = 0
        self.labels: list[_Labels | None] = [None] * (tab.count + 1)
        self.grid = np.zeros(1)
        self.rest = np.zeros((1, tab.count + 1))

    def prepare(self, upper: float) -> None:
        """The least dollars of the rest (:meth:`_Tables.rest_usd`) on a geometric grid of
        iteration seconds up to the longest a plan cheaper than ``upper`` dollars can take."""
        if not self.cost:
            return
        least = self.tab.least_price()
        levels = [0.0]
        if math.isfinite(upper) and least > 0:
            top = upper / least
            levels += list(np.geomspace(top / SPAN, top, GRID))
        self.grid = np.array(levels)
        self.rest = self.tab.rest_usd(self.grid)

    # -- objective and bounds ----------------------------------------------------

    def _value(self, seconds: Array, price: Array, req: Array, replicas: Array) -> Array:
        if not self.cost:
            return seconds
        plat = self.p.platform
        per_invocation = np.maximum(1.0, np.floor(plat.lifetime_s / np.maximum(seconds, 1e-9)))
        fee = replicas * plat.price_per_invocation / per_invocation if self.invocations else 0.0
        return seconds * price + req + self.tab.base_req + fee

    def _bound(self, vals: Array, cut: int) -> Array:
        """A lower bound on the objective of every plan that completes labels at ``cut`` (not the end)."""
        tab = self.tab
        seconds = self._time_bound(vals, cut)
        if not self.cost:
            return seconds
        # The iteration lies between two levels: at least the lower one, the rest's dollars at
        # that level; levels entirely below the bound on the seconds are out.
        tops = np.append(self.grid[1:], np.inf)
        usd = np.maximum(self.grid[None, :], seconds[:, None]) * vals[:, R, None] + self.rest[None, :, cut]
        usd = np.where(tops[None, :] > seconds[:, None], usd, np.inf)
        bound: Array = usd.min(axis=1) + vals[:, W] + tab.base_req
        return bound

    def _time_bound(self, vals: Array, cut: int) -> Array:
        """A lower bound on the iteration seconds of every plan that completes labels at ``cut``.

        The iteration is at least ``C``, ``e[s+1] + P`` and ``B[s+1] + Q`` with ``P = π + u``
        and ``Q >= ρ + u`` (``u`` the next stage's input-gradient upload).
        """
        tab = self.tab
        bound: Array = np.maximum(np.maximum(vals[:, C], vals[:, A] + vals[:, PI] + tab.rest_e[cut]),
                                  np.maximum(vals[:, A] + vals[:, RHO] + tab.rest_b[cut],
                                             vals[:, A] + vals[:, DL] + vals[:, PI] + tab.rest_d[cut]))
        return bound

    # -- the program ---------------------------------------------------------------

    def run(self) -> Candidate | None:
        tab = self.tab
        count = tab.count
        start = np.array([[0.0, NEG, NEG, NEG, NEG, 0.0, 0.0, 0.0, 0.0]])
        self.labels[0] = _Labels(start, np.array([-1]), np.array([-1]), np.array([-1]), np.array([-1]))
        for j in range(1, count + 1):
            if time.perf_counter() > self.give_up:
                raise TimeoutError("the dynamic program ran out of time")
            src_cut, src_row, vals = self._sources(j)
            if vals is None:
                continue
            if j == count:
                self._finish(src_cut, src_row, vals)
            else:
                self._extend(j, src_cut, src_row, vals)
        return self.best_plan

    def _sources(self, j: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], Array | None]:
        cuts, rows, vals = [], [], []
        for i in range(j):
            lab = self.labels[i]
            if lab is None or not len(lab.vals):
                continue
            ok = lab.vals[:, K] < self.p.max_stages
            idx = np.flatnonzero(ok)
            if not len(idx):
                continue
            cuts.append(np.full(len(idx), i))
            rows.append(idx)
            vals.append(lab.vals[idx])
        if not vals:
            return np.empty(0, np.int64), np.empty(0, np.int64), None
        return np.concatenate(cuts), np.concatenate(rows), np.concatenate(vals)

    def _step(self, j: int, src_cut: npt.NDArray[np.int64], vals: Array,
              last: bool) -> tuple[dict[str, Array], npt.NDArray[np.bool_]]:
        """The new stage ``[i, j)`` for every source label and every tier and replica count."""
        tab = self.tab
        i = src_cut
        v = vals[:, :, None, None]
        u = tab.u[i][:, :, None]  # [N, t, 1]
        n = tab.n[None, None, :]
        pp = v[:, PI] + u
        qq = np.maximum(v[:, RHO] + u, v[:, PI] + n * u)
        out: dict[str, Array] = {}
        x = v[:, DL] + tab.a2[i, j]
        if last:
            ok = tab.ls_ok[i, j]
            tail = tab.ls_tail[i, j]
            fw = np.maximum(tab.ls_A1[i, j], x)
            kappa = np.maximum(tab.ls_K[i, j], fw + tab.ls_g[i, j])
            gamma = tab.ls_G[i, j]
            ppt = np.maximum(pp, tail)
            out["T"] = np.maximum(np.maximum(v[:, C], v[:, A] + kappa + ppt), v[:, A] + gamma + qq)
            out["R"] = v[:, R] + tab.price[i, j]
            out["W"] = v[:, W] + tab.ls_req[i, j]
            out["ND"] = v[:, ND] + tab.d4[0, 0]
            return out, ok
        ok = tab.nl_ok[i, j]
        tail = tab.nl_tail[i, j]
        kappa = np.maximum(tab.nl_K[i, j], x + tab.nl_Kx[i, j])
        gamma = np.maximum(tab.nl_G[i, j], x + tab.nl_Gx[i, j])
        ppt = np.maximum(pp, tail)
        a = v[:, A]
        out["C"] = np.maximum(np.maximum(v[:, C], a + kappa + ppt), a + gamma + qq)
        dg = tab.nl_Dg[i, j]
        out["PI"] = dg + ppt
        out["RHO"] = np.maximum(out["PI"] + tab.nl_w[i, j], dg + qq)
        out["A"] = a + tab.nl_inc[i, j]
        out["DL"] = np.maximum(tab.nl_dl[i, j], v[:, DL])
        out["R"] = v[:, R] + tab.price[i, j]
        out["W"] = v[:, W] + tab.nl_req[i, j]
        out["ND"] = v[:, ND] + tab.d4[0, 0]
        return out, ok

    def _finish(self, src_cut: npt.NDArray[np.int64], src_row: npt.NDArray[np.int64], vals: Array) -> None:
        out, ok = self._step(self.tab.count, src_cut, vals, last=True)
        seconds = out["T"]
        ok = ok & (seconds <= self.deadline)
        value = np.where(ok, self._value(seconds, out["R"], out["W"], out["ND"]), np.inf)
        order = np.argsort(value, axis=None)
        for flat in order:
            if not np.isfinite(value.flat[flat]) or value.flat[flat] >= self.best:
                break
            row, t, r = np.unravel_index(flat, value.shape)
            candidate = self._plan(int(src_cut[row]), int(src_row[row]), int(t), int(r))
            if self._meets_deadline(candidate):
                self.best, self.best_plan = float(value.flat[flat]), candidate
                break

    def _meets_deadline(self, candidate: Candidate) -> bool:
        if self.exact_deadline is None:
            return True
        p = self.p
        plan = Plan(candidate.balance, candidate.replicas, p.micro_batch_size,
                    p.micro_batch_size * p.num_micro_batches, candidate.memory_mb, p.sync)
        stages = costmodel.stage_costs(p.profile, p.platform, plan)
        return costmodel.formula_iteration_s(stages, p.platform, plan) <= self.exact_deadline

    def _extend(self, j: int, src_cut: npt.NDArray[np.int64], src_row: npt.NDArray[np.int64], vals: Array) -> None:
        out, ok = self._step(j, src_cut, vals, last=False)
        shape = ok.shape
        cols = [out["A"], out["DL"], out["C"], out["PI"], out["RHO"],
                np.broadcast_to(vals[:, K, None, None] + 1, shape),
                out["R"], out["W"], out["ND"]]
        if not self.cost:
            cols[R] = cols[W] = cols[ND] = np.zeros(shape)
        new = np.stack([np.broadcast_to(c, shape) for c in cols], axis=-1).reshape(-1, 9)
        mask = ok.reshape(-1)
        rows = np.flatnonzero(mask)
        new = new[rows]
        bound = self._bound(new, j)
        alive = (bound < self.best / (1 + self.gap)) & (self._time_bound(new, j) <= self.deadline)
        rows, new, bound = rows[alive], new[alive], bound[alive]
        if self.beam is not None and len(new) > 8 * self.beam:
            keep = np.argpartition(bound, 8 * self.beam)[:8 * self.beam]
            rows, new = rows[keep], new[keep]
        keep = _pareto(new if self.cost else new[:, :K + 1])
        rows, new = rows[keep], new[keep]
        if self.beam is not None and len(new) > self.beam:
            keep = np.argsort(self._bound(new, j), kind="stable")[:self.beam]
            rows, new = rows[keep], new[keep]
        row, t, r = np.unravel_index(rows, shape)
        self.labels[j] = _Labels(new, src_cut[row], src_row[row], t.astype(np.int64), r.astype(np.int64))
        self.kept += len(new)

    def _plan(self, cut: int, row: int, t: int, r: int) -> Candidate:
        """Follow the back-pointers from a last stage ``[cut, L)`` on tier ``t`` with ``r + 1`` replicas."""
        tiers = self.p.tiers
        bounds = [self.tab.count, cut]
        memory, replicas = [tiers[t].memory_mb], [r + 1]
        while cut > 0:
            lab = self.labels[cut]
            assert lab is not None
            memory.append(tiers[int(lab.tier[row])].memory_mb)
            replicas.append(int(lab.reps[row]) + 1)
            cut, row = int(lab.parent_cut[row]), int(lab.parent_row[row])
            bounds.append(cut)
        bounds.reverse()
        balance = tuple(bounds[k + 1] - bounds[k] for k in range(len(bounds) - 1))
        return Candidate(balance, tuple(reversed(memory)), tuple(reversed(replicas)))

