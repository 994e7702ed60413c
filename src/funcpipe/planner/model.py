"""The planner's mixed-integer program, built for and solved by OR-Tools CP-SAT.

Decision variables (FuncPipe paper §5): the cuts ``u[0] = 0 <= u[1] <= ... <=
u[S] = L`` (stage ``s`` owns layers ``u[s] .. u[s+1]-1``; an empty stage is
unused and only trailing stages may be empty), a one-hot memory tier per stage
and a one-hot replica count per stage. Per-stage sums over layers come from
prefix-sum tables indexed by the cuts (``AddElement``), so the model's size
does not grow with the layer count beyond those tables.

Every time quantity of :mod:`funcpipe.costmodel`'s formula is an integer
variable in units of ``unit_s`` seconds, bounded below by the formula's
terms; the terms that depend on the tier or the replica count are enforced
under that tier's or count's literal. The formula is a maximum of sums with
positive coefficients, so minimising the iteration time ``T`` (or anything
increasing in it) makes ``T`` equal to the formula. Cost is the quadratic
term ``T * sum(replicas * price of tier)`` (``AddMultiplicationEquality``)
plus storage requests.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from ortools.sat.python import cp_model

from funcpipe.errors import PlanTimeout
from funcpipe.plans import Plan
from funcpipe.platforms.base import MB_RATE, MIB, Platform, Tier
from funcpipe.profiler import ModelProfile
from funcpipe.protocol import MAX_PIECES, PIECE_BYTES, REPORT_BYTES, SYNC_IN_FLIGHT_BYTES, piece_count

__all__ = ["Candidate", "Objective", "Problem", "Rounding", "Solution", "rounding", "solve"]

#: A CP-SAT linear expression or literal. ortools' stubs type these as unions with
#: numpy scalars that reject the library's own operator overloads, so expressions are
#: typed loosely here; the solver checks them at model-building time.
Expr = Any

#: Resolution of times: the largest iteration time the model can express is about this many units.
TIME_STEPS = 10**7
#: Resolution of bytes: the model's total bytes are expressed in about this many units.
BYTE_STEPS = 10**8


@dataclasses.dataclass(frozen=True)
class Problem:
    """What the planner asks its programs, for one micro-batch size and one schedule.

    ``sync`` is the all-reduce every stage uses, or a tuple of the algorithms each stage
    may choose from (:attr:`syncs`).
    """

    profile: ModelProfile
    platform: Platform
    tiers: tuple[Tier, ...]
    micro_batch_size: int
    num_micro_batches: int
    max_stages: int
    max_replicas: int
    sync: str | tuple[str, ...] = "pipelined"
    schedule: str = "gpipe"

    @property
    def syncs(self) -> tuple[str, ...]:
        """The all-reduce algorithms a stage may use."""
        return self.sync if isinstance(self.sync, tuple) else (self.sync,)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_micro_batches


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration: layers, tier memory, replicas and (if they differ) the all-reduce per stage.

    ``sync`` is empty when every stage uses the problem's one algorithm.
    """

    balance: tuple[int, ...]
    memory_mb: tuple[int, ...]
    replicas: tuple[int, ...]
    sync: tuple[str, ...] = ()

    def stage_sync(self, problem: Problem, stage: int) -> str:
        return self.sync[stage] if self.sync else problem.syncs[0]

    def to_plan(self, problem: Problem) -> Plan:
        """The plan this candidate is for ``problem`` (its micro-batch size and schedule)."""
        syncs = tuple(self.stage_sync(problem, s) for s in range(len(self.balance)))
        # Stages without replicas do not sync: name the plan's one algorithm when the rest agree.
        synced = {syncs[s] for s in range(len(syncs)) if self.replicas[s] > 1}
        sync: str | tuple[str, ...] = (
            synced.pop() if len(synced) == 1 else problem.syncs[0] if not synced else syncs
        )
        return Plan(self.balance, self.replicas, problem.micro_batch_size, problem.global_batch_size,
                    self.memory_mb, sync, problem.schedule)


@dataclasses.dataclass(frozen=True)
class Solution:
    """A solved model: the best candidate, its formula values and the solver's verdict."""

    candidate: Candidate
    iteration_s: float
    cost_usd: float
    status: str  # "optimal" | "feasible"
    gap: float
    seconds: float
    objective: float


@dataclasses.dataclass(frozen=True)
class Objective:
    """What to minimise: ``time_weight * T / time_ref + (1 - time_weight) * C / cost_ref``.

    ``time_weight`` 1 is pure time, 0 pure cost (the references then do not matter).
    """

    time_weight: float
    time_ref_s: float = 1.0
    cost_ref_usd: float = 1.0


def _ratio(value: float) -> tuple[int, int]:
    """``value`` as ``num / den``, both at most about 10**6 (integer constraint coefficients).

    Keeping the numerator small too matters: CP-SAT declares a model infeasible when a
    constraint's terms could overflow 64 bits.
    """
    frac = Fraction(value).limit_denominator(max(1, int(10**6 / max(1.0, value))))
    if frac == 0 and value > 0:
        frac = Fraction(1, 10**6)
    return frac.numerator, frac.denominator


