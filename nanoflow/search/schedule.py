"""Planned schedules of one layer: the common currency of stage I, stage II and the Gantt chart.

A plan is a list of :class:`PlannedNanoOp` (op, rows, start/end in ms inside one layer, share). In the periodic
model (``problem.wrap``) layer l+1 repeats the plan shifted by the period T, so a plan is feasible when
- nano-ops linked by a dependency edge (ranges intersecting, or cross-token) are ordered;
- nano-ops of one resource group never overlap, and each group's busy window (first start to last end) is at
  most T long, so layer l+1's nano-ops of that group start after layer l's end (stream FIFO order holds);
- a wrap edge from nano-op x of layer l to y of layer l+1 has ``end(x) <= start(y) + T``.
:func:`period` returns the smallest such T (no wrap: the makespan).
"""

from __future__ import annotations

import heapq
from dataclasses import replace
from typing import NamedTuple

from nanoflow.graphs.nanoop import LayerGraph, ResourceKind
from nanoflow.graphs.pipeline import NanoOpSpec, PipelineSpec, links
from nanoflow.search.problem import SearchError, SearchProblem

TIME_TOL = 1e-6
"""Relative tolerance (of the period) for comparing planned times: the MILP solver's own tolerance is ~1e-7."""


class PlannedNanoOp(NamedTuple):
    op: str
    lo: int
    hi: int
    start: float
    end: float
    share: float = 1.0


def sequential_plan(problem: SearchProblem) -> list[PlannedNanoOp]:
    """One nano-op per op over the whole batch, one after another in layer order."""
    plan, t = [], 0.0
    for n in problem.names:
        d = problem.time(n, problem.dense_batch_size)
        plan.append(PlannedNanoOp(n, 0, problem.dense_batch_size, t, t + d))
        t += d
    return plan


Links = list[tuple[int, int]]


def plan_links(problem: SearchProblem, plan: list[PlannedNanoOp]) -> tuple[Links, Links]:
    """Nano-level precedence pairs (i, j) - j waits on i - inside a layer, and from layer l into l+1."""
    out: tuple[Links, Links] = ([], [])
    for k, edges in enumerate((problem.intra_edges, problem.wrap_edges)):
        for e in edges:
            for i, a in enumerate(plan):
                if a.op != e.src:
                    continue
                for j, b in enumerate(plan):
                    if b.op == e.dst and links(e, (a.lo, a.hi), (b.lo, b.hi)):
                        out[k].append((i, j))
    return out


def group_members(problem: SearchProblem, plan: list[PlannedNanoOp]) -> dict[ResourceKind, list[int]]:
    groups: dict[ResourceKind, list[int]] = {}
    for i, n in enumerate(plan):
        groups.setdefault(problem.group(n.op), []).append(i)
    return groups


def period(problem: SearchProblem, plan: list[PlannedNanoOp]) -> float:
    """The steady-state time per layer of a plan (see module docstring); without wrap, its makespan."""
    if not problem.wrap:
        return max(n.end for n in plan) - min(0.0, min(n.start for n in plan))
    t = 0.0
    for members in group_members(problem, plan).values():
        t = max(t, max(plan[i].end for i in members) - min(plan[i].start for i in members))
    for i, j in plan_links(problem, plan)[1]:
        t = max(t, plan[i].end - plan[j].start)
    return t


def check_plan(problem: SearchProblem, plan: list[PlannedNanoOp]) -> None:
    """Raise :class:`SearchError` if the plan breaks coverage, a dependency or a group's exclusivity."""
    tol = TIME_TOL * max(1.0, period(problem, plan))
    for name in problem.names:
        ranges = sorted((n.lo, n.hi) for n in plan if n.op == name)
        at = 0
        for lo, hi in ranges:
            if lo != at or hi <= lo:
                raise SearchError(f"plan: op {name!r} does not tile [0, {problem.dense_batch_size}) ({ranges})")
            at = hi
        if at != problem.dense_batch_size:
            raise SearchError(f"plan: op {name!r} does not tile [0, {problem.dense_batch_size}) ({ranges})")
    for i, j in plan_links(problem, plan)[0]:
        if plan[j].start < plan[i].end - tol:
            raise SearchError(f"plan: {plan[j].op}[{plan[j].lo}:{plan[j].hi}) starts before "
                              f"{plan[i].op}[{plan[i].lo}:{plan[i].hi}) ends")
    for members in group_members(problem, plan).values():
        spans = sorted((plan[i].start, plan[i].end) for i in members)
        for (_, e0), (s1, _) in zip(spans, spans[1:]):
            if s1 < e0 - tol:
                raise SearchError(f"plan: two nano-ops of one resource group overlap at {s1:.4f} ms")


