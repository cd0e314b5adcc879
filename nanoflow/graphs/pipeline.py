"""PipelineSpec: how one decoder layer's ops are split into nano-operations, ordered, and put on streams.

A spec lists nano-ops (op, token rows ``[lo, hi)``, stream, resource share, planned times) in *issue order* for one
layer; every layer of the model runs the same spec. The executor launches nano-op ``i`` on its stream after the
events of :meth:`PipelineSpec.dependencies` (same layer) and :meth:`PipelineSpec.wrap_dependencies` (previous
layer), so a spec is valid only if every dependency points from an earlier-issued nano-op to a later one.

Dependency rules (op level, then per nano-op; see :func:`op_dependencies`):

- RAW inside a layer (paper §4.1.2): B waits on A if A is an earlier op writing a buffer B reads and the token
  ranges intersect; for a cross-token read (the paged KV cache) B waits on every A nano-op starting before B's end.
- WAR inside a layer: B waits on an earlier op A that reads (row-locally) a buffer B overwrites, on intersecting
  rows, unless another dependency path A ->* B already orders them (a path of such links covers every row).
- Across the wrap from layer l into l+1: RAW for the buffers an op reads before its own layer writes them
  (``hidden``, ``residual``), and WAR for every buffer reused by the next layer (all scratch buffers are shared
  across layers). Buffers read cross-token are per-layer state (the KV cache of that layer) and carry no
  cross-layer hazard. WAW is not tracked: a buffer is always read between two writes (else the first write would be
  dead), so RAW then WAR order the writers; ops that write one buffer inside a layer without reading it
  (decode_attn, prefill_attn -> attn) write disjoint rows by design. Wrap edges implied by a path through other
  edges are dropped, so attn_norm of layer l+1 waits on down (or ffn_all_reduce under TP) of layer l only.

Shares: nano-ops on different streams that neither wait for the other (through dependencies, extra edges and
stream order, in two consecutive layers) may run at the same time, so their shares must sum to at most 1 -
checked for pairs and triples (at most one nano-op per stream runs at a time, and presets use <= 3 streams).
Nano-ops of COPY ops (``kv_offload``) move bytes on the copy engines, not SMs, and are left out of that budget.

Copy ops: presets and searched specs do not list ``kv_offload`` (it exists only when the engine offloads KV).
:meth:`PipelineSpec.for_graph` adds it: one nano-op per nano-op of its producer (``rope_kv``), same rows, issued right
after it, on a copy stream of its own (stream 0 for a single-stream spec, which then simply runs it in order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from itertools import combinations
from pathlib import Path
from typing import Any

from nanoflow.graphs.hazards import OpDependencies, OpEdge, links, op_dependencies
from nanoflow.graphs.nanoop import LayerGraph, ResourceKind, nano_depends

__all__ = ["DEFAULT_PRESET", "NanoOpSpec", "OpDependencies", "OpEdge", "PipelineSpec", "PipelineSpecError",
           "default_preset", "links", "list_presets", "load_preset", "op_dependencies"]

SHARE_TOLERANCE = 1e-6
BOUNDARY_MULTIPLE = 16
"""Rescaled and evenly split boundaries are multiples of this (tensor-core friendly row counts)."""
COPY_SHARE = 0.05
"""Share given to added copy nano-ops: their gather kernels need few SMs (a green context's smallest partition)."""


class PipelineSpecError(ValueError):
    """A pipeline spec that cannot run on the given layer graph; the message names the op and what to change."""


# ---- the spec -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NanoOpSpec:
    """One nano-operation: ``op`` over token rows ``[lo, hi)`` of the dense batch, launched on ``stream``.

    ``share`` is the fraction of the GPU the nano-op is planned to get (stage II's R); ``start_ms``/``end_ms`` its
    planned times inside one layer (``None`` for hand-written specs).
    """

    op: str
    lo: int
    hi: int
    stream: int
    share: float = 1.0
    start_ms: float | None = None
    end_ms: float | None = None

    @property
    def size(self) -> int:
        return self.hi - self.lo

    @property
    def label(self) -> str:
        return f"{self.op}[{self.lo}:{self.hi})"


@dataclass(frozen=True)
class PipelineSpec:
    """One layer's nano-ops in issue order; see the module docstring for the dependency and share rules.

    ``extra_edges`` (i, j): nano-op j waits on nano-op i of the same layer (i < j). ``extra_wrap_edges`` (i, j):
    nano-op j of layer l+1 waits on nano-op i of layer l. ``meta`` holds JSON values (provenance, reasoning).
    """

    name: str
    dense_batch_size: int
    nano_ops: tuple[NanoOpSpec, ...]
    extra_edges: tuple[tuple[int, int], ...] = ()
    num_streams: int = 1
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    extra_wrap_edges: tuple[tuple[int, int], ...] = ()

    # ---- constructors ----------------------------------------------------------------------------------------
    @classmethod
    def sequential(cls, graph: LayerGraph, dense: int) -> PipelineSpec:
        """One nano-op per op over the whole batch on stream 0: the non-overlap baseline."""
        nano = tuple(NanoOpSpec(op.name, 0, dense, 0) for op in graph.ops)
        return cls("sequential", dense, nano, meta={"description": "non-overlap baseline: one nano-op per op"})

    @classmethod
    def nano_batch_only(cls, graph: LayerGraph, dense: int, n: int = 2) -> PipelineSpec:
        """Every op split into ``n`` near-equal parts (inner boundaries multiples of 16) on one stream.

        Issue order is op-major (each op's nano-batches back to back, in row order), which is always valid: every
        dependency points to an earlier op.
        """
        bounds = even_boundaries(dense, n)
        nano = tuple(NanoOpSpec(op.name, lo, hi, 0) for op in graph.ops for lo, hi in zip(bounds, bounds[1:]))
        return cls(f"nano-batch-only-{n}", dense, nano,
                   meta={"description": f"{n} nano-batches per op, one stream: the nano-batch-only ablation"})

    def rescaled(self, dense: int) -> PipelineSpec:
        """The same pipeline for another dense batch size: boundaries scaled and rounded to multiples of 16.

        Planned times are dropped (they belonged to the old size); shares, streams and order are kept.
        """
        if dense <= 0:
            raise PipelineSpecError(f"cannot rescale {self.name!r} to dense batch size {dense}; give a positive size")
        old = self.dense_batch_size

        def scale(b: int) -> int:
            if b >= old:
                return dense
            return min(dense, int(b * dense / old / BOUNDARY_MULTIPLE + 0.5) * BOUNDARY_MULTIPLE)

        nano = []
        for n in self.nano_ops:
            lo, hi = scale(n.lo), scale(n.hi)
            if lo >= hi:
                raise PipelineSpecError(
                    f"cannot rescale {self.name!r} from {old} to {dense} tokens: nano-op {n.label} would be empty; "
                    f"use a dense batch size of at least {old * BOUNDARY_MULTIPLE // max(1, n.size)}")
            nano.append(replace(n, lo=lo, hi=hi, start_ms=None, end_ms=None))
        meta = {**self.meta, "rescaled_from": old}
        return replace(self, dense_batch_size=dense, nano_ops=tuple(nano), meta=meta)

    def with_memory_share(self, share: float, graph: LayerGraph) -> PipelineSpec:
        """The same pipeline with every partitioned MEMORY nano-op (share < 1) at ``share`` and every other
        partitioned nano-op at ``1 - share``: one number to sweep how the SMs are split between the two sides."""
        from nanoflow.graphs.nanoop import ResourceKind

        if not 0.0 < share < 1.0:
            raise PipelineSpecError(f"memory share must be in (0, 1), got {share}")
        nano = tuple(n if n.share >= 1.0 else
                     replace(n, share=share if graph.op(n.op).kind is ResourceKind.MEMORY else 1.0 - share)
                     for n in self.nano_ops)
        return replace(self, nano_ops=nano, meta={**self.meta, "memory_share": share})

    def for_graph(self, graph: LayerGraph) -> PipelineSpec:
        """The spec fitted to ``graph``: nano-ops of ops the graph lacks (e.g. all-reduces of a TP preset at TP=1)
        are dropped with their edges, and COPY ops the spec lacks are added (module docstring, "Copy ops")."""
        present = set(graph.names)
        keep = [i for i, n in enumerate(self.nano_ops) if n.op in present]
        spec = self if len(keep) == len(self.nano_ops) else self._select(keep)
        return spec._with_copy_ops(graph)

    def _select(self, keep: list[int]) -> PipelineSpec:
        """Only the nano-ops at indices ``keep`` (ascending), edges remapped and those of dropped ones removed."""
        new_index = {old: new for new, old in enumerate(keep)}

        def remap(edges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
            return tuple((new_index[i], new_index[j]) for i, j in edges if i in new_index and j in new_index)

        nano = tuple(self.nano_ops[i] for i in keep)
        streams = max((n.stream for n in nano), default=0) + 1
        return replace(self, nano_ops=nano, extra_edges=remap(self.extra_edges),
                       extra_wrap_edges=remap(self.extra_wrap_edges), num_streams=streams)

    def _with_copy_ops(self, graph: LayerGraph) -> PipelineSpec:
        listed = {n.op for n in self.nano_ops}
        missing = {op.name: op for op in graph.ops if op.kind is ResourceKind.COPY and op.name not in listed}
        if not missing:
            return self
        stream = self.num_streams if self.num_streams > 1 else 0
        after: dict[str, list[str]] = {}  # producer op -> copy ops issued right after each of its nano-ops
        for name, op in missing.items():
            producers = graph.producers(op)
            if not producers:
                raise PipelineSpecError(f"copy op {name!r} has no producer in the layer graph to follow")
            after.setdefault(producers[-1].name, []).append(name)
        nano: list[NanoOpSpec] = []
        new_index: dict[int, int] = {}
        for i, n in enumerate(self.nano_ops):
            new_index[i] = len(nano)
            nano.append(n)
            nano += [NanoOpSpec(c, n.lo, n.hi, stream, COPY_SHARE) for c in after.get(n.op, ())]

        def remap(edges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
            return tuple((new_index[i], new_index[j]) for i, j in edges)

        return replace(self, nano_ops=tuple(nano), extra_edges=remap(self.extra_edges),
                       extra_wrap_edges=remap(self.extra_wrap_edges), num_streams=max(self.num_streams, stream + 1))

    # ---- dependencies ----------------------------------------------------------------------------------------
    def dependencies(self, graph: LayerGraph) -> list[list[int]]:
        """For each nano-op, the indices of the same layer's nano-ops it waits on (rule + extra edges)."""
        deps = self._edges(op_dependencies(graph).intra, graph, same_layer=True)
        for i, j in self.extra_edges:
            deps[j].add(i)
        return [sorted(d) for d in deps]

    def wrap_dependencies(self, graph: LayerGraph) -> list[list[int]]:
        """For each nano-op of layer l+1, the indices of layer l's nano-ops it waits on (see module docstring)."""
        deps = self._edges(op_dependencies(graph).wrap, graph, same_layer=False)
        for i, j in self.extra_wrap_edges:
            deps[j].add(i)
        return [sorted(d) for d in deps]

    def _edges(self, edges: tuple[OpEdge, ...], graph: LayerGraph, same_layer: bool) -> list[set[int]]:
        by_op: dict[str, list[int]] = {}
        for i, n in enumerate(self.nano_ops):
            by_op.setdefault(n.op, []).append(i)
        deps: list[set[int]] = [set() for _ in self.nano_ops]
        for e in edges:
            for i in by_op.get(e.src, []):
                for j in by_op.get(e.dst, []):
                    a, b = self.nano_ops[i], self.nano_ops[j]
                    if same_layer and not e.cross_token and e.hazard == "raw":
                        hit = nano_depends(graph.op(e.src), (a.lo, a.hi), graph.op(e.dst), (b.lo, b.hi))
                    else:
                        hit = links(e, (a.lo, a.hi), (b.lo, b.hi))
                    if hit:
                        deps[j].add(i)
        return deps

    def concurrency(self, graph: LayerGraph) -> tuple[list[tuple[int, int, int]], list[tuple[tuple[int, int], ...]]]:
        """Nano-ops that may run at the same time, over two consecutive layers.

        Returns ``pairs`` (i, j, shift): nano-op i of layer l and j of layer l+shift (shift 0: i < j), and
        ``triples`` of (index, shift) nodes, pairwise concurrent. Assumes a spec whose edges point forward.
        """
        n = len(self.nano_ops)
        succ: list[set[int]] = [set() for _ in range(2 * n)]
        for layer in (0, 1):
            for j, ds in enumerate(self.dependencies(graph)):
                for i in ds:
                    succ[layer * n + i].add(layer * n + j)
        for j, ds in enumerate(self.wrap_dependencies(graph)):
            for i in ds:
                succ[i].add(n + j)
        last: dict[int, int] = {}
        for node in range(2 * n):
            s = self.nano_ops[node % n].stream
            if s in last:
                succ[last[s]].add(node)
            last[s] = node
        reach = [0] * (2 * n)
        for u in reversed(range(2 * n)):
            for w in succ[u]:
                reach[u] |= (1 << w) | reach[w]

        def free(u: int, v: int) -> bool:
            return (self.nano_ops[u % n].stream != self.nano_ops[v % n].stream
                    and not (reach[u] >> v) & 1 and not (reach[v] >> u) & 1)

        pairs = [(u, v % n, v // n) for u in range(n) for v in range(u + 1, 2 * n) if free(u, v)]
        triples = []
        for u in range(n):
            others = [v for v in range(2 * n) if v != u and free(u, v)]
            for v, w in combinations(others, 2):
                if free(v, w) and (u < v or v >= n) and (u < w or w >= n):
                    triples.append(((u, 0), (v % n, v // n), (w % n, w // n)))
        return pairs, triples

    # ---- validation ------------------------------------------------------------------------------------------
    def validate(self, graph: LayerGraph) -> None:
        """Raise :class:`PipelineSpecError` naming the offending op unless the spec can run on ``graph``."""
        dense = self.dense_batch_size
        if dense <= 0 or self.num_streams < 1:
            raise PipelineSpecError(f"spec {self.name!r}: dense_batch_size ({dense}) and num_streams "
                                    f"({self.num_streams}) must be positive")
        names = set(graph.names)
        for i, n in enumerate(self.nano_ops):
            where = f"nano-op {i} ({n.label})"
            if n.op not in names:
                raise PipelineSpecError(f"{where} names op {n.op!r}, which the layer graph lacks (ops: "
                                        f"{', '.join(graph.names)}); call spec.for_graph(graph) to drop it")
            if not 0 <= n.lo < n.hi <= dense:
                raise PipelineSpecError(f"{where}: range must be non-empty and inside [0, {dense})")
            if not 0 <= n.stream < self.num_streams:
                raise PipelineSpecError(f"{where}: stream {n.stream} is outside 0..{self.num_streams - 1}; "
                                        "raise num_streams or change the stream")
            if not 0.0 < n.share <= 1.0:
                raise PipelineSpecError(f"{where}: share {n.share} must be in (0, 1]")
            if n.start_ms is not None and n.end_ms is not None and n.end_ms < n.start_ms:
                raise PipelineSpecError(f"{where}: end_ms {n.end_ms} is before start_ms {n.start_ms}")
        self._check_coverage(graph)
        self._check_order(graph)
        self._check_shares(graph)

    def _check_coverage(self, graph: LayerGraph) -> None:
        for op in graph.names:
            ranges = sorted((n.lo, n.hi) for n in self.nano_ops if n.op == op)
            if not ranges:
                raise PipelineSpecError(f"op {op!r} has no nano-op; cover rows [0, {self.dense_batch_size}) with it")
            at = 0
            for lo, hi in ranges + [(self.dense_batch_size, self.dense_batch_size)]:
                if lo > at:
                    raise PipelineSpecError(f"op {op!r}: rows [{at}, {lo}) are covered by no nano-op")
                if lo < at:
                    raise PipelineSpecError(f"op {op!r}: rows [{lo}, {min(at, hi)}) are covered twice")
                at = hi

    def _check_order(self, graph: LayerGraph) -> None:
        n = len(self.nano_ops)
        for kind, edges in (("extra edge", self.extra_edges), ("extra wrap edge", self.extra_wrap_edges)):
            for i, j in edges:
                if not (0 <= i < n and 0 <= j < n):
                    raise PipelineSpecError(f"{kind} ({i}, {j}) names a nano-op index outside 0..{n - 1}")
        for j, deps in enumerate(self.dependencies(graph)):
            for i in deps:
                if i >= j:
                    a, b = self.nano_ops[j], self.nano_ops[i]
                    raise PipelineSpecError(
                        f"nano-op {a.label} (index {j}) depends on {b.label} (index {i}) issued after it; the "
                        f"executor would deadlock: issue {b.label} first")

    def _check_shares(self, graph: LayerGraph) -> None:
        pairs, triples = self.concurrency(graph)
        nano = self.nano_ops
        copy = {i for i, n in enumerate(nano) if graph.op(n.op).kind is ResourceKind.COPY}
        pairs = [p for p in pairs if p[0] not in copy and p[1] not in copy]
        triples = [t for t in triples if not any(i in copy for i, _ in t)]
        for i, j, shift in pairs:
            total = nano[i].share + nano[j].share
            if total > 1.0 + SHARE_TOLERANCE:
                where = " of the next layer" if shift else ""
                raise PipelineSpecError(
                    f"nano-ops {nano[i].label} (share {nano[i].share}) and {nano[j].label}{where} (share "
                    f"{nano[j].share}) may run concurrently but their shares sum to {total:.3f} > 1; lower a share "
                    "or order them with an extra edge")
        for triple in triples:
            total = sum(nano[i].share for i, _ in triple)
            if total > 1.0 + SHARE_TOLERANCE:
                labels = ", ".join(f"{nano[i].label} ({nano[i].share})" for i, _ in triple)
                raise PipelineSpecError(f"nano-ops {labels} may run concurrently but their shares sum to "
                                        f"{total:.3f} > 1; lower a share or order two of them with an extra edge")

    # ---- JSON ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def nano(n: NanoOpSpec) -> dict[str, Any]:
            d: dict[str, Any] = {"op": n.op, "lo": n.lo, "hi": n.hi, "stream": n.stream, "share": n.share}
            if n.start_ms is not None:
                d["start_ms"] = n.start_ms
            if n.end_ms is not None:
                d["end_ms"] = n.end_ms
            return d

        return {"name": self.name, "dense_batch_size": self.dense_batch_size, "num_streams": self.num_streams,
                "nano_ops": [nano(n) for n in self.nano_ops], "extra_edges": [list(e) for e in self.extra_edges],
                "extra_wrap_edges": [list(e) for e in self.extra_wrap_edges], "meta": self.meta}

    def to_json(self) -> str:
        """Readable JSON: one line per nano-op, meta indented."""
        d = self.to_dict()
        head = "".join(f"  {json.dumps(k)}: {json.dumps(d[k])},\n" for k in ("name", "dense_batch_size", "num_streams"))
        rows = ",\n".join(f"    {json.dumps(n)}" for n in d["nano_ops"])
        edges = "".join(f"  {json.dumps(k)}: {json.dumps(d[k])},\n" for k in ("extra_edges", "extra_wrap_edges"))
        meta = json.dumps(d["meta"], indent=2).replace("\n", "\n  ")
        return "{\n" + head + f'  "nano_ops": [\n{rows}\n  ],\n' + edges + f'  "meta": {meta}\n}}\n'

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineSpec:
        try:
            nano = tuple(NanoOpSpec(op=str(n["op"]), lo=int(n["lo"]), hi=int(n["hi"]), stream=int(n["stream"]),
                                    share=float(n.get("share", 1.0)), start_ms=_opt_float(n.get("start_ms")),
                                    end_ms=_opt_float(n.get("end_ms"))) for n in d["nano_ops"])
            return cls(name=str(d["name"]), dense_batch_size=int(d["dense_batch_size"]), nano_ops=nano,
                       extra_edges=tuple((int(i), int(j)) for i, j in d.get("extra_edges", [])),
                       num_streams=int(d.get("num_streams", 1)), meta=dict(d.get("meta", {})),
                       extra_wrap_edges=tuple((int(i), int(j)) for i, j in d.get("extra_wrap_edges", [])))
        except (KeyError, TypeError, ValueError) as exc:
            raise PipelineSpecError(f"malformed pipeline spec JSON ({exc!r}); it needs name, dense_batch_size and "
                                    "nano_ops entries with op, lo, hi and stream") from exc

    @classmethod
    def from_json(cls, text: str) -> PipelineSpec:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> PipelineSpec:
        return cls.from_json(Path(path).read_text())


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def even_boundaries(dense: int, n: int) -> list[int]:
    """``n + 1`` boundaries splitting ``[0, dense)`` near-evenly; inner ones multiples of 16."""
    bounds = [0] + [int(k * dense / max(n, 1) / BOUNDARY_MULTIPLE + 0.5) * BOUNDARY_MULTIPLE
                    for k in range(1, n)] + [dense]
    if n < 1 or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise PipelineSpecError(f"cannot split a dense batch of {dense} tokens into {n} nano-batches of at least "
                                f"{BOUNDARY_MULTIPLE} tokens; use fewer nano-batches")
    return bounds


# ---- presets --------------------------------------------------------------------------------------------------
def _preset_dir() -> Path:
    return Path(str(resources.files("nanoflow.graphs") / "presets"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in _preset_dir().glob("*.json"))


def load_preset(name: str) -> PipelineSpec:
    """The shipped spec ``nanoflow/graphs/presets/<name>.json``; pass it through ``for_graph`` before use."""
    path = _preset_dir() / f"{name}.json"
    if not path.is_file():
        raise PipelineSpecError(f"unknown pipeline preset {name!r}; known: {', '.join(list_presets())}")
    return PipelineSpec.load(path)


DEFAULT_PRESET = "preset"
"""Pipeline name for "the overlap preset of this model": resolved by :func:`default_preset` from its layer graph."""


def default_preset(graph: LayerGraph) -> str:
    """The shipped overlap preset for a model's layer graph: the MoE presets where the FFN is a router and an
    experts op, the dense ones otherwise; the tensor-parallel form where the graph has all-reduce ops."""
    moe = "experts" in graph.names
    tp = any(graph.op(n).kind is ResourceKind.NETWORK for n in graph.names)
    if moe:
        return "mixtral-tp-overlap" if tp else "mixtral-overlap"
    return "llama-70b-tp-overlap" if tp else "llama-8b-overlap"