class _Builder:
    """Builds the CP-SAT model of one :class:`Problem`."""

    def __init__(self, problem: Problem) -> None:
        self.p = problem
        prof, plat, b = problem.profile, problem.platform, problem.micro_batch_size
        self.layers = prof.layers
        count = len(self.layers)
        m = problem.num_micro_batches
        slowest = min(t.speed for t in problem.tiers)
        slow_link = min(min(t.uplink_mb_s, t.downlink_mb_s) for t in problem.tiers) * MB_RATE
        total_bytes = (
            sum(lp.param_bytes * 5 + lp.optimizer_bytes * 2 for lp in self.layers)
            + (m + 1) * sum(lp.held_bytes_per_sample + lp.output_bytes_per_sample for lp in self.layers) * b
            + m * (prof.input_bytes_per_sample + prof.target_bytes_per_sample) * b
            + plat.runtime_overhead_mb * MIB
        )
        # Bytes any plan moves at most: an activation and a gradient per micro-batch at every
        # possible boundary, the driver's inputs and targets, and every parameter three times
        # (an all-reduce uploads P and downloads under 2 P).
        moved = (
            2 * m * b * sum(lp.output_bytes_per_sample for lp in self.layers)
            + m * b * (prof.input_bytes_per_sample + prof.target_bytes_per_sample)
            + 3 * sum(lp.param_bytes for lp in self.layers)
        )
        # An upper bound of any plan's iteration (everything serial on the slowest tier and
        # link). It sets the time unit, so it must be tight enough for a fine unit: raising
        # TIME_STEPS instead is not safe (at 10**8, CP-SAT reported as optimal a 6-layer plan
        # 3.5x dearer than one it accepts when that one is fixed).
        worst = (
            m * sum(lp.forward_s(b) + lp.backward_s(b) + lp.update_s for lp in self.layers) / slowest
            + 2 * moved / slow_link
            + (8 * m * (count + 2) + 4 * problem.max_replicas**2 * MAX_PIECES) * plat.latency_s
        )
        self.unit_s = max(worst, 1e-3) / TIME_STEPS
        self.byte_unit = max(1.0, total_bytes / BYTE_STEPS)
        self.byte_total = math.ceil(total_bytes / self.byte_unit) + 1
        self.horizon = int(TIME_STEPS * 4)
        self.lat = round(plat.latency_s / self.unit_s)

        def prefix(values: Sequence[float], scale: float) -> list[int]:
            out, acc = [0], 0.0
            for v in values:
                acc += v
                out.append(round(acc / scale))
            return out

        u = self.unit_s
        self.t_fw = prefix([lp.forward_s(b) for lp in self.layers], u)
        self.t_bw = prefix([lp.backward_s(b) for lp in self.layers], u)
        self.t_upd = prefix([lp.update_s for lp in self.layers], u)
        bu = self.byte_unit
        self.b_param = prefix([lp.param_bytes for lp in self.layers], bu)
        self.b_opt = prefix([lp.optimizer_bytes for lp in self.layers], bu)
        self.b_held = prefix([lp.held_bytes_per_sample * b for lp in self.layers], bu)
        # Bytes crossing a cut at k: the model input at 0, else layer k-1's output.
        self.b_cut = [round(prof.input_bytes_per_sample * b / bu)] + [
            round(lp.output_bytes_per_sample * b / bu) for lp in self.layers
        ]
        # The gradient crossing back over a cut at k (none into the model's input).
        self.g_cut = [0] + [round(lp.gradient_bytes_per_sample * b / bu) for lp in self.layers]
        self.b_target = round(prof.target_bytes_per_sample * b / bu)
        self.b_report = round(REPORT_BYTES / bu)
        self.b_overhead = math.ceil(plat.runtime_overhead_mb * MIB / bu)
        self.piece_units = max(1, round(PIECE_BYTES / bu))
        self.b_in_flight = math.ceil(SYNC_IN_FLIGHT_BYTES / bu)
        prices = [plat.price_per_s(t) for t in problem.tiers]
        self.price_unit = (min(p for p in prices if p > 0) / 1000) if any(prices) else 1e-12
        self.price = [round(p / self.price_unit) for p in prices]

    # -- helpers --------------------------------------------------------------

    def _ge_scaled(
        self, y: cp_model.IntVar, x: Expr, ratio: float, const: int, lits: list[Expr]
    ) -> None:
        """``y >= ratio * x + const`` under ``lits`` (integer coefficients, rounded up)."""
        num, den = _ratio(ratio)
        self.model.add(den * y >= num * x + den * const).only_enforce_if(lits)

    def _sec_per_unit_byte(self, mb_s: float) -> float:
        """Time units one byte unit takes at ``mb_s``."""
        return self.byte_unit / (mb_s * MB_RATE) / self.unit_s

    # -- the model ------------------------------------------------------------

    def build(self, objective: Objective, *, deadline_s: float | None, budget_usd: float | None,
              exclude: Sequence[Candidate], lower_bound: float | None = None,
              fastest_s: float | None = None) -> None:
        p = self.p
        md = cp_model.CpModel()
        self.model = md
        count = len(self.layers)
        stages = min(p.max_stages, count)
        tiers = p.tiers
        reps = list(range(1, p.max_replicas + 1))
        m = p.num_micro_batches
        h = self.horizon
        lat = self.lat

        def tvar(name: str) -> cp_model.IntVar:
            return md.new_int_var(0, h, name)

        # Cuts and activity.
        cut: list[Expr] = [0]
        for k in range(1, stages):
            cut.append(md.new_int_var(0, count, f"u{k}"))
        cut.append(count)
        act = [md.new_bool_var(f"active{s}") for s in range(stages)]
        md.add(act[0] == 1)
        for s in range(stages):
            md.add(cut[s + 1] >= cut[s] + 1).only_enforce_if(act[s])
            md.add(cut[s + 1] == cut[s]).only_enforce_if(~act[s])
            if s + 1 < stages:
                md.add_implication(act[s + 1], act[s])
        nxt: list[Expr] = [act[s + 1] if s + 1 < stages else None for s in range(stages)]
        last = []
        for s in range(stages):
            if nxt[s] is None:
                last.append(act[s])
            else:
                lit = md.new_bool_var(f"last{s}")
                md.add_bool_and([act[s], ~nxt[s]]).only_enforce_if(lit)
                md.add_bool_or([~act[s], nxt[s]]).only_enforce_if(~lit)
                last.append(lit)

        def at_cut(table: list[int], k: int, name: str) -> Expr:
            if k == 0:
                return table[0]
            if k == stages:
                return table[count]
            var = md.new_int_var(min(table), max(table), f"{name}{k}")
            md.add_element(cut[k], table, var)
            return var

        tables = {
            "fw": self.t_fw, "bw": self.t_bw, "upd": self.t_upd,
            "param": self.b_param, "opt": self.b_opt, "held": self.b_held,
        }
        at = {name: [at_cut(table, k, name) for k in range(stages + 1)] for name, table in tables.items()}
        crossing = [at_cut(self.b_cut, k, "cross") for k in range(stages + 1)]
        grad_crossing = [at_cut(self.g_cut, k, "gcross") for k in range(stages + 1)]
        # Bytes crossing cut k if it is a stage boundary, activations and gradients: 0 at the
        # model's end, where the cuts of unused trailing stages sit.
        crossing_free = [at_cut([*self.b_cut[:count], 0], k, "boundary") for k in range(1, stages)]
        grad_crossing_free = [at_cut([*self.g_cut[:count], 0], k, "gboundary") for k in range(1, stages)]

        def seg(name: str, s: int) -> Expr:
            return at[name][s + 1] - at[name][s]

        self.cut, self.act = cut, act
        self.z: list[list[cp_model.IntVar]] = []
        self.r: list[list[cp_model.IntVar]] = []
        t_end = tvar("T")
        self.T = t_end
        rq_terms: list[Expr] = []
        work_terms: list[Expr] = []
        has_param_lits: list[Expr] = []
        r_terms: list[Expr] = []
        A: list[Expr] = []
        H: list[cp_model.IntVar] = []
        F: list[cp_model.IntVar] = []
        stage_vars: list[dict[str, Any]] = []
        gpipe = p.schedule == "gpipe"
        # Per stage: a one-hot tier, a one-hot replica count and (when both are allowed) whether
        # its all-reduce is the four-phase one; and the workers of the stage and every later one
        # (1F1B's window, funcpipe.schedule.in_flight).
        self.y: list[Expr] = []
        for s in range(stages):
            z = [md.new_bool_var(f"z{s}_{t}") for t in range(len(tiers))]
            r = [md.new_bool_var(f"r{s}_{d}") for d in reps]
            md.add_exactly_one(z)
            md.add_exactly_one(r)
            md.add(z[0] == 1).only_enforce_if(~act[s])
            md.add(r[0] == 1).only_enforce_if(~act[s])
            self.z.append(z)
            self.r.append(r)
            if len(p.syncs) > 1:
                four = md.new_bool_var(f"four_phase{s}")
                md.add(four == 0).only_enforce_if(r[0])  # one replica: no all-reduce, one way to say it
                self.y.append(four)
            else:
                self.y.append(p.syncs[0] == "four_phase")
        workers = [sum(d * r_lit for d, r_lit in zip(reps, self.r[s], strict=True)) - 1 + act[s]
                   for s in range(stages)]  # 0 for an unused stage
        downstream = [sum(workers[s:]) for s in range(stages)]
        for s in range(stages):
            z, r = self.z[s], self.r[s]
            v = {name: tvar(f"{name}{s}") for name in (
                "f", "g", "upd", "dn_in", "dn_tgt", "dn_grad", "up_out", "up_gin",
                "nf", "ng", "ndl_f", "ndl", "nup", "nupo", "E", "end", "Pup", "Pdn", "pu", "pd",
                "SU", "SB", "SA", "Emin", "nmin_fg", "nmin_dl",
                "up_report", "Uo0", "Uo", "F0", "B0", "G", "X", "ngin", "ndg",
            )}
            in_b = crossing[s]
            in_g = grad_crossing[s]  # the gradient sent back (stage 0: none)
            out_b = md.new_int_var(0, max(self.b_cut), f"out{s}")
            out_g = md.new_int_var(0, max(self.g_cut), f"gout{s}")  # the gradient received
            if nxt[s] is not None:
                md.add(out_b == crossing[s + 1]).only_enforce_if(nxt[s])
                md.add(out_b == 0).only_enforce_if(~nxt[s])
                md.add(out_g == grad_crossing[s + 1]).only_enforce_if(nxt[s])
                md.add(out_g == 0).only_enforce_if(~nxt[s])
            else:
                md.add(out_b == 0)
                md.add(out_g == 0)
            params = seg("param", s)
            # One piece of the pipelined all-reduce, pi = P / (d q) (rounded up): d q pi >= P.
            piece = md.new_int_var(0, max(1, self.b_param[-1]), f"piece{s}")
            for t, tier in enumerate(tiers):
                lit = z[t]
                inv = 1.0 / tier.speed
                self._ge_scaled(v["f"], seg("fw", s), inv, 0, [lit])
                self._ge_scaled(v["g"], seg("bw", s), inv, 0, [lit])
                self._ge_scaled(v["upd"], seg("upd", s), inv, 0, [lit])
                dn = self._sec_per_unit_byte(tier.downlink_mb_s)
                up = self._sec_per_unit_byte(tier.uplink_mb_s)
                self._ge_scaled(v["dn_in"], in_b, dn, lat, [lit, act[s]])
                self._ge_scaled(v["dn_tgt"], self.b_target, dn, lat, [lit, last[s]])
                self._ge_scaled(v["Pup"], params, up, 0, [lit])
                self._ge_scaled(v["up_report"], self.b_report, up, lat, [lit, last[s]])
                self._ge_scaled(v["pu"], piece, up, 0, [lit])
                self._ge_scaled(v["pd"], piece, dn, 0, [lit])
                self._ge_scaled(v["Pdn"], params, dn, 0, [lit])
                if nxt[s] is not None:
                    self._ge_scaled(v["dn_grad"], out_g, dn, lat, [lit, nxt[s]])
                    self._ge_scaled(v["up_out"], out_b, up, lat, [lit, nxt[s]])
                if s > 0:
                    self._ge_scaled(v["up_gin"], in_g, up, lat, [lit, act[s]])
            has_params = md.new_bool_var(f"has_params{s}")
            has_param_lits.append(has_params)
            md.add(params >= 1).only_enforce_if(has_params)
            md.add(params == 0).only_enforce_if(~has_params)
            q = md.new_int_var(1, MAX_PIECES, f"pieces{s}")
            capped = md.new_bool_var(f"capped{s}")
            md.add(q == MAX_PIECES).only_enforce_if(capped)
            q_piece = md.new_int_var(0, MAX_PIECES * max(1, self.b_param[-1]), f"q_piece{s}")
            md.add_multiplication_equality(q_piece, [q, piece])
            tgt_b = md.new_int_var(0, self.b_target, f"tgt{s}")
            md.add(tgt_b == self.b_target).only_enforce_if(last[s])
            md.add(tgt_b == 0).only_enforce_if(~last[s])
            mem = md.new_int_var(0, max(1, math.ceil(tiers[-1].memory_mb * MIB / self.byte_unit)), f"mem{s}")
            md.add(mem <= sum(z[t] * math.floor(tiers[t].memory_mb * MIB / self.byte_unit)
                              for t in range(len(tiers))))
            price_s = sum(z[t] * self.price[t] for t in range(len(tiers)))
            r_s = md.new_int_var(0, max(self.price) * reps[-1], f"R{s}")
            r_terms.append(r_s)
            # A redundant bound that makes cost provable: every replica is billed for the whole
            # iteration, which lasts at least its n (f + g), and d n >= M, so the stage costs at
            # least M (f + g) x its tier's price.
            work = md.new_int_var(0, self.horizon * max(self.price) * reps[-1], f"work{s}")
            work_terms.append(work)
            for t, tier in enumerate(tiers):
                # (0.999: a redundant bound must never cut a plan off through rounding)
                self._ge_scaled(work, seg("fw", s) + seg("bw", s), 0.999 * m * self.price[t] / tier.speed, 0,
                                [z[t]])
            d_max = reps[-1]
            if not gpipe:
                window = md.new_int_var(1, -(-m // 1), f"window{s}")
                full = md.new_bool_var(f"window_full{s}")
                per_micro_batch = md.new_int_var(0, 3 * self.byte_total, f"hoi{s}")
                md.add(per_micro_batch == seg("held", s) + out_b + in_b)
                in_flight_bytes = md.new_int_var(0, 3 * self.byte_total * m, f"in_flight_bytes{s}")
                md.add_multiplication_equality(in_flight_bytes, [window, per_micro_batch])
            # Requests: the all-reduce's pieces, and (last stage) each replica's report.
            rq_s = md.new_int_var(0, MAX_PIECES * 3 * d_max * d_max * (self._put + self._get), f"rq{s}")
            rq_report = md.new_int_var(0, d_max * (self._put + self._get), f"rq_report{s}")
            rq_terms += [rq_s, rq_report]
            sync_chunk = md.new_int_var(0, self.byte_total, f"sync_chunk{s}")
            for i, d in enumerate(reps):
                lit = r[i]
                n = -(-m // d)
                md.add(v["nf"] >= n * v["f"]).only_enforce_if(lit)
                md.add(v["ng"] >= n * v["g"]).only_enforce_if(lit)
                md.add(v["ndl_f"] >= n * (v["dn_in"] + v["dn_tgt"])).only_enforce_if(lit)
                md.add(v["ndl"] >= n * (v["dn_in"] + v["dn_grad"] + v["dn_tgt"])).only_enforce_if(lit)
                md.add(v["nup"] >= n * (v["up_out"] + v["up_gin"])).only_enforce_if(lit)
                md.add(v["nupo"] >= n * v["up_out"]).only_enforce_if(lit)
                md.add(v["ngin"] >= n * v["up_gin"]).only_enforce_if(lit)
                md.add(v["ndg"] >= n * v["dn_grad"]).only_enforce_if(lit)
                n_min = m // d  # the least busy replica's micro-batches
                md.add(v["nmin_fg"] >= n_min * (v["f"] + v["g"])).only_enforce_if(lit)
                md.add(v["nmin_dl"] >= n_min * (v["dn_in"] + v["dn_grad"] + v["dn_tgt"])).only_enforce_if(lit)
                # The memory model of funcpipe.costmodel.memory_terms, with the counts of
                # funcpipe.costmodel.held for this schedule.
                # The all-reduce's buffers, P / d + SYNC_IN_FLIGHT_BYTES: a chunk at least params / d.
                if d > 1:
                    md.add(d * sync_chunk >= params).only_enforce_if(lit)
                sync_buffers = sync_chunk + self.b_in_flight if d > 1 else 0
                base = self.b_overhead + 3 * params + 2 * seg("opt", s) + seg("held", s) + sync_buffers
                if gpipe:
                    md.add(mem >= base + n * (seg("held", s) + out_b) + n * in_b + n * out_g).only_enforce_if(
                        [lit, act[s], ~last[s]])
                    md.add(mem >= base + seg("held", s) + n * in_b + n * tgt_b).only_enforce_if([lit, last[s]])
                else:
                    two = min(n, 2)
                    md.add(mem >= base + seg("held", s) + two * in_b + two * tgt_b).only_enforce_if([lit, last[s]])
                    # In flight: k = min(n, ceil(W / d)); memory grows with k, so k at least that.
                    md.add(window >= n).only_enforce_if([lit, full])
                    md.add(window <= n).only_enforce_if(lit)
                    md.add(d * window >= downstream[s]).only_enforce_if([lit, ~full])
                    md.add(mem >= base + n * (seg("held", s) + out_b) + n * in_b + out_g).only_enforce_if(
                        [lit, act[s], ~last[s], full])
                    md.add(mem >= base + in_flight_bytes + in_b + out_g).only_enforce_if(
                        [lit, act[s], ~last[s], ~full])
                md.add(r_s >= d * price_s).only_enforce_if([lit, act[s]])
                if d > 1:
                    four = self.y[s]
                    for algorithm in p.syncs:
                        is_four = algorithm == "four_phase"
                        if isinstance(four, bool):
                            sync_lits = [lit, has_params]
                        else:
                            sync_lits = [lit, has_params, four if is_four else ~four]
                        # funcpipe.costmodel.sync_bounds: after_upload SU, after_backward SB,
                        # after_all SA (pieces of pi bytes: u = pu + lat, dn = pd + lat; q u d = Pup + d q lat).
                        su, sb, sa, pu, pd = v["SU"], v["SB"], v["SA"], v["pu"], v["pd"]
                        if is_four:
                            md.add(d * su >= d * v["Pup"] + 2 * (d - 1) * v["Pdn"] + d * (3 * d - 2) * lat
                                   ).only_enforce_if(sync_lits)
                            md.add(rq_s >= d * d * self._put + 2 * d * (d - 1) * self._get).only_enforce_if(
                                sync_lits)
                            continue
                        # q = piece_count: min(MAX_PIECES, ceil(P / (d PIECE_BYTES))), exactly.
                        md.add(q * (d * self.piece_units) >= params).only_enforce_if([lit, ~capped])
                        md.add((q - 1) * (d * self.piece_units) <= params - 1).only_enforce_if([lit, has_params])
                        md.add(d * q_piece >= params).only_enforce_if(sync_lits)
                        chunk_up = (d - 1) * v["Pup"] + d * (d - 1) * lat * q  # d x (d-1) q u
                        md.add(su >= v["Pup"] + d * lat * q + pd + lat).only_enforce_if(sync_lits)
                        md.add(d * su >= chunk_up + d * (pu + 2 * pd + 3 * lat)).only_enforce_if(sync_lits)
                        md.add(d * su >= d * (pu + 2 * lat) + 2 * v["Pdn"]).only_enforce_if(sync_lits)
                        md.add(d * sb >= 2 * (d - 1) * v["Pdn"] + d * lat).only_enforce_if(sync_lits)
                        md.add(2 * d * sb >= d * (d - 1) * lat * q + (d - 1) * v["Pdn"]).only_enforce_if(sync_lits)
                        md.add(sa >= v["Pup"] + d * lat * q + (d - 1) * pd + lat).only_enforce_if(sync_lits)
                        md.add(d * sa >= chunk_up + d * (pu + d * pd + 3 * lat)).only_enforce_if(sync_lits)
                        md.add(d * sa >= d * (pu + 2 * lat) + 2 * (d - 1) * v["Pdn"]).only_enforce_if(sync_lits)
                        md.add(d * sa >= chunk_up + d * (pu + 2 * lat) + (d - 1) * v["Pdn"]).only_enforce_if(
                            sync_lits)
                        md.add(rq_s >= q * (d * d * self._put + 2 * d * (d - 1) * self._get)).only_enforce_if(
                            sync_lits)
                md.add(rq_report >= d * (self._put + self._get)).only_enforce_if([lit, last[s]])
            # The pipeline recursion of funcpipe.costmodel (times of the busiest replica).
            a_s = 0 if s == 0 else H[s - 1] + stage_vars[s - 1]["f"] + stage_vars[s - 1]["up_out"]
            h_s = tvar(f"H{s}")
            md.add(h_s == a_s + v["dn_in"] + v["dn_tgt"])
            # F0 / Uo0: replica 0's last forward / activation upload; F / Uo: any replica's.
            f0_s = v["F0"]
            md.add(f0_s >= h_s + v["nf"])
            md.add(f0_s >= a_s + v["ndl_f"] + v["f"])
            f_s = tvar(f"F{s}")
            md.add(f_s >= f0_s)
            if s > 0:
                md.add(f_s >= stage_vars[s - 1]["Uo"] + v["dn_in"] + v["f"])
            md.add(f0_s >= f_s).only_enforce_if(r[0])  # one replica: replica 0 is every replica
            if nxt[s] is not None:
                md.add(v["Uo0"] >= h_s + v["f"] + v["nupo"]).only_enforce_if(nxt[s])
                md.add(v["Uo0"] >= f0_s + v["up_out"]).only_enforce_if(nxt[s])
                md.add(v["Uo"] >= v["Uo0"])
                md.add(v["Uo"] >= f_s + v["up_out"]).only_enforce_if(nxt[s])
            A.append(a_s)
            H.append(h_s)
            F.append(f_s)
            stage_vars.append(v)
        for s in reversed(range(stages)):
            v = stage_vars[s]
            e = v["E"]
            md.add(v["B0"] >= H[s] + v["f"] + v["g"])
            md.add(e >= H[s] + v["nf"] + v["ng"])
            md.add(e >= F[s] + v["g"])
            md.add(e >= A[s] + v["ndl"] + v["g"])
            if nxt[s] is not None:
                nx = stage_vars[s + 1]
                on = nxt[s]
                # The next stage's first gradient goes up after its first backward and
                # after the activations queued before it on its uplink.
                md.add(v["X"] >= nx["B0"])
                md.add(v["G"] >= v["X"] + nx["up_gin"] + v["dn_grad"]).only_enforce_if(on)
                md.add(v["B0"] >= v["G"] + v["g"]).only_enforce_if(on)
                if gpipe:  # replica 0's forwards before its first backward; activations queue before gradients
                    md.add(v["X"] >= nx["Uo0"]).only_enforce_if(on)
                    md.add(v["B0"] >= v["F0"] + v["g"]).only_enforce_if(on)
                    md.add(e >= v["F0"] + v["ng"]).only_enforce_if(on)
                else:  # 1F1B: the next stage's uplink carries all its messages before its last gradient
                    md.add(e >= H[s + 1] + nx["f"] + nx["nup"] + v["dn_grad"] + v["g"]).only_enforce_if(on)
                md.add(e >= v["G"] + v["ng"]).only_enforce_if(on)
                md.add(e >= nx["E"] + nx["up_gin"] + v["dn_grad"] + v["g"]).only_enforce_if(on)
                md.add(e >= v["X"] + nx["ngin"] + v["dn_grad"] + v["g"]).only_enforce_if(on)
                md.add(e >= v["G"] + v["ndg"] - v["dn_grad"] + v["g"]).only_enforce_if(on)
            end = v["end"]
            md.add(end >= e + v["upd"])
            md.add(end >= e + v["up_gin"])
            # With replicas: the all-reduce's bounds from the last upload, the last backward and
            # every replica's last upload (the least busy replica's last backward is E_min).
            emin = v["Emin"]
            md.add(emin >= H[s] + v["nmin_fg"])
            md.add(emin >= A[s] + v["nmin_dl"] + v["g"])
            several = ~self.r[s][0]
            md.add(end >= e + v["up_gin"] + v["SU"] + v["upd"]).only_enforce_if(several)
            md.add(end >= e + v["SB"] + v["upd"]).only_enforce_if(several)
            md.add(end >= emin + v["up_gin"] + v["SA"] + v["upd"]).only_enforce_if(several)
            md.add(t_end >= end + v["up_report"]).only_enforce_if(act[s])
        # Messages: the driver's inputs and targets, and an activation and a gradient per boundary.
        boundaries = sum(act[1:]) if stages > 1 else 0
        messages = (2 * m + 2 * m * boundaries) * (self._put + self._get)
        self.requests = messages + sum(rq_terms)
        self.r_max = max(self.price) * reps[-1] * stages
        self.R = md.new_int_var(0, self.r_max, "R")
        md.add(sum(r_terms) == self.R)
        prod = md.new_int_var(0, self.horizon * self.r_max, "TR")
        md.add_multiplication_equality(prod, [t_end, self.R])
        self._lower_bounds(t_end, at, crossing_free, grad_crossing_free, stages, has_param_lits, seg)
        md.add(prod >= sum(work_terms))
        # The same bound without the tiers: every layer's work at the best price per speed.
        cheapest = min(self.price[t] / tier.speed for t, tier in enumerate(tiers))
        md.add(prod >= math.floor(0.999 * m * cheapest * (self.t_fw[-1] + self.t_bw[-1])))
        self.cost = prod + self.requests
        if deadline_s is not None:
            md.add(t_end <= math.floor(deadline_s / self.unit_s))
        if budget_usd is not None:
            md.add(self.cost <= math.floor(budget_usd / self._cost_unit))
        for old in exclude:
            self._exclude(old)
        w = objective.time_weight
        if lower_bound is not None:
            self._add_lower_bound(w, lower_bound, fastest_s)
        if w >= 1:  # time, then (among equally fast plans) the fewest resources
            md.minimize(t_end * (self.r_max + 1) + self.R)
        elif w <= 0:
            md.minimize(self.cost)
        else:
            md.minimize(
                (w / (objective.time_ref_s / self.unit_s)) * t_end
                + ((1 - w) / (objective.cost_ref_usd / self._cost_unit)) * self.cost
            )

    def _lower_bounds(self, t_end: Expr, at: dict[str, list[Expr]], boundaries: list[Expr],
                      grad_boundaries: list[Expr], stages: int, has_params: list[Expr], seg: Any) -> None:
        """Redundant lower bounds on the iteration time, each implied by the formula.

        CP-SAT's relaxation does not find them through the enforced constraints, and
        without them it proves nothing on large models. Coefficients are shrunk by 0.1%
        so that rounding can never cut a plan off.
        """
        md, p, lat = self.model, self.p, self.lat
        m = p.num_micro_batches
        fastest = max(t.speed for t in p.tiers)
        up = self._sec_per_unit_byte(max(t.uplink_mb_s for t in p.tiers))
        dn = self._sec_per_unit_byte(max(t.downlink_mb_s for t in p.tiers))
        n_min = -(-m // p.max_replicas)

        def at_least(expr: Expr, ratio: float, name: str) -> Expr:
            var = md.new_int_var(0, self.horizon, name)
            self._ge_scaled(var, expr, 0.999 * ratio, 0, [])
            return var

        # Micro-batch 0 crosses every layer forward and backward (at best at the fastest
        # speed) and every boundary both ways: activation and gradient, each up and down.
        total = self.t_fw[-1] + self.t_bw[-1]
        fill = md.new_int_var(0, self.horizon, "fill")
        md.add(fill >= math.floor(0.999 * (total / fastest + (self.b_cut[0] + self.b_target) * dn)) + 2 * lat
               + 4 * lat * sum(self.act[1:]) + at_least(sum(boundaries), up + dn, "boundary_bytes")
               + at_least(sum(grad_boundaries), up + dn, "grad_boundary_bytes"))
        md.add(t_end >= fill)
        for s in range(stages):
            work = seg("fw", s) + seg("bw", s)
            # ...and every stage runs the backward passes of its other micro-batches after
            # micro-batch 0's gradient has come back (not their forwards: those overlap the
            # round trip downstream).
            backward = seg("bw", s)
            md.add(t_end >= fill + at_least(backward, (n_min - 1) / fastest, f"rest{s}"))
            md.add(t_end >= fill + at_least(backward, (m - 1) / fastest, f"rest_all{s}")).only_enforce_if(
                self.r[s][0])
            # With replicas, the stage's all-reduce (which downloads at least its parameters'
            # bytes) starts after its own forwards and backwards, and after micro-batch 0 has
            # gone forward through every layer and backward down to this stage.
            sync = at_least(seg("param", s), dn, f"sync{s}")
            lits = [~self.r[s][0], has_params[s]]
            md.add(
                t_end >= at_least(at["fw"][s], 1 / fastest, f"before{s}") + at_least(work, n_min / fastest, f"own{s}")
                + sync
            ).only_enforce_if(lits)
            md.add(
                t_end >= math.floor(0.999 * self.t_fw[-1] / fastest)
                + at_least(self.t_bw[-1] - at["bw"][s], 1 / fastest, f"down_to{s}")
                + 2 * lat * sum(self.act[1:]) + 3 * lat + sync
            ).only_enforce_if(lits)

    def rounding_slack(self) -> tuple[float, float]:
        """How far below the formula the model's iteration time of a plan can fall.

        Returns ``(rel, units)``: for every plan, the model's ``T >= (1 - rel) * formula /
        unit_s - units``. The model rounds each term of the formula: prefix sums of times and
        bytes to whole units (a segment is off by at most one unit), the latency to whole
        units, coefficients to fractions (:func:`_ratio`, off by ``rel``); the pipelined
        all-reduce's piece count comes from rounded bytes. A path of the formula adds at
        most ``10 S + 7 M + 12`` terms (forward chain, the turn, both backward chains, the
        tail), and one all-reduce of at most ``d q`` latencies.
        """
        p = self.p
        lat_err = max(0.0, p.platform.latency_s / self.unit_s - self.lat)
        rel = 0.0
        per_term = 0.0
        for tier in p.tiers:
            for ratio in (1.0 / tier.speed, self._sec_per_unit_byte(tier.downlink_mb_s),
                          self._sec_per_unit_byte(tier.uplink_mb_s)):
                num, den = _ratio(ratio)
                rel = max(rel, (ratio - num / den) / ratio)
                per_term = max(per_term, num / den)
        per_term += lat_err
        m, stages, d_max = p.num_micro_batches, min(p.max_stages, len(self.layers)), p.max_replicas
        units = (10 * stages + 7 * m + 12) * per_term + 2 * d_max * MAX_PIECES * lat_err + 4 * per_term
        if "pipelined" in p.syncs and d_max > 1:
            # Pieces the model may count fewer of than funcpipe.protocol.piece_count.
            params = [0]
            for lp in self.layers:
                params.append(params[-1] + lp.param_bytes)
            missing = 0
            for i in range(len(self.layers)):
                for j in range(i + 1, len(self.layers) + 1):
                    size, size_units = params[j] - params[i], self.b_param[j] - self.b_param[i]
                    for d in range(2, d_max + 1):
                        true_q = piece_count(size, d)
                        model_q = min(MAX_PIECES, max(1, -(-size_units // (d * self.piece_units))))
                        missing = max(missing, d * (true_q - model_q))
            units += missing * (self.lat + 1)
            self.fewer_pieces = missing > 0
        return rel, units

    def _add_lower_bound(self, weight: float, lower_bound: float, fastest_s: float | None) -> None:
        """Constrain the objective to be at least what ``lower_bound`` (a proven lower bound of the
        formula's optimum: seconds for time, dollars without invocations for cost) gives after
        :meth:`rounding_slack`, so that no plan's model value is cut off."""
        rel, units = self.rounding_slack()
        md = self.model
        if weight >= 1:
            floor_units = math.floor(lower_bound / self.unit_s * (1 - rel) - units)
            t_end = self.T
            md.add(t_end >= floor_units)
            return
        if fastest_s is None or fastest_s <= 0 or getattr(self, "fewer_pieces", False):
            return  # (fewer pieces would also mean fewer requests than the formula's)
        # T_model >= T (1 - rel) / unit - units >= T / unit (1 - rel - units unit / fastest).
        time_rel = rel + units * self.unit_s / fastest_s
        p = self.p
        prices = [p.platform.price_per_s(t) / self.price_unit for t in p.tiers]
        price_rel = max(max(0.0, (x - y) / x) for x, y in zip(prices, self.price, strict=True) if x > 0)
        request_rel = 0.0
        for price, units_of in ((p.platform.price_per_put, self._put), (p.platform.price_per_get, self._get)):
            if price > 0:
                request_rel = max(request_rel, (price / self._cost_unit - units_of) / (price / self._cost_unit))
        shrink = (1 - time_rel) * (1 - price_rel) * (1 - max(0.0, request_rel))
        if shrink > 0:
            floor_cost = math.floor(lower_bound / self._cost_unit * shrink)
            md.add(self.cost >= floor_cost)

    @property
    def _cost_unit(self) -> float:
        """Dollars of one unit of the cost expression (time unit x price unit)."""
        return self.unit_s * self.price_unit

    @property
    def _put(self) -> int:
        return round(self.p.platform.price_per_put / self._cost_unit)

    @property
    def _get(self) -> int:
        return round(self.p.platform.price_per_get / self._cost_unit)

    def _exclude(self, old: Candidate) -> None:
        """Forbid exactly this candidate (a no-good), to find the next best one."""
        md = self.model
        stages = len(self.act)
        differs: list[Expr] = []
        bounds = [0]
        for size in old.balance:
            bounds.append(bounds[-1] + size)
        bounds += [bounds[-1]] * (stages + 1 - len(bounds))
        for k in range(1, stages):
            lit = md.new_bool_var(f"differs_u{k}")
            md.add(self.cut[k] != bounds[k]).only_enforce_if(lit)
            differs.append(lit)
        tier_index = {t.memory_mb: i for i, t in enumerate(self.p.tiers)}
        for s in range(len(old.balance)):
            differs.append(~self.z[s][tier_index[old.memory_mb[s]]])
            differs.append(~self.r[s][old.replicas[s] - 1])
            four = self.y[s]
            if not isinstance(four, bool) and old.replicas[s] > 1:
                differs.append(~four if old.stage_sync(self.p, s) == "four_phase" else four)
        md.add_bool_or(differs)

    def hint(self, candidate: Candidate, *, fix: bool = False) -> None:
        """Start the search from ``candidate``, or with ``fix`` allow nothing else."""
        md = self.model
        if fix:

            def add_hint(var: Expr, value: int | bool) -> None:
                md.add(var == int(value))
        else:
            add_hint = md.add_hint
        stages = len(self.act)
        bounds = [0]
        for size in candidate.balance:
            bounds.append(bounds[-1] + size)
        bounds += [bounds[-1]] * (stages + 1 - len(bounds))
        for k in range(1, stages):
            add_hint(self.cut[k], bounds[k])
        tier_index = {t.memory_mb: i for i, t in enumerate(self.p.tiers)}
        for s in range(stages):
            active = s < len(candidate.balance)
            add_hint(self.act[s], active)
            tier = tier_index.get(candidate.memory_mb[s], 0) if active else 0
            replicas = candidate.replicas[s] if active else 1
            for t, lit in enumerate(self.z[s]):
                add_hint(lit, t == tier)
            for i, lit in enumerate(self.r[s]):
                add_hint(lit, i + 1 == replicas)
            four = self.y[s]
            if not isinstance(four, bool):
                add_hint(four, active and replicas > 1 and candidate.stage_sync(self.p, s) == "four_phase")

    def read(self, solver: cp_model.CpSolver) -> Candidate:
        stages = len(self.act)
        bounds = [solver.value(c) if not isinstance(c, int) else c for c in self.cut]
        balance, memory, replicas = [], [], []
        for s in range(stages):
            if not solver.boolean_value(self.act[s]):
                break
            balance.append(bounds[s + 1] - bounds[s])
            memory.append(self.p.tiers[next(t for t, z in enumerate(self.z[s]) if solver.boolean_value(z))].memory_mb)
            replicas.append(next(i + 1 for i, r in enumerate(self.r[s]) if solver.boolean_value(r)))
        syncs: tuple[str, ...] = ()
        if len(self.p.syncs) > 1:
            syncs = tuple("four_phase" if solver.boolean_value(self.y[s]) else "pipelined"
                          for s in range(len(balance)))
        return Candidate(tuple(balance), tuple(memory), tuple(replicas), syncs)


@dataclasses.dataclass(frozen=True)
class Rounding:
    """How the model of a problem rounds the formula (see :meth:`_Builder.rounding_slack`)."""

    rel: float
    units: float
    unit_s: float
    byte_unit: float

    def formula_deadline_s(self, deadline_s: float) -> float:
        """The most formula seconds of a plan the model lets through ``deadline_s``."""
        return (math.floor(deadline_s / self.unit_s) + self.units) * self.unit_s / (1 - self.rel)

    def memory_slack_bytes(self, num_micro_batches: int) -> float:
        """The most bytes a stage the model lets fit can exceed its tier by the formula: each
        of its byte tables off by at most one unit, the micro-batch terms ``n`` times."""
        return (8 + 3 * num_micro_batches) * self.byte_unit


def rounding(problem: Problem) -> Rounding:
    """The model's rounding of ``problem``: what a proven bound of the formula must allow for."""
    builder = _Builder(problem)
    rel, units = builder.rounding_slack()
    return Rounding(rel, units, builder.unit_s, builder.byte_unit)


def solve(
    problem: Problem,
    objective: Objective,
    *,
    deadline_s: float | None = None,
    budget_usd: float | None = None,
    exclude: Sequence[Candidate] = (),
    time_limit_s: float = 30.0,
    workers: int = 0,
    hint: Candidate | None = None,
    fix: Candidate | None = None,
    lower_bound: float | None = None,
    fastest_s: float | None = None,
) -> Solution | None:
    """Solve once; ``None`` when CP-SAT proves there is no solution.

    ``hint`` starts the search from a candidate; ``fix`` allows only that candidate
    (the model's value of one given plan). ``lower_bound`` is a proven lower bound of the
    formula's optimum (seconds for time; for cost, dollars without the invocation fee,
    which the model leaves out, and then ``fastest_s``, a lower bound of any plan's
    seconds, is needed too), for objective weights 1 and 0 only: the model is constrained
    to at least that, less its rounding (:meth:`_Builder.rounding_slack`).

    Raises:
        PlanTimeout: no solution was found within the time limit.
    """
    started = time.perf_counter()
    builder = _Builder(problem)
    if lower_bound is not None and 0 < objective.time_weight < 1:
        raise ValueError("lower_bound is for the time (weight 1) or cost (weight 0) objective")
    builder.build(objective, deadline_s=deadline_s, budget_usd=budget_usd, exclude=exclude,
                  lower_bound=lower_bound, fastest_s=fastest_s)
    if hint is not None and hint not in exclude and set(hint.memory_mb) <= {t.memory_mb for t in problem.tiers}:
        builder.hint(hint)
    if fix is not None:
        builder.hint(fix, fix=True)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.05, time_limit_s)
    solver.parameters.num_workers = workers or 0
    # More LP cuts for the enforced (big-M) constraints: on the 100-layer benchmark this
    # halves the time to prove a fixed stage count optimal.
    solver.parameters.linearization_level = 2
    if lower_bound is not None:
        # What is left above a proven bound is the model's rounding: stop within 1%.
        solver.parameters.relative_gap_limit = 0.01
    status = solver.solve(builder.model)
    if status == cp_model.INFEASIBLE:
        return None
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise PlanTimeout(
            f"CP-SAT found no plan within time_limit_s={time_limit_s:g} (status {solver.status_name(status)}, "
            f"{len(problem.profile.layers)} layers, tiers {[t.memory_mb for t in problem.tiers]} MB); hint: raise "
            "time_limit_s, or allow more tiers, stages or replicas so that simple plans fit"
        )
    objective_value = solver.objective_value
    bound = solver.best_objective_bound
    gap = 0.0 if status == cp_model.OPTIMAL else abs(objective_value - bound) / max(abs(objective_value), 1e-12)
    if lower_bound is not None and status == cp_model.OPTIMAL:
        # Stopped by relative_gap_limit, which CP-SAT also reports as OPTIMAL: keep the real gap.
        gap = abs(objective_value - bound) / max(abs(objective_value), 1e-12)
        if gap > 0:
            status = cp_model.FEASIBLE
    return Solution(
        candidate=builder.read(solver),
        iteration_s=solver.value(builder.T) * builder.unit_s,
        cost_usd=solver.value(builder.cost) * builder._cost_unit,
        status="optimal" if status == cp_model.OPTIMAL else "feasible",
        gap=gap,
        seconds=time.perf_counter() - started,
        objective=objective_value,
    )
