"""Auto-search stage I (paper §4.1.2): number, sizes and order of nano-ops, without interference.

The MILP, for a given number of slots K_A per op A (solved with PuLP's bundled CBC):

- sizes: slot i of A picks one size from the grid (or 0 for slots after the first: the op then uses fewer
  nano-ops) through binaries ``z[A,i,g]``; sizes sum to the dense batch, empty slots come last, so slot i covers
  rows ``[lo_i, hi_i)`` with cut points that are sums of grid sizes. Duration = profiled time at that size.
- dependencies: for an edge A -> B, nano-ops (A,i) and (B,j) are ordered iff their ranges intersect (cross-token
  edges: iff lo(A,i) < hi(B,j)). Binaries u = [lo_A < hi_B], v = [lo_B < hi_A] with ``u = 0 => lo_A >= hi_B``
  (big-M on the rows); the precedence ``start_B >= end_A`` is enforced when u, v and both slots are non-empty.
  Slot positions settle some tests for free (slot 0 starts at row 0, the last slot ends at the dense size).
- row order: an op's nano-ops run in the order of their rows (symmetry breaking: it removes equivalent orders
  and many disjunctions; it matches the batch layout, decode rows first, and the KV-cache reads of prefill,
  which make later rows depend on earlier ones). Slot 0 of an op then precedes every slot of its descendants.
- resources: nano-ops of one group (COMPUTE / MEMORY / NETWORK, OTHER joining its neighbour's, see
  :mod:`nanoflow.search.problem`) never overlap: one disjunction binary per pair.
- periodic wrap (``problem.wrap``): layer l+1 runs the same plan shifted by T. Wrap edges into layer l+1 give
  ``start_B + T >= end_A``; same-group nano-ops of consecutive layers must not overlap, which we impose by the
  sufficient condition that each group's busy window is at most T long (an approximation: it forbids a group's
  nano-ops of two layers from interleaving, which a stream's FIFO order forbids anyway). Minimise T; without
  wrap, minimise the makespan. A tiny cost per extra nano-op prefers fewer nano-ops at equal makespan (splitting
  costs batching efficiency, paper §4.1.2).

Search loop: start with 2 slots per op (one may stay empty), then add a slot to the ops next to the compute
bubbles of the best plan while the period improves, up to ``max_split``. Each solve is warm-started from the best
plan so far (first: the sequential schedule), so a feasible answer always exists; the time limit covers all rounds.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import pulp

from nanoflow.graphs.pipeline import PipelineSpec
from nanoflow.search.problem import SearchError, SearchProblem
from nanoflow.search.schedule import (
    PlannedNanoOp,
    compacted,
    compute_bubbles,
    list_schedule,
    ops_near,
    period,
    placeholder_shares,
    plan_to_spec,
    repair,
    sequential_plan,
)

log = logging.getLogger("nanoflow.search")


def new_var(prob: pulp.LpProblem, name: str, low: float | None = None, up: float | None = None,
            cat: str = "Continuous") -> pulp.LpVariable:
    """A variable attached to ``prob`` (PuLP >= 3.3 API, plain ``LpVariable`` before it)."""
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, low, up, cat=cat)
    return pulp.LpVariable(name, low, up, cat=cat)


def cbc(limit_s: float, msg: bool) -> pulp.LpSolver:
    """PuLP's bundled CBC with a wall-clock limit and warm start (its PuLP 4 deprecation notice is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # Without CBC's preprocessing our warm starts are always accepted (with it, CBC sometimes rejects a
        # feasible start), and on LLaMA-sized stage I models it proved optimality about twice as fast.
        return pulp.PULP_CBC_CMD(msg=msg, timeLimit=max(0.1, limit_s), warmStart=True, options=["preprocess off"])


MIN_ROUND_S = 0.3
"""No new round is started with less time left than this (model building alone takes a fraction of it)."""


@dataclass(frozen=True)
class Stage1Result:
    """Stage I's pipeline: ``spec`` has planned times and placeholder shares (1 / nano-ops it may run with)."""

    spec: PipelineSpec
    makespan_ms: float
    """Period of the periodic plan (time per layer in steady state); without wrap, the layer's makespan."""
    nano_counts: dict[str, int]
    status: str
    """"optimal": the last MILP round was proved optimal and more nano-ops did not help; "feasible": the time limit
    cut the search short; "heuristic" / "sequential": no MILP answer in time, the list-scheduled warm start (or the
    sequential schedule) is returned."""
    wall_s: float
    plan: tuple[PlannedNanoOp, ...] = ()


class _Stage1Model:
    """The MILP for fixed slot counts; see the module docstring."""

    def __init__(self, problem: SearchProblem, counts: dict[str, int], upper_ms: float):
        p, dense = problem, problem.dense_batch_size
        self.p, self.counts = p, counts
        self.h = h = (2.0 if p.wrap else 1.0) * p.sequential_ms
        m = self.prob = pulp.LpProblem("nanoflow_stage1", pulp.LpMinimize)
        self.z: dict[tuple[str, int], dict[int, pulp.LpVariable]] = {}
        self.s: dict[tuple[str, int], pulp.LpVariable] = {}
        self.lo, self.hi, self.dur, self.ne = {}, {}, {}, {}
        for ai, a in enumerate(p.names):
            acc = pulp.LpAffineExpression()
            for i in range(counts[a]):
                x = (a, i)
                sizes = list(p.grid) if counts[a] > 1 else [dense]
                zs = {g: new_var(m, f"z{ai}_{i}_{g}", cat="Binary") for g in ([0] if i else []) + sizes}
                m += pulp.lpSum(zs.values()) == 1
                self.z[x] = zs
                self.dur[x] = pulp.lpSum(p.time(a, g) * v for g, v in zs.items() if g)
                self.ne[x] = (1 - zs[0]) if i else None  # None: always non-empty
                if i >= 2:
                    m += self.z[(a, i - 1)][0] <= zs[0]
                self.lo[x] = acc
                acc = acc + pulp.lpSum(g * v for g, v in zs.items())
                self.hi[x] = acc
                self.s[x] = new_var(m, f"s{ai}_{i}", 0, h)
                m += self.s[x] + self.dur[x] <= h
            m += acc == dense
        self.t = new_var(m, "T", 0, upper_ms)
        self.aux: dict[str, tuple[tuple[str, int], tuple[str, int], list]] = {}  # binaries of slot pairs
        for shift, edges in ((False, p.intra_edges), (True, p.wrap_edges)):
            for e in edges:
                for i in range(counts[e.src]):
                    for j in range(counts[e.dst]):
                        self._precedence(e, (e.src, i), (e.dst, j), shift)
        for a in p.names:  # row order: an op's nano-ops run in the order of their rows (symmetry breaking)
            for i in range(1, counts[a]):
                m += self.s[(a, i - 1)] + self.dur[(a, i - 1)] <= self.s[(a, i)]
        anc = _ancestors(p)
        self.windows = {}
        for g, members in self._groups().items():
            for k, x in enumerate(members):
                for y in members[k + 1:]:
                    # Already ordered: slots of one op (row order), and slot 0 of an op before every slot of its
                    # descendants (slot-0 ranges always intersect, so the chain of slot 0s is a hard precedence).
                    if x[0] == y[0] or (x[1] == 0 and x[0] in anc[y[0]]) or (y[1] == 0 and y[0] in anc[x[0]]):
                        continue
                    self._disjoint(x, y)
            if p.wrap:
                wlo, whi = new_var(m, f"wlo_{g.value}", 0, h), new_var(m, f"whi_{g.value}", 0, h)
                self.windows[g] = (wlo, whi)
                for x in members:
                    off = self._off([self.ne[x]])
                    m += wlo <= self.s[x] + h * off
                    m += whi >= self.s[x] + self.dur[x] - h * off
                m += whi - wlo <= self.t
            else:
                for x in members:
                    m += self.t >= self.s[x] + self.dur[x]
        split_cost = 1e-4 * p.sequential_ms
        m += self.t + split_cost * pulp.lpSum(ne for ne in self.ne.values() if ne is not None)

    def _groups(self) -> dict:
        groups: dict = {}
        for a in self.p.names:
            groups.setdefault(self.p.group(a), []).extend((a, i) for i in range(self.counts[a]))
        return groups

    @staticmethod
    def _off(flags: list) -> pulp.LpAffineExpression:
        """Number of the given 0/1 conditions that are false (0 when all hold); ``None`` entries always hold."""
        live = [f for f in flags if f is not None]
        return len(live) - pulp.lpSum(live)

    def _precedence(self, e, x: tuple[str, int], y: tuple[str, int], shift: bool) -> None:
        dense, m = self.p.dense_batch_size, self.prob
        (a, i), (b, j) = x, y
        last_a, last_b = i == self.counts[a] - 1, j == self.counts[b] - 1
        conds = [self.ne[x], self.ne[y]]
        name = f"{self.p.names.index(a)}_{i}_{self.p.names.index(b)}_{j}_{int(shift)}"
        if not (i == 0 or last_b):  # lo_x < hi_y is automatic for slot 0 of A or the last slot of B
            u = new_var(m, f"u{name}", cat="Binary")
            m += self.lo[x] - self.hi[y] >= -dense * u
            conds.append(u)
        if not e.cross_token and not (j == 0 or last_a):
            v = new_var(m, f"v{name}", cat="Binary")
            m += self.lo[y] - self.hi[x] >= -dense * v
            conds.append(v)
        self.aux[name] = (x, y, conds)
        start_y = self.s[y] + (self.t if shift else 0)
        m += start_y >= self.s[x] + self.dur[x] - self.h * self._off(conds)

    def _disjoint(self, x: tuple[str, int], y: tuple[str, int]) -> None:
        o = new_var(self.prob, f"o{self.p.names.index(x[0])}_{x[1]}_{self.p.names.index(y[0])}_{y[1]}", cat="Binary")
        off = self._off([self.ne[x], self.ne[y]])
        self.prob += self.s[x] + self.dur[x] <= self.s[y] + self.h * (1 - o) + self.h * off
        self.prob += self.s[y] + self.dur[y] <= self.s[x] + self.h * o + self.h * off
        self.aux[o.name] = (x, y, [o])

    # ---- warm start and extraction ---------------------------------------------------------------------------
    def warm_start(self, plan: list[PlannedNanoOp]) -> None:
        """Set every variable from a feasible plan whose ops use at most ``counts`` nano-ops each."""
        slots: dict[tuple[str, int], PlannedNanoOp | None] = {}
        for a in self.p.names:
            mine = sorted((n for n in plan if n.op == a), key=lambda n: n.lo)
            for i in range(self.counts[a]):
                slots[(a, i)] = mine[i] if i < len(mine) else None
        for x, zs in self.z.items():
            n = slots[x]
            for g, v in zs.items():
                v.setInitialValue(int(g == (n.hi - n.lo if n else 0)))
            self.s[x].setInitialValue(n.start if n else max(m.end for m in plan))
        rng = {x: ((n.lo, n.hi) if n else (self.p.dense_batch_size,) * 2) for x, n in slots.items()}
        for x, y, conds in self.aux.values():
            for c in conds:
                if isinstance(c, pulp.LpVariable) and c.name.startswith("u"):
                    c.setInitialValue(int(rng[x][0] < rng[y][1]))
                elif isinstance(c, pulp.LpVariable) and c.name.startswith("v"):
                    c.setInitialValue(int(rng[y][0] < rng[x][1]))
                elif isinstance(c, pulp.LpVariable) and c.name.startswith("o"):
                    nx, ny = slots[x], slots[y]
                    c.setInitialValue(int(nx is None or ny is None or (nx.start, nx.end) <= (ny.start, ny.end)))
        t = period(self.p, plan)
        self.t.setInitialValue(t)
        for g, (wlo, whi) in self.windows.items():
            members = [n for n in plan if self.p.group(n.op) is g]
            wlo.setInitialValue(min(n.start for n in members))
            whi.setInitialValue(max(n.end for n in members))

    def solve(self, limit_s: float, msg: bool) -> tuple[list[PlannedNanoOp] | None, str]:
        solver = cbc(limit_s, msg)
        self.prob.solve(solver)
        sol = self.prob.sol_status
        if sol not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return None, pulp.LpSolution[sol]
        plan = []
        for x, zs in self.z.items():
            size = max(zs, key=lambda g: zs[g].value() or 0.0)
            if size:
                plan.append((x, size, max(0.0, self.s[x].value() or 0.0)))
        out, at = [], {}
        for (a, _), size, start in sorted(plan, key=lambda r: (self.p.names.index(r[0][0]), r[0][1])):
            lo = at.get(a, 0)
            at[a] = lo + size
            out.append(PlannedNanoOp(a, lo, lo + size, start, start + self.p.time(a, size)))
        return compacted(self.p, repair(self.p, out)), "optimal" if sol == pulp.LpSolutionOptimal else "feasible"


def _heuristic_plan(problem: SearchProblem, counts: dict[str, int]) -> list[PlannedNanoOp]:
    """The best list-scheduled plan over uniform two-way splits (every splittable op cut at the same row)."""
    dense = problem.dense_batch_size
    best = sequential_plan(problem)
    best_t = period(problem, best)
    for cut in [c for c in problem.grid if c < dense and dense - c in problem.grid]:
        ranges = {a: [(0, cut), (cut, dense)] if counts[a] >= 2 else [(0, dense)] for a in problem.names}
        for rule in ("bottom", "batch"):
            plan = list_schedule(problem, ranges, rule)
            t = period(problem, plan)
            if t < best_t * (1 - 1e-9):
                best, best_t = plan, t
    return best


def _ancestors(problem: SearchProblem) -> dict[str, set[str]]:
    """For each op, the ops with a dependency path to it inside the layer."""
    anc: dict[str, set[str]] = {a: set() for a in problem.names}
    for b in problem.names:  # layer order is topological
        for e in problem.intra_edges:
            if e.dst == b:
                anc[b] |= {e.src} | anc[e.src]
    return anc


def solve_stage1(problem: SearchProblem, max_split: int = 4, time_limit_s: float = 600, msg: bool = False,
                 start_split: int = 2) -> Stage1Result:
    """Search nano-op counts, sizes and order minimising the layer's period (see the module docstring)."""
    if max_split < 1 or start_split < 1:
        raise SearchError(f"max_split ({max_split}) and start_split ({start_split}) must be at least 1")
    if time_limit_s <= 0:
        raise SearchError(f"time_limit_s must be positive, got {time_limit_s}")
    t0 = time.monotonic()
    deadline = t0 + time_limit_s
    counts = {a: min(start_split, max_split) for a in problem.names}
    best = sequential_plan(problem)
    best_t, status, finished, rnd = period(problem, best), "sequential", False, 0
    prev_t = float("inf")  # period found by the previous MILP round
    retry = False  # the current slot counts are being re-solved with all the time left
    log.info("stage I: sequential period %.4f ms", best_t)
    heuristic = _heuristic_plan(problem, counts)
    if period(problem, heuristic) < best_t * (1 - 1e-6):
        best, best_t, status = heuristic, period(problem, heuristic), "heuristic"
        log.info("stage I: list-scheduled warm start, period %.4f ms", best_t)
    while (remaining := deadline - time.monotonic()) >= MIN_ROUND_S:
        rnd += 1
        growable = any(c < max_split for c in counts.values())
        round_end = deadline - (remaining * 0.5 if growable and not retry else 0.0)
        model = _Stage1Model(problem, counts, upper_ms=best_t * (1 + 1e-9) + 1e-12)
        model.warm_start(best)
        plan, sol = model.solve(round_end - time.monotonic(), msg)
        new_t = period(problem, plan) if plan is not None else float("inf")
        log.info("stage I round %d: slots %s -> %s, period %.4f ms (best %.4f), %.1f s elapsed", rnd,
                 dict(counts), sol, new_t, best_t, time.monotonic() - t0)
        if plan is None:
            break
        if new_t >= prev_t * (1 - 1e-6):  # more nano-ops did not help: the paper's stopping rule
            if sol != "optimal" and not retry:  # ... unless the solver ran out of its share of the time
                retry = True
                continue
            finished = sol == "optimal"
            break
        retry = False
        prev_t = new_t
        if new_t < best_t * (1 - 1e-9):
            best, best_t = plan, new_t
        status = sol
        used = {a: sum(n.op == a for n in best) for a in problem.names}
        grow = set()
        for bubble in compute_bubbles(problem, best, best_t):
            grow |= {a for a in ops_near(problem, best, bubble, best_t) if used[a] == counts[a] < max_split}
        if not grow:
            finished = sol == "optimal"
            break
        for a in grow:
            counts[a] += 1
    if not finished and status == "optimal":
        status = "feasible"  # the time limit stopped the search before more nano-ops were tried
    spec = plan_to_spec(problem, best, "searched-stage1", {
        "stage": 1, "period_ms" if problem.wrap else "makespan_ms": best_t, "status": status,
        "sequential_ms": problem.sequential_ms, "rounds": rnd})
    spec = placeholder_shares(problem, spec)
    spec.validate(problem.layer_graph())
    nano_counts = {a: sum(n.op == a for n in best) for a in problem.names}
    return Stage1Result(spec, best_t, nano_counts, status, time.monotonic() - t0, tuple(best))