def issue_order(problem: SearchProblem, plan: list[PlannedNanoOp]) -> list[int]:
    """Plan indices by start time (ties: layer order of the op, then rows), never before a nano-op they wait on.

    A topological order by construction, so it stays valid even when solver noise or zero-length nano-ops blur
    the start times of linked nano-ops.
    """
    pos = {n: k for k, n in enumerate(problem.names)}
    succ: dict[int, list[int]] = {}
    waiting = [0] * len(plan)
    for i, j in plan_links(problem, plan)[0]:
        succ.setdefault(i, []).append(j)
        waiting[j] += 1
    key = [(plan[i].start, pos[plan[i].op], plan[i].lo, i) for i in range(len(plan))]
    ready = [key[i] for i in range(len(plan)) if not waiting[i]]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)[-1]
        order.append(i)
        for j in succ.get(i, []):
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(ready, key[j])
    return order


def repair(problem: SearchProblem, plan: list[PlannedNanoOp]) -> list[PlannedNanoOp]:
    """Push starts forward (keeping durations) until dependencies and group order hold exactly.

    A solver's answer satisfies its constraints only up to ~1e-7; exact plans make warm starts reliable and
    reported times consistent. The shifts are of that order, in issue order (a topological order of the plan).
    """
    preds: dict[int, list[int]] = {}
    for i, j in plan_links(problem, plan)[0]:
        preds.setdefault(j, []).append(i)
    out = list(plan)
    last: dict[ResourceKind, int] = {}
    for j in issue_order(problem, plan):
        n = out[j]
        g = problem.group(n.op)
        start = max([n.start] + [out[i].end for i in preds.get(j, [])] + ([out[last[g]].end] if g in last else []))
        out[j] = n._replace(start=start, end=start + (n.end - n.start))
        last[g] = j
    return out


