"""The auto-search's input: ops with resource kinds and dependencies, profiled times, and the R -> P table.

Flow (paper §4.1): profiler JSON + the model's :class:`LayerGraph` -> :func:`problem_from_graph` ->
:class:`SearchProblem` -> stage I (sizes, order; :mod:`nanoflow.search.stage1`) -> stage II (shares;
:mod:`nanoflow.search.stage2`) -> :class:`~nanoflow.graphs.pipeline.PipelineSpec`.

Invariants a :class:`SearchProblem` guarantees once built: op names are unique and the intra-layer dependencies
acyclic; the grid is sorted and ``dense_batch_size`` is one of its sizes and a multiple of its step (the gcd of the
sizes); ``time_ms[op][size]`` exists and is finite for every op and grid size. Dependencies are always those of a
layer graph (given, or synthesised from the ops' ``deps``), through
:func:`~nanoflow.graphs.pipeline.op_dependencies`, so the search's precedence constraints and the executor's waits
come from one rule.

Resource groups: nano-ops of one group never overlap in time (one CUDA stream each: COMPUTE 0, MEMORY 1,
NETWORK 2). An OTHER op (norm, RoPE, activation) joins the group of its nearest compute or memory neighbour - its
latest producer, else its first consumer, skipping collectives - so it shares that stream and the plan's timing
is what the streams can execute.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoflow.graphs.nanoop import LayerGraph, Op, ResourceKind
from nanoflow.graphs.pipeline import OpEdge, op_dependencies


class SearchError(ValueError):
    """Malformed or infeasible search input; the message says what to change."""


STREAM_OF_GROUP = {ResourceKind.COMPUTE: 0, ResourceKind.MEMORY: 1, ResourceKind.NETWORK: 2}


def _interpolated(points: dict[float, float]) -> list[tuple[float, float]]:
    """Fill R = 0, 0.1, ..., 1 linearly between the given points (the "..." columns of the paper's Table 3)."""
    known = sorted(points.items())
    out = []
    for k in range(11):
        r = k / 10
        lo = max((p for p in known if p[0] <= r + 1e-9), key=lambda p: p[0])
        hi = min((p for p in known if p[0] >= r - 1e-9), key=lambda p: p[0])
        p = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (r - lo[0]) / (hi[0] - lo[0])
        out.append((r, round(p, 6)))
    return out


_GEMV = _interpolated({0.0: 0.0, 0.1: 0.2, 0.2: 0.3, 0.8: 0.85, 0.9: 0.95, 1.0: 1.0})
RP_TABLE_PAPER: dict[str, list[tuple[float, float]]] = {
    "compute": [(k / 10, k / 10) for k in range(11)],
    "memory": _GEMV,
    "network": _interpolated({0.0: 0.0, 0.1: 0.3, 0.2: 0.5, 0.8: 0.9, 0.9: 1.0, 1.0: 1.0}),
    # Norms, RoPE and SiLU*mul are memory-bound element-wise kernels: the GEMV curve is the closest profile.
    "other": _GEMV,
}
"""Paper Table 3: performance P (fraction of the kernel's best speed) at resource utilisation R."""


def performance(table: Iterable[tuple[float, float]], r: float) -> float:
    """P at utilisation ``r`` by linear interpolation of an R -> P table (clamped to its ends)."""
    pts = sorted(table)
    if not pts:
        return r
    if r <= pts[0][0]:
        return pts[0][1]
    for (r0, p0), (r1, p1) in zip(pts, pts[1:]):
        if r <= r1:
            return p0 if r1 == r0 else p0 + (p1 - p0) * (r - r0) / (r1 - r0)
    return pts[-1][1]


@dataclass(frozen=True)
class OpNode:
    """An op of the search problem.

    ``deps``: ops of the same layer it reads from; ``cross_token_deps``: the subset read across tokens (attention
    reading the KV cache: waits on every producer nano-op starting before its end); ``wrap_deps``: ops of the
    previous layer it reads from (they must come after it in the layer).
    """

    name: str
    kind: ResourceKind
    deps: tuple[str, ...] = ()
    cross_token_deps: tuple[str, ...] = ()
    wrap_deps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("deps", "cross_token_deps", "wrap_deps"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class SearchProblem:
    """Everything stage I and II need; see the module docstring for the invariants checked on construction."""

    ops: tuple[OpNode, ...]
    dense_batch_size: int
    grid: tuple[int, ...]
    time_ms: Mapping[str, Mapping[int, float]] = field(hash=False)
    rp_table: Mapping[str, list[tuple[float, float]]] = field(default_factory=lambda: dict(RP_TABLE_PAPER),
                                                             hash=False)
    wrap: bool = True
    graph: LayerGraph | None = field(default=None, compare=False, repr=False)
    _derived: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        object.__setattr__(self, "grid", tuple(sorted({int(g) for g in self.grid})))
        # Kind names as ResourceKind values ("compute", "memory", ...), whatever case the profile used.
        object.__setattr__(self, "rp_table", {str(k).lower(): [tuple(p) for p in v] for k, v in self.rp_table.items()})
        self._check_ops()
        self._check_grid_and_times()
        graph = self.graph if self.graph is not None else self._synthesise_graph()
        if sorted(graph.names) != sorted(o.name for o in self.ops):
            raise SearchError(f"the layer graph's ops {graph.names} differ from the problem's ops")
        deps = op_dependencies(graph, reduce=True)
        self._derived.update(graph=graph, names=graph.names, intra=deps.intra, wrap=deps.wrap if self.wrap else ())
        self._derived["groups"] = {n: self._anchor(n) for n in graph.names}

    # ---- checks ----------------------------------------------------------------------------------------------
    def _check_ops(self) -> None:
        if not self.ops:
            raise SearchError("the search problem has no ops")
        names = [o.name for o in self.ops]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SearchError(f"op names {sorted(dup)} appear more than once")
        for o in self.ops:
            if not isinstance(o.kind, ResourceKind):
                raise SearchError(f"op {o.name!r}: kind {o.kind!r} is not a ResourceKind")
            for d in (*o.deps, *o.wrap_deps):
                if d not in names:
                    raise SearchError(f"op {o.name!r} depends on unknown op {d!r}; known ops: {', '.join(names)}")
            if o.name in o.deps:
                raise SearchError(f"op {o.name!r} depends on itself inside the layer; use wrap_deps for the "
                                  "previous layer")
            if set(o.cross_token_deps) - set(o.deps):
                raise SearchError(f"op {o.name!r}: cross_token_deps must be a subset of deps")
        self._derived["order"] = self._topological()

    def _topological(self) -> list[str]:
        remaining = {o.name: set(o.deps) for o in self.ops}
        order: list[str] = []
        while remaining:
            ready = [o.name for o in self.ops if o.name in remaining and not remaining[o.name]]
            if not ready:
                raise SearchError(f"the op dependencies form a cycle among {sorted(remaining)}; a layer's ops "
                                  "must be acyclic (use wrap_deps for reads from the previous layer)")
            for n in ready:
                del remaining[n]
                order.append(n)
            for deps in remaining.values():
                deps.difference_update(ready)
        return order

    def _check_grid_and_times(self) -> None:
        dense = self.dense_batch_size
        if not self.grid or self.grid[0] <= 0:
            raise SearchError(f"grid {list(self.grid)} must list positive batch sizes (e.g. 128..dense step 128)")
        step = math.gcd(*self.grid)
        if dense <= 0 or dense % step:
            raise SearchError(f"dense batch size {dense} is not a multiple of the grid step {step}; use a multiple "
                              f"of {step} (e.g. {max(step, dense // step * step)})")
        if dense not in self.grid:
            raise SearchError(f"the grid lacks the dense batch size {dense} (needed for one nano-op per op); "
                              f"profile it or lower dense_batch_size to {max(g for g in self.grid if g <= dense)}"
                              if any(g <= dense for g in self.grid) else
                              f"the grid {list(self.grid)} has no size <= the dense batch size {dense}")
        for o in self.ops:
            times = self.time_ms.get(o.name)
            missing = [g for g in self.grid if times is None or g not in times]
            if missing:
                raise SearchError(f"no profiled time for op {o.name!r} at batch sizes {missing}; re-run the "
                                  "profiler for these sizes or pass a smaller grid")
            bad = [g for g in self.grid if not (math.isfinite(times[g]) and times[g] >= 0)]
            if bad:
                raise SearchError(f"op {o.name!r}: profiled times at {bad} are negative or not finite")

    def _synthesise_graph(self) -> LayerGraph:
        """One buffer per op (its name): an op reads its deps' buffers and, for wrap deps, the previous layer's."""
        order = self._derived["order"]
        pos = {n: i for i, n in enumerate(order)}
        by_name = {o.name: o for o in self.ops}
        ops = []
        for n in order:
            o = by_name[n]
            for w in o.wrap_deps if self.wrap else ():
                if pos[w] < pos[n]:
                    raise SearchError(f"wrap dependency {w!r} -> {n!r}: {w!r} comes before {n!r} in the layer, so "
                                      f"{n!r} would read this layer's value; list it in deps instead")
            wraps = o.wrap_deps if self.wrap else ()
            ops.append(Op(n, o.kind, tuple(dict.fromkeys((*o.deps, *wraps))), (n,),
                          cross_token_reads=o.cross_token_deps))
        return LayerGraph(tuple(ops))

    def _anchor(self, name: str, seen: frozenset[str] = frozenset()) -> ResourceKind:
        kind = self.kind(name)
        if kind is not ResourceKind.OTHER:
            return kind
        pos = {n: i for i, n in enumerate(self.names)}
        producers = sorted((e.src for e in self.intra_edges if e.dst == name), key=pos.get, reverse=True)
        consumers = sorted((e.dst for e in self.intra_edges if e.src == name), key=pos.get)
        for n in producers + consumers:
            if n not in seen and self.kind(n) is not ResourceKind.NETWORK:
                return self._anchor(n, seen | {name})
        return ResourceKind.COMPUTE

    # ---- derived views ---------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Op names in a topological (layer) order."""
        return list(self._derived["names"])

    @property
    def step(self) -> int:
        return math.gcd(*self.grid)

    @property
    def intra_edges(self) -> tuple[OpEdge, ...]:
        """Op-level dependencies inside a layer, implied ones removed (same constraints, fewer of them)."""
        return self._derived["intra"]

    @property
    def wrap_edges(self) -> tuple[OpEdge, ...]:
        """Op-level dependencies from layer l into l+1 (empty when ``wrap`` is False)."""
        return self._derived["wrap"]

    def layer_graph(self) -> LayerGraph:
        return self._derived["graph"]

    def kind(self, name: str) -> ResourceKind:
        for o in self.ops:
            if o.name == name:
                return o.kind
        raise KeyError(f"no op named {name!r}")

    def group(self, name: str) -> ResourceKind:
        """The resource group (and so the stream) of an op's nano-ops: never OTHER."""
        return self._derived["groups"][name]

    def stream(self, name: str) -> int:
        return STREAM_OF_GROUP[self.group(name)]

    def time(self, name: str, size: int) -> float:
        return float(self.time_ms[name][size])

    @property
    def sequential_ms(self) -> float:
        """One nano-op per op, one after another: the non-overlap baseline (also the wrap period)."""
        return sum(self.time(n, self.dense_batch_size) for n in self.names)

    def perf(self, name: str, r: float) -> float:
        """P of op ``name`` at utilisation ``r`` (COMPUTE: P = R unless the table says otherwise)."""
        table = self.rp_table.get(self.kind(name).value)
        return r if table is None else performance(table, r)


def load_profile(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def problem_from_graph(graph: LayerGraph, dense: int, profile: Mapping[str, Any],
                       rp_table: Mapping[str, list[tuple[float, float]]] | None = None,
                       grid: Iterable[int] | None = None, wrap: bool = True) -> SearchProblem:
    """Build the search problem of one decoder layer from a profile ``{"ops": {op: {"128": ms, ...}}}``.

    ``grid`` defaults to every profiled size up to ``dense``; ``rp_table`` to the profile's ``"rp_table"`` entry,
    else the paper's Table 3.
    """
    prof_ops = profile.get("ops")
    if not isinstance(prof_ops, Mapping):
        raise SearchError('the profile has no "ops" mapping {op: {batch size: ms}}; run the profiler first')
    missing = [n for n in graph.names if n not in prof_ops]
    if missing:
        raise SearchError(f"the profile lacks ops {missing}; profile them (the graph has {', '.join(graph.names)})")
    try:
        times = {n: {int(k): float(v) for k, v in prof_ops[n].items()} for n in graph.names}
    except (TypeError, ValueError, AttributeError) as exc:
        raise SearchError(f"profile entries must map batch sizes to milliseconds ({exc})") from exc
    if grid is None:
        grid = sorted({g for t in times.values() for g in t if g <= dense})
    if rp_table is None:
        table = profile.get("rp_table")
        rp_table = {k: [tuple(p) for p in v] for k, v in table.items()} if table else dict(RP_TABLE_PAPER)
    deps = op_dependencies(graph, reduce=True)
    nodes = []
    for op in graph.ops:
        intra = [e for e in deps.intra if e.dst == op.name]
        nodes.append(OpNode(op.name, op.kind, tuple(e.src for e in intra),
                            tuple(e.src for e in intra if e.cross_token),
                            tuple(e.src for e in deps.wrap if e.dst == op.name)))
    return SearchProblem(tuple(nodes), dense, tuple(grid), times, rp_table, wrap, graph)
