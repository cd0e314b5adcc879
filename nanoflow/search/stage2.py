"""Auto-search stage II (paper §4.1.3): resource shares R per nano-op, with interference.

Stage I's nano-ops, sizes, dependency links and per-group order stay fixed. Each nano-op picks R from
``r_levels`` (binaries ``w[x,r]``); its duration is ``D_best / P_kind(R)`` from the R -> P table, so durations stay
linear in the binaries. Nano-ops that may run at the same time - different streams, not ordered by the spec's
dependencies and stream order, in the same or consecutive layers (:meth:`PipelineSpec.concurrency`) - get an
overlap indicator q: q = 0 forces them apart in time, q = 1 lets them overlap and then requires
``R_x + R_y <= 1``; three pairwise-overlapping nano-ops (which then share an instant) need ``R_x + R_y + R_z <= 1``.
At most one nano-op per stream runs at a time, and there are at most three streams, so pairs and triples cover
every instant. The objective is the period with the same periodic wrap model as stage I.

A pair kept apart (q = 0) must stay apart at run time too, so the resulting spec orders it with an extra edge
(same layer) or an extra wrap edge (nano-op of layer l before one of layer l+1). Only orders the executor can
express are allowed: a nano-op of layer l+1 can never be made to finish before one of layer l starts.
After solving, every nano-op's R is raised as far as its actual overlaps allow (one running alone gets 1).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import pulp

from nanoflow.graphs.pipeline import PipelineSpec
from nanoflow.search.problem import SearchError, SearchProblem
from nanoflow.search.schedule import (
    TIME_TOL,
    PlannedNanoOp,
    compact_spec,
    group_members,
    period,
    plan_links,
    plan_to_spec,
    repair,
    spec_period,
)
from nanoflow.search.stage1 import Stage1Result, cbc, new_var

log = logging.getLogger("nanoflow.search")

DEFAULT_R_LEVELS = tuple(round(0.1 * k, 1) for k in range(1, 11))

Pair = tuple[int, int, int]
"""(x, y, shift): nano-op x of layer l and nano-op y of layer l + shift (shift 0: x < y)."""


@dataclass(frozen=True)
class Stage2Result:
    """Stage II's pipeline: ``spec`` carries shares (R) and planned start/end times; ``makespan_ms`` its period."""

    spec: PipelineSpec
    makespan_ms: float
    status: str
    wall_s: float
    plan: tuple[PlannedNanoOp, ...] = ()


def _conflicts(plan: list[PlannedNanoOp], pair: Pair, t: float, tol: float) -> bool:
    """True unless the plan keeps the pair apart in an order the executor can enforce with an edge."""
    x, y, k = pair
    a, b = plan[x], plan[y]
    if a.end <= b.start + k * t + tol:
        return False
    return not (k == 0 and b.end <= a.start + tol)