def compacted(problem: SearchProblem, plan: list[PlannedNanoOp]) -> list[PlannedNanoOp]:
    """The plan with every nano-op moved as early as its order allows, if that does not lengthen the period."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for n in plan:
        ranges.setdefault(n.op, []).append((n.lo, n.hi))
    key = {(n.op, n.lo): n for n in plan}
    tight = list_schedule(problem, ranges, "given", {k: n.start for k, n in key.items()},
                          {k: n.end - n.start for k, n in key.items()})
    tight = [n._replace(share=key[(n.op, n.lo)].share) for n in tight]
    return tight if period(problem, tight) <= period(problem, plan) * (1 + 1e-9) else plan


def plan_to_spec(problem: SearchProblem, plan: list[PlannedNanoOp], name: str, meta: dict,
                 extra_edges: tuple[tuple[int, int], ...] = (),
                 extra_wrap_edges: tuple[tuple[int, int], ...] = ()) -> PipelineSpec:
    """A spec of the plan in issue order (see :func:`issue_order`); edges are given in issue-order indices."""
    nano = tuple(NanoOpSpec(n.op, n.lo, n.hi, problem.stream(n.op), n.share, n.start, n.end)
                 for n in (plan[i] for i in issue_order(problem, plan)))
    streams = max(n.stream for n in nano) + 1
    kinds = {o.name: o.kind.value for o in problem.ops}
    meta = {**meta, "kinds": kinds, "wrap": problem.wrap}
    return PipelineSpec(name, problem.dense_batch_size, nano, tuple(extra_edges), streams, meta,
                        tuple(extra_wrap_edges))


def placeholder_shares(problem: SearchProblem, spec: PipelineSpec) -> PipelineSpec:
    """Shares that make an interference-free plan valid: 1 / (largest set of nano-ops it may run with).

    Any set of nano-ops that may run together then sums to at most 1; stage II replaces these with real shares.
    """
    pairs, triples = spec.concurrency(problem.layer_graph())
    clique = [1] * len(spec.nano_ops)
    for i, j, _ in pairs:
        clique[i], clique[j] = max(clique[i], 2), max(clique[j], 2)
    for t in triples:
        for i, _ in t:
            clique[i] = 3
    nano = tuple(replace(n, share=int(10_000 / c) / 10_000) for n, c in zip(spec.nano_ops, clique, strict=True))
    return replace(spec, nano_ops=nano)


def compute_bubbles(problem: SearchProblem, plan: list[PlannedNanoOp], t: float) -> list[tuple[float, float]]:
    """Idle intervals of the compute group within one period (no wrap: within [0, makespan])."""
    iv = sorted((n.start, n.end) for n in plan if problem.group(n.op) is ResourceKind.COMPUTE and n.end > n.start)
    if not iv:
        return []
    merged = [list(iv[0])]
    for s, e in iv[1:]:
        if s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    if problem.wrap:
        gaps = [(a[1], b[0]) for a, b in zip(merged, merged[1:])] + [(merged[-1][1], merged[0][0] + t)]
    else:
        gaps = [(0.0, merged[0][0])] + [(a[1], b[0]) for a, b in zip(merged, merged[1:])] + [(merged[-1][1], t)]
    return [(a, b) for a, b in gaps if b - a > 1e-3 * t]


def ops_near(problem: SearchProblem, plan: list[PlannedNanoOp], bubble: tuple[float, float], t: float) -> set[str]:
    """Ops whose nano-ops border a compute bubble or run during it (in this layer or a neighbouring one)."""
    g0, g1 = bubble
    tol = TIME_TOL * max(t, 1.0) * 10
    shifts = (-t, 0.0, t) if problem.wrap else (0.0,)
    near = set()
    for n in plan:
        for sh in shifts:
            s, e = n.start + sh, n.end + sh
            if abs(e - g0) <= tol or abs(s - g1) <= tol or (s < g1 - tol and e > g0 + tol):
                near.add(n.op)
    return near


def list_schedule(problem: SearchProblem, ranges: dict[str, list[tuple[int, int]]], rule: str = "bottom",
                  starts: dict[tuple[str, int], float] | None = None,
                  durations: dict[tuple[str, int], float] | None = None) -> list[PlannedNanoOp]:
    """A feasible plan for fixed nano-op ranges by serial list scheduling (a warm start for the MILP).

    Repeatedly starts the ready nano-op of highest priority as early as its dependencies and its group allow.
    ``rule``: "bottom" (longest dependency path to the layer's end first: feeds long memory-bound chains early) or
    "batch" (lowest nano-batch first, then layer order) or "given" (by ``starts[(op, lo)]``: compacts a plan while
    keeping every group's order). An op's nano-ops keep their row order. ``durations[(op, lo)]`` overrides the
    profiled interference-free times (stage II's shares stretch them).
    """
    pos = {n: k for k, n in enumerate(problem.names)}
    plan = [PlannedNanoOp(a, lo, hi, 0.0, durations[(a, lo)] if durations else problem.time(a, hi - lo))
            for a in problem.names for lo, hi in sorted(ranges[a])]
    succ: list[list[int]] = [[] for _ in plan]
    npred = [0] * len(plan)
    edges = set(plan_links(problem, plan)[0])
    edges |= {(i, i + 1) for i in range(len(plan) - 1) if plan[i].op == plan[i + 1].op}
    for i, j in edges:
        succ[i].append(j)
        npred[j] += 1
    dur = [n.end for n in plan]
    if rule == "bottom":
        level = [0.0] * len(plan)
        for i in reversed(range(len(plan))):  # plan is in (layer order, row) order: topological
            level[i] = dur[i] + max((level[j] for j in succ[i]), default=0.0)
        prio = [(-level[i], pos[n.op], n.lo) for i, n in enumerate(plan)]
    elif rule == "batch":
        slot = [sum(m.op == n.op and m.lo < n.lo for m in plan) for n in plan]
        prio = [(slot[i], pos[n.op], n.lo) for i, n in enumerate(plan)]
    elif rule == "given" and starts is not None:
        prio = [(starts[(n.op, n.lo)], pos[n.op], n.lo) for n in plan]
    else:
        raise SearchError(f"unknown list-scheduling rule {rule!r}; use 'bottom', 'batch' or 'given' with starts")
    ready_at = [0.0] * len(plan)
    free: dict[ResourceKind, float] = {}
    ready = [i for i in range(len(plan)) if npred[i] == 0]
    out = list(plan)
    while ready:
        i = min(ready, key=lambda k: prio[k])
        ready.remove(i)
        g = problem.group(plan[i].op)
        start = max(ready_at[i], free.get(g, 0.0))
        out[i] = plan[i]._replace(start=start, end=start + dur[i])
        free[g] = start + dur[i]
        for j in succ[i]:
            ready_at[j] = max(ready_at[j], start + dur[i])
            npred[j] -= 1
            if npred[j] == 0:
                ready.append(j)
    return out


def spec_period(problem: SearchProblem, spec: PipelineSpec) -> float:
    """Period of a searched spec's planned times, counting its extra wrap edges (see :func:`period`)."""
    plan = [PlannedNanoOp(n.op, n.lo, n.hi, n.start_ms, n.end_ms, n.share) for n in spec.nano_ops]
    t = period(problem, plan)
    if problem.wrap:
        waits = spec.wrap_dependencies(problem.layer_graph())
        t = max([t] + [plan[i].end - plan[j].start for j, ws in enumerate(waits) for i in ws])
    return t


def asap_times(spec: PipelineSpec, graph: LayerGraph) -> PipelineSpec:
    """``spec`` with every nano-op started as soon as its waits allow: the nano-ops it depends on (the rule and the
    extra edges) and the one before it on its stream. Each keeps its duration (``end_ms - start_ms``)."""
    deps = spec.dependencies(graph)
    nano = list(spec.nano_ops)
    last: dict[int, int] = {}
    for j, n in enumerate(nano):
        ready = [nano[i].end_ms for i in deps[j]] + ([nano[last[n.stream]].end_ms] if n.stream in last else [])
        start = max(ready, default=0.0)
        nano[j] = replace(n, start_ms=start, end_ms=start + (n.end_ms - n.start_ms))
        last[n.stream] = j
    return replace(spec, nano_ops=tuple(nano))


def compact_spec(problem: SearchProblem, spec: PipelineSpec) -> PipelineSpec:
    """Start every nano-op as soon as the spec's own waits (dependencies, extra edges, stream order) allow.

    Durations, order and edges are kept, so every pair the spec keeps apart stays apart; kept only if the period
    does not grow (moving a group's first nano-op earlier can lengthen its window).
    """
    tight = asap_times(spec, problem.layer_graph())
    return tight if spec_period(problem, tight) <= spec_period(problem, spec) * (1 + 1e-9) else spec
