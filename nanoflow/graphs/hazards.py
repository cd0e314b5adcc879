"""Op-level dependencies of a layer graph: RAW and WAR inside a layer and across the wrap into the next layer.

The rules are stated in :mod:`nanoflow.graphs.pipeline`'s docstring; the executor's waits and the search's
precedence constraints both come from :func:`op_dependencies`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from nanoflow.graphs.nanoop import LayerGraph, ranges_intersect


# ---- op-level dependencies ------------------------------------------------------------------------------------
class OpEdge(NamedTuple):
    src: str
    dst: str
    cross_token: bool = False
    """True: dst nano-ops wait on every src nano-op starting before their end; False: on intersecting ranges."""
    hazard: str = "raw"
    """"raw": dst reads what src wrote; "war": dst overwrites rows src reads."""


class OpDependencies(NamedTuple):
    intra: tuple[OpEdge, ...]
    """Edges inside one layer (src is earlier in the graph)."""
    wrap: tuple[OpEdge, ...]
    """Edges from an op of layer l to an op of layer l+1."""


def links(edge: OpEdge, src_range: tuple[int, int], dst_range: tuple[int, int]) -> bool:
    """Whether the dst nano-op waits on the src nano-op under ``edge`` (the nano-level rule)."""
    if edge.cross_token:
        return src_range[0] < dst_range[1]
    return ranges_intersect(src_range, dst_range)


def _merge(edges: Iterable[OpEdge]) -> list[OpEdge]:
    """One edge per (src, dst); a cross-token edge subsumes a row-local one (its nano-level set is a superset)."""
    merged: dict[tuple[str, str], OpEdge] = {}
    for e in edges:
        old = merged.get((e.src, e.dst))
        merged[(e.src, e.dst)] = e if old is None else old._replace(cross_token=old.cross_token or e.cross_token)
    return list(merged.values())


def _implied(nodes: list[Any], edges: list[tuple[Any, Any, bool]]) -> list[bool]:
    """For each edge (u, v, cross) of a DAG whose ``nodes`` are topologically ordered: does another path imply it?

    A path of intersecting-range links covers every row of its end, so any path implies a row-local edge; a
    cross-token edge is implied only by a path with at least one cross-token hop.
    """
    succ: dict[Any, list[tuple[Any, bool]]] = {n: [] for n in nodes}
    for u, v, c in edges:
        succ[u].append((v, c))
    reach: dict[Any, set] = {}
    reach_x: dict[Any, set] = {}
    for n in reversed(nodes):
        reach[n], reach_x[n] = set(), set()
        for w, c in succ[n]:
            reach[n] |= {w} | reach[w]
            reach_x[n] |= ({w} | reach[w]) if c else reach_x[w]
    out = []
    for u, v, c in edges:
        alt = any(w != v and (v in (reach_x[w] if c and not c1 else reach[w])) for w, c1 in succ[u])
        out.append(alt)
    return out


def op_dependencies(graph: LayerGraph, reduce: bool = False) -> OpDependencies:
    """The op-level edges of the module docstring's rules; ``reduce`` also drops implied intra-layer edges."""
    ops, names = graph.ops, graph.names
    per_layer = {b for op in ops for b in op.cross_token_reads}
    raw = []
    for op in ops:
        for p in graph.producers(op):
            cross = bool(set(p.writes) & set(op.reads) & set(op.cross_token_reads))
            raw.append(OpEdge(p.name, op.name, cross, "raw"))
    raw = _merge(raw)
    war = [OpEdge(a.name, b.name, False, "war") for i, a in enumerate(ops) for b in ops[i + 1:]
           if (set(a.reads) - set(a.cross_token_reads)) & set(b.writes)]
    known = {(e.src, e.dst) for e in raw}
    war = [e for e in war if (e.src, e.dst) not in known]
    war_implied = _implied(names, [(e.src, e.dst, e.cross_token) for e in raw + war])[len(raw):]
    intra = raw + [e for e, imp in zip(war, war_implied, strict=True) if not imp]
    if reduce:
        imp = _implied(names, [(e.src, e.dst, e.cross_token) for e in intra])
        intra = [e for e, i in zip(intra, imp, strict=True) if not i]

    cross_layer = []
    for bi, b in enumerate(ops):
        written_before = {buf for o in ops[:bi] for buf in o.writes}
        from_prev = set(b.reads) - written_before - per_layer
        for a in ops:
            if set(a.writes) & from_prev:
                cross_layer.append(OpEdge(a.name, b.name, False, "raw"))
            if (set(a.reads) - per_layer - set(a.cross_token_reads)) & set(b.writes):
                cross_layer.append(OpEdge(a.name, b.name, False, "war"))
    cross_layer = _merge(cross_layer)
    nodes = [(n, 0) for n in names] + [(n, 1) for n in names]
    two_layer = [((e.src, layer), (e.dst, layer), e.cross_token) for layer in (0, 1) for e in intra]
    two_layer += [((e.src, 0), (e.dst, 1), False) for e in cross_layer]
    imp = _implied(nodes, two_layer)[len(two_layer) - len(cross_layer):]
    wrap = [e for e, i in zip(cross_layer, imp, strict=True) if not i]
    return OpDependencies(tuple(intra), tuple(wrap))