class _Stage2Model:
    def __init__(self, problem: SearchProblem, plan: list[PlannedNanoOp], pairs: list[Pair],
                 triples: list[tuple[tuple[int, int], ...]], levels: tuple[float, ...]):
        p = problem
        self.p, self.plan = p, plan
        base = [p.time(n.op, n.hi - n.lo) for n in plan]
        serial = sum(base)
        h = self.h = (2.0 if p.wrap else 1.0) * serial
        m = self.prob = pulp.LpProblem("nanoflow_stage2", pulp.LpMinimize)
        self.w: list[dict[float, pulp.LpVariable]] = []
        self.r, self.d, self.s = [], [], []
        for x, n in enumerate(plan):
            opts = {r: base[x] / p.perf(n.op, r) for r in levels if p.perf(n.op, r) > 0}
            opts = {r: d for r, d in opts.items() if d <= serial or r == 1.0}  # longer can never be optimal
            w = {r: new_var(m, f"w{x}_{int(round(r * 1000))}", cat="Binary") for r in opts}
            m += pulp.lpSum(w.values()) == 1
            self.w.append(w)
            self.r.append(pulp.lpSum(r * v for r, v in w.items()))
            self.d.append(pulp.lpSum(opts[r] * v for r, v in w.items()))
            self.s.append(new_var(m, f"s{x}", 0, h))
            m += self.s[x] + self.d[x] <= h
        self.t = new_var(m, "T", 0, serial)
        intra, wrap = plan_links(p, plan)
        chains = []
        self.windows = []
        for members in group_members(p, plan).values():
            members = sorted(members, key=lambda i: plan[i].start)
            chains += list(zip(members, members[1:]))
            if p.wrap:
                wlo, whi = new_var(m, f"wlo{members[0]}", 0, h), new_var(m, f"whi{members[0]}", 0, h)
                self.windows.append((wlo, whi, members))
                m += wlo <= self.s[members[0]]
                m += whi >= self.s[members[-1]] + self.d[members[-1]]
                m += whi - wlo <= self.t
            else:
                m += self.t >= self.s[members[-1]] + self.d[members[-1]]
        self.before = sorted(set(intra) | set(chains))
        for x, y in self.before:
            m += self.s[y] >= self.s[x] + self.d[x]
        for x, y in wrap:
            m += self.s[y] + self.t >= self.s[x] + self.d[x]
        self.q: dict[Pair, pulp.LpVariable] = {}
        self.b: dict[Pair, pulp.LpVariable] = {}
        for x, y, k in pairs:
            q = self.q[(x, y, k)] = new_var(m, f"q{x}_{y}_{k}", cat="Binary")
            m += self.r[x] + self.r[y] <= 2 - q
            if k == 0:
                b = self.b[(x, y, k)] = new_var(m, f"b{x}_{y}", cat="Binary")
                m += self.s[x] + self.d[x] <= self.s[y] + h * (b + q)
                m += self.s[y] + self.d[y] <= self.s[x] + h * (1 - b + q)
            else:
                m += self.s[x] + self.d[x] <= self.s[y] + self.t + h * q
        for tri in triples:
            qs = [self.q[_pair_key(u, v)] for u, v in ((tri[0], tri[1]), (tri[0], tri[2]), (tri[1], tri[2]))]
            m += pulp.lpSum(self.r[i] for i, _ in tri) <= 1 + 2 * (3 - pulp.lpSum(qs))
        m += self.t

    def starts(self, shares: list[float], levels: tuple[float, ...]) -> list[tuple[list[PlannedNanoOp], bool]]:
        """Feasible starting plans: (plan, every pair allowed to overlap).

        1. All R = 1, one nano-op after another in issue order (every pair kept apart).
        2. Stage I's order with its valid shares (rounded down to a level): any nano-ops that may run together
           then sum to <= 1, so every pair may overlap; each nano-op starts when its links and group allow.
        """
        serial, at = [], 0.0
        for n in self.plan:
            d = _duration(self.p, n, 1.0)
            serial.append(n._replace(start=at, end=at + d, share=1.0))
            at += d
        out = [(serial, False)]
        rounded = [max((r for r in levels if r <= sh + 1e-9), default=None) for sh in shares]
        if all(r is not None for r in rounded):
            shared = [n._replace(share=r) for n, r in zip(self.plan, rounded, strict=True)]
            preds: dict[int, list[int]] = {}
            for x, y in self.before:
                preds.setdefault(y, []).append(x)
            for y, n in enumerate(shared):  # issue order is topological for links and group chains
                start = max((shared[x].end for x in preds.get(y, [])), default=0.0)
                shared[y] = n._replace(start=start, end=start + _duration(self.p, n, n.share))
            out.append((shared, True))
        return out

    def warm_start(self, plan: list[PlannedNanoOp], all_overlap: bool, t: float) -> None:
        for x, n in enumerate(plan):
            for r, v in self.w[x].items():
                v.setInitialValue(int(abs(r - n.share) < 1e-9))
            self.s[x].setInitialValue(n.start)
        self.t.setInitialValue(t)
        for v in self.q.values():
            v.setInitialValue(int(all_overlap))
        for (x, y, _), v in self.b.items():
            v.setInitialValue(int(plan[y].start < plan[x].start))
        for wlo, whi, members in self.windows:
            wlo.setInitialValue(min(plan[i].start for i in members))
            whi.setInitialValue(max(plan[i].end for i in members))

    def solve(self, limit_s: float, msg: bool, shares: list[float], levels: tuple[float, ...]
              ) -> tuple[list[PlannedNanoOp], str, float]:
        """The plan (in the input's order), its status and the period T it was proved feasible at.

        Falls back to the best starting plan ("warm-start") when the solver returns nothing in time.
        """
        scored = []
        for plan, all_overlap in self.starts(shares, levels):
            t = period(self.p, plan) if all_overlap else max(period(self.p, plan), plan[-1].end)
            scored.append((t, plan, all_overlap))
        t0, plan0, all_overlap = min(scored, key=lambda c: c[0])
        self.warm_start(plan0, all_overlap, t0)
        self.prob.solve(cbc(limit_s, msg))
        sol = self.prob.sol_status
        if sol not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            log.info("stage II: no solver answer in time (%s); using the best starting plan", pulp.LpSolution[sol])
            return plan0, "warm-start", t0
        out = []
        for x, n in enumerate(self.plan):
            r = max(self.w[x], key=lambda lv: self.w[x][lv].value() or 0.0)
            start = max(0.0, self.s[x].value() or 0.0)
            out.append(n._replace(start=start, end=start + _duration(self.p, n, r), share=r))
        return out, "optimal" if sol == pulp.LpSolutionOptimal else "feasible", float(self.t.value())


def _pair_key(u: tuple[int, int], v: tuple[int, int]) -> Pair:
    (x, lx), (y, ly) = sorted([u, v], key=lambda node: (node[1], node[0]))
    return (x, y, ly - lx)


def _duration(problem: SearchProblem, n: PlannedNanoOp, r: float) -> float:
    return problem.time(n.op, n.hi - n.lo) / problem.perf(n.op, r)


def _raise_shares(problem: SearchProblem, plan: list[PlannedNanoOp], pairs: list[Pair],
                  triples: list[tuple[tuple[int, int], ...]], levels: tuple[float, ...], t: float
                  ) -> list[PlannedNanoOp]:
    """Give each nano-op the largest R its actual overlaps allow; shorter durations keep the plan feasible.

    Overlaps with the next layer are judged at the solver's period ``t`` (the extra wrap edges then hold at it).
    """
    plan = list(plan)
    tol = TIME_TOL * max(t, 1.0)
    for x in range(len(plan)):
        for r in sorted(levels, reverse=True):
            if r <= plan[x].share:
                break
            trial = list(plan)
            trial[x] = plan[x]._replace(end=plan[x].start + _duration(problem, plan[x], r), share=r)
            hit = {pr for pr in pairs if x in pr[:2] and _conflicts(trial, pr, t, tol)}
            ok = all(trial[a].share + trial[b].share <= 1 + 1e-9 for a, b, _ in hit)
            for tri in triples:
                if ok and x in (i for i, _ in tri):
                    keys = [_pair_key(u, v) for u, v in ((tri[0], tri[1]), (tri[0], tri[2]), (tri[1], tri[2]))]
                    if all(_conflicts(trial, key, t, tol) for key in keys):
                        ok = sum(trial[i].share for i, _ in tri) <= 1 + 1e-9
            if ok:
                plan = trial
                break
    return plan


def _order_apart(problem: SearchProblem, spec: PipelineSpec, t: float) -> PipelineSpec:
    """Add the extra (wrap) edges that keep apart concurrent nano-ops whose shares sum above 1 (module docstring)."""
    graph = problem.layer_graph()
    nano = spec.nano_ops
    plan = [PlannedNanoOp(n.op, n.lo, n.hi, n.start_ms, n.end_ms, n.share) for n in nano]
    tol = TIME_TOL * max(t, 1.0)
    for _ in range(len(nano) ** 2):
        pairs, triples = spec.concurrency(graph)
        bad = [[pr] for pr in pairs if nano[pr[0]].share + nano[pr[1]].share > 1 + 1e-9]
        bad += [[_pair_key(u, v) for u, v in ((tr[0], tr[1]), (tr[0], tr[2]), (tr[1], tr[2]))]
                for tr in triples if sum(nano[i].share for i, _ in tr) > 1 + 1e-9]
        if not bad:
            return spec
        intra, wrap = set(spec.extra_edges), set(spec.extra_wrap_edges)
        chosen = []
        for group in bad:  # each group needs one of its pairs ordered; orders agree with the plan
            apart = sorted((pr for pr in group if not _conflicts(plan, pr, t, tol)), key=lambda pr: pr[2])
            if not apart:
                raise SearchError(f"internal: stage II left {group} overlapping with shares above 1")
            chosen.append(apart[0])
        # Same-layer edges first: with stream order they often separate the cross-layer pairs too.
        for x, y, k in [c for c in chosen if c[2] == 0] or chosen:
            if k == 1:
                wrap.add((x, y))
            else:
                intra.add((x, y) if plan[x].end <= plan[y].start + tol and x < y else (y, x))
        spec = replace(spec, extra_edges=tuple(sorted(intra)), extra_wrap_edges=tuple(sorted(wrap)))
    raise SearchError("internal: stage II could not order its concurrent nano-ops")


def solve_stage2(problem: SearchProblem, stage1: Stage1Result, r_levels: tuple[float, ...] = DEFAULT_R_LEVELS,
                 time_limit_s: float = 120, msg: bool = False) -> Stage2Result:
    """Choose R per nano-op of stage I's pipeline, minimising the period under interference (module docstring)."""
    t0 = time.monotonic()
    levels = tuple(sorted({round(float(r), 6) for r in r_levels} | {1.0}))
    if levels[0] <= 0 or levels[-1] > 1:
        raise SearchError(f"r_levels {list(r_levels)} must lie in (0, 1]")
    if any(n.start_ms is None for n in stage1.spec.nano_ops):
        raise SearchError("stage I's spec has no planned times; pass the Stage1Result of solve_stage1")
    spec1 = stage1.spec
    plan = [PlannedNanoOp(n.op, n.lo, n.hi, n.start_ms, n.end_ms) for n in spec1.nano_ops]
    pairs, triples = spec1.concurrency(problem.layer_graph())
    model = _Stage2Model(problem, plan, pairs, triples, levels)
    shares = [n.share for n in spec1.nano_ops]
    solved, status, t_plan = model.solve(time_limit_s - (time.monotonic() - t0), msg, shares, levels)
    # The solver's T, not period(): T also keeps apart the pairs it chose to separate across the wrap.
    solved = repair(problem, solved)
    t_plan = max(t_plan, period(problem, solved))
    solved = _raise_shares(problem, solved, pairs, triples, levels, t_plan)
    spec = plan_to_spec(problem, solved, "searched", {})
    spec = compact_spec(problem, _order_apart(problem, spec, t_plan))
    t = spec_period(problem, spec)
    log.info("stage II: %s, period %.4f ms (stage I %.4f ms), %.1f s", status, t, stage1.makespan_ms,
             time.monotonic() - t0)
    meta = {"stage": 2, "period_ms" if problem.wrap else "makespan_ms": t, "status": status,
            "stage1_period_ms": stage1.makespan_ms, "sequential_ms": problem.sequential_ms,
            "r_levels": list(levels), **spec.meta}
    spec = replace(spec, meta=meta)
    spec.validate(problem.layer_graph())
    plan = tuple(PlannedNanoOp(n.op, n.lo, n.hi, n.start_ms, n.end_ms, n.share) for n in spec.nano_ops)
    return Stage2Result(spec, t, status, time.monotonic() - t0, plan)
