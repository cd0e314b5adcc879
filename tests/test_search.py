"""Auto-search: the problem's checks, stage I and II MILPs on hand-solved cases, the time limit, the Gantt chart.

Each expected makespan is derived by hand in the test's comments (times in ms, sizes in tokens).
"""

from __future__ import annotations

import math
import time

import pytest

from nanoflow.graphs.nanoop import LayerGraph, Op, ResourceKind
from nanoflow.graphs.pipeline import PipelineSpec
from nanoflow.search import (
    RP_TABLE_PAPER,
    OpNode,
    SearchError,
    SearchProblem,
    problem_from_graph,
    solve_stage1,
    solve_stage2,
)
from nanoflow.search.plot import plot_gantt
from nanoflow.search.problem import performance
from nanoflow.search.schedule import check_plan, period

C, M, N, OT = ResourceKind.COMPUTE, ResourceKind.MEMORY, ResourceKind.NETWORK, ResourceKind.OTHER
LIMIT = 20  # seconds; every hand-solved MILP here is proved optimal in well under a second


def linear(ms_per_128: float, grid: list[int], fixed: float = 0.0) -> dict[int, float]:
    return {g: fixed + ms_per_128 * g / 128 for g in grid}


def chain(times_a, times_b, dense, grid, kind_b=M, wrap=False) -> SearchProblem:
    """A -> B; with ``wrap`` A of layer l+1 reads B's output of layer l."""
    ops = [OpNode("A", C, wrap_deps=["B"] if wrap else []), OpNode("B", kind_b, ["A"])]
    return SearchProblem(ops, dense, grid, {"A": times_a, "B": times_b}, wrap=wrap)


def llama_graph(tp: bool = False) -> LayerGraph:
    ops = [Op("attn_norm", OT, ("hidden", "residual"), ("x_attn", "residual")), Op("qkv", C, ("x_attn",), ("qkv",)),
           Op("rope_kv", OT, ("qkv",), ("q", "kv_cache")),
           Op("decode_attn", M, ("q", "kv_cache"), ("attn",), cross_token_reads=("kv_cache",)),
           Op("prefill_attn", C, ("q", "kv_cache"), ("attn",), cross_token_reads=("kv_cache",)),
           Op("o_proj", C, ("attn",), ("attn_out",))]
    ops += [Op("attn_all_reduce", N, ("attn_out",), ("attn_out",))] if tp else []
    ops += [Op("ffn_norm", OT, ("attn_out", "residual"), ("x_ffn", "residual")),
            Op("gate_up", C, ("x_ffn",), ("gate_up",)), Op("act", OT, ("gate_up",), ("act",)),
            Op("down", C, ("act",), ("hidden",))]
    ops += [Op("ffn_all_reduce", N, ("hidden",), ("hidden",))] if tp else []
    return LayerGraph(tuple(ops))


def llama_profile(tp: bool) -> dict:
    """Rough LLaMA-8B-like times: GEMMs weight-bound below ~300 tokens, compute-bound above."""
    sizes = range(128, 2049, 128)
    gemm = {"qkv": 6144 * 4096, "o_proj": 4096 * 4096, "gate_up": 28672 * 4096, "down": 4096 * 14336,
            "prefill_attn": 0}
    ops = {}
    for name in llama_graph(tp).names:
        if name in gemm and gemm[name]:
            ops[name] = {str(s): 0.004 + max(2 * gemm[name] / 3e9, 2 * s * gemm[name] / 6.5e11) for s in sizes}
        elif name == "decode_attn":
            ops[name] = {str(s): 0.005 + 0.00035 * s for s in sizes}
        elif name == "prefill_attn":
            ops[name] = {str(s): 0.004 + 0.00004 * s for s in sizes}
        elif "all_reduce" in name:
            ops[name] = {str(s): 0.01 + s * 8192 / 1.5e8 for s in sizes}
        else:
            ops[name] = {str(s): 0.003 + s * 8e-6 for s in sizes}
    return {"ops": ops}


# ---- the problem ---------------------------------------------------------------------------------------------
def test_rp_table_of_the_paper():
    # Table 3 columns 0, 0.1, 0.2, 0.8, 0.9, 1 as printed; 0.5 interpolated between 0.2 and 0.8.
    assert performance(RP_TABLE_PAPER["memory"], 0.2) == pytest.approx(0.3)
    assert performance(RP_TABLE_PAPER["memory"], 0.5) == pytest.approx(0.3 + 0.3 * 0.55 / 0.6)
    assert performance(RP_TABLE_PAPER["network"], 0.1) == pytest.approx(0.3)
    assert performance(RP_TABLE_PAPER["network"], 0.5) == pytest.approx(0.5 + 0.3 * 0.4 / 0.6)
    assert performance(RP_TABLE_PAPER["compute"], 0.6) == pytest.approx(0.6)
    assert performance([(0.0, 0.0), (1.0, 1.0)], 0.25) == pytest.approx(0.25)


def test_malformed_problems_raise_search_error():
    grid = [128, 256]
    times = {"A": linear(1, grid), "B": linear(1, grid)}
    with pytest.raises(SearchError, match="cycle"):
        SearchProblem([OpNode("A", C, ["B"]), OpNode("B", M, ["A"])], 256, grid, times)
    with pytest.raises(SearchError, match="not a multiple of the grid step 128"):
        SearchProblem([OpNode("A", C), OpNode("B", M, ["A"])], 300, grid, times)
    with pytest.raises(SearchError, match=r"no profiled time for op 'B' at batch sizes \[256\]"):
        SearchProblem([OpNode("A", C), OpNode("B", M, ["A"])], 256, grid, {**times, "B": {128: 1.0}})
    with pytest.raises(SearchError, match="unknown op 'Z'"):
        SearchProblem([OpNode("A", C), OpNode("B", M, ["Z"])], 256, grid, times)
    with pytest.raises(SearchError, match="lacks the dense batch size 384"):
        SearchProblem([OpNode("A", C), OpNode("B", M, ["A"])], 384, grid, times)
    with pytest.raises(SearchError, match="wrap dependency 'A' -> 'B'"):
        SearchProblem([OpNode("A", C), OpNode("B", M, ["A"], wrap_deps=["A"])], 256, grid, times)
    with pytest.raises(SearchError, match=r"lacks ops \['down'\]"):
        prof = llama_profile(False)
        del prof["ops"]["down"]
        problem_from_graph(llama_graph(), 2048, prof)


def test_problem_from_graph():
    p = problem_from_graph(llama_graph(tp=True), 2048, llama_profile(True))
    assert p.grid == tuple(range(128, 2049, 128)) and p.step == 128
    assert [(e.src, e.dst) for e in p.wrap_edges] == [("ffn_all_reduce", "attn_norm")]
    # OTHER ops join their compute neighbour's stream; ffn_norm skips its all-reduce producer.
    assert {n: p.group(n) for n in ("rope_kv", "ffn_norm", "attn_norm", "act")} == dict.fromkeys(
        ("rope_kv", "ffn_norm", "attn_norm", "act"), C)
    assert p.stream("decode_attn") == 1 and p.stream("ffn_all_reduce") == 2
    assert p.sequential_ms == pytest.approx(sum(p.time(n, 2048) for n in p.names))


# ---- stage I -------------------------------------------------------------------------------------------------
def test_stage1_two_halves_overlap():
    # A (compute) -> B (memory), 1 ms per 128 tokens each, dense 256. Sequential: 2 + 2 = 4.
    # Split both at 128: A0 [0,1) A1 [1,2); B0 [1,2) after A0, B1 [2,3) after A1 -> 3. Lower bound: A needs 2 ms
    # and B's nano-op holding the last rows starts after A's last nano-op and lasts >= 1 ms -> 3 is optimal.
    p = chain(linear(1, [128, 256]), linear(1, [128, 256]), 256, [128, 256])
    r = solve_stage1(p, max_split=2, time_limit_s=LIMIT)
    assert r.makespan_ms == pytest.approx(3.0, abs=1e-6)
    assert r.nano_counts == {"A": 2, "B": 2} and r.status == "optimal"
    check_plan(p, list(r.plan))
    r.spec.validate(p.layer_graph())
    assert {n.stream for n in r.spec.nano_ops if n.op == "B"} == {1}


def test_stage1_periodic_wrap_hides_the_memory_op():
    # Same chain, but A of layer l+1 reads B of layer l. Unsplit: A [0,2), B [2,4), next A at 4 -> period 4.
    # Halves: A0 [0,1) A1 [1,2), B0 [1,2) B1 [2,3); next layer's A0 at T needs B0 done (2), A1 at 1+T needs B1
    # done (3): T = 2 = the compute (and memory) work per layer, a lower bound -> optimal.
    p = chain(linear(1, [128, 256]), linear(1, [128, 256]), 256, [128, 256], wrap=True)
    r = solve_stage1(p, max_split=2, time_limit_s=LIMIT)
    assert r.makespan_ms == pytest.approx(2.0, abs=1e-6)
    assert period(p, list(r.plan)) == pytest.approx(2.0, abs=1e-6)
    assert r.spec.meta["period_ms"] == pytest.approx(2.0, abs=1e-6)
    r.spec.validate(p.layer_graph())


def test_stage1_keeps_one_nano_op_when_splitting_cannot_help():
    # Both ops compute-bound (one resource), t(s) = 0.5 + s/256: t(256) = 1.5 but two halves cost 2 x 1.0.
    # Nothing can overlap, so the best is one nano-op each: 1.5 + 1.5 = 3.
    t = {128: 1.0, 256: 1.5}
    p = chain(t, t, 256, [128, 256], kind_b=C)
    r = solve_stage1(p, max_split=3, time_limit_s=LIMIT)
    assert r.makespan_ms == pytest.approx(3.0, abs=1e-6)
    assert r.nano_counts == {"A": 1, "B": 1}


def test_stage1_adds_nano_ops_near_the_compute_bubble():
    # A (compute, 1 ms/128) -> B (memory, 0.5 ms/128), dense 512. A ends at 4 at best; B's nano-ops that meet A's
    # last nano-op start at 4. With 2 nano-ops each the best is 5 (e.g. A [0,256) [256,512) -> B [2,3) and [4,5)):
    # B's last part then holds >= 256 rows or B's first part must wait for A's end. With 3 nano-ops, A = 256+128
    # +128 rows ending at 2, 3, 4 and B the same split: B [2,3) [3,3.5) [4,4.5) -> 4.5 = 4 + the smallest B part.
    grid = [128, 256, 384, 512]
    p = chain(linear(1, grid), linear(0.5, grid), 512, grid)
    two = solve_stage1(p, max_split=2, time_limit_s=LIMIT)
    assert two.makespan_ms == pytest.approx(5.0, abs=1e-6)
    three = solve_stage1(p, max_split=3, time_limit_s=LIMIT)
    assert three.makespan_ms == pytest.approx(4.5, abs=1e-6)
    assert three.nano_counts == {"A": 3, "B": 3}
    check_plan(p, list(three.plan))


def test_stage1_respects_the_time_limit():
    graph = llama_graph(tp=True)
    p = problem_from_graph(graph, 2048, llama_profile(True))
    start = time.monotonic()
    r = solve_stage1(p, max_split=4, time_limit_s=2)
    assert time.monotonic() - start < 5
    assert r.makespan_ms <= p.sequential_ms + 1e-9
    check_plan(p, list(r.plan))
    r.spec.validate(graph)
    assert all(n.start_ms is not None for n in r.spec.nano_ops)


# ---- stage II ------------------------------------------------------------------------------------------------
TABLE = {"compute": [(0.0, 0.0), (1.0, 1.0)], "memory": [(0.0, 0.0), (0.5, 0.8), (1.0, 1.0)]}


def independent(d_b: float, wrap: bool) -> SearchProblem:
    """A (compute, 1 ms) and B (memory, d_b ms) with no dependency; P_mem(R) = 1.6 R up to 0.5, then 0.8 + 0.4 R'."""
    ops = [OpNode("A", C, wrap_deps=["A"] if wrap else []), OpNode("B", M, wrap_deps=["B"] if wrap else [])]
    return SearchProblem(ops, 128, [128], {"A": {128: 1.0}, "B": {128: d_b}}, TABLE, wrap=wrap)


@pytest.mark.parametrize("wrap", [False, True])
def test_stage2_splits_resources_between_two_overlapping_nano_ops(wrap):
    # Overlapped: time = max(1 / R_A, 0.5 / P_B(1 - R_A)). R_A = 0.6: 1.667; 0.7: max(1.429, 0.5/0.48 = 1.042)
    # = 1.429; 0.8: max(1.25, 0.5/0.32 = 1.5625). One after another: 1 + 0.5 = 1.5. Best: R_A = 0.7, 1/0.7.
    # With the wrap the same holds: each layer repeats it, the next layer's A and B again overlap.
    p = independent(0.5, wrap)
    r1 = solve_stage1(p, time_limit_s=LIMIT)
    assert r1.makespan_ms == pytest.approx(1.0)  # no interference in stage I: fully overlapped
    r2 = solve_stage2(p, r1, time_limit_s=LIMIT)
    assert r2.makespan_ms == pytest.approx(1 / 0.7, abs=1e-5)
    shares = {n.op: n.share for n in r2.spec.nano_ops}
    assert shares == pytest.approx({"A": 0.7, "B": 0.3})
    r2.spec.validate(p.layer_graph())


@pytest.mark.parametrize("wrap", [False, True])
def test_stage2_serialises_when_interference_costs_more(wrap):
    # d_B = 0.2: overlapped, R_A = 0.8 gives max(1.25, 0.2/0.32 = 0.625) = 1.25 and R_A = 0.9 gives
    # max(1.11, 0.2/0.16 = 1.25) = 1.25; one after another at R = 1: 1.2. Both run alone, so both get R = 1, and the
    # spec orders them with an edge, and B of layer l before A of layer l+1 with a wrap edge (the executor runs
    # layers back to back, so without it they could overlap across the layer boundary).
    p = independent(0.2, wrap)
    r2 = solve_stage2(p, solve_stage1(p, time_limit_s=LIMIT), time_limit_s=LIMIT)
    assert r2.makespan_ms == pytest.approx(1.2, abs=1e-6)
    assert [n.share for n in r2.spec.nano_ops] == [1.0, 1.0]
    assert len(r2.spec.extra_edges) == 1
    assert len(r2.spec.extra_wrap_edges) == 1
    r2.spec.validate(p.layer_graph())


def test_stage2_never_beats_stage1():
    # Interference only slows nano-ops down, so stage II's period is at least stage I's and at most the serial sum.
    p = chain(linear(1, [128, 256]), linear(1, [128, 256]), 256, [128, 256], wrap=True)
    r1 = solve_stage1(p, max_split=2, time_limit_s=LIMIT)
    r2 = solve_stage2(p, r1, time_limit_s=LIMIT)
    assert r1.makespan_ms - 1e-6 <= r2.makespan_ms <= 4.0 + 1e-6
    r2.spec.validate(p.layer_graph())
    assert all(0 < n.share <= 1 for n in r2.spec.nano_ops)
    with pytest.raises(SearchError, match="r_levels"):
        solve_stage2(p, r1, r_levels=(0.0, 0.5))


# ---- Gantt chart ---------------------------------------------------------------------------------------------
def test_plot_gantt_writes_a_png(tmp_path):
    p = chain(linear(1, [128, 256]), linear(1, [128, 256]), 256, [128, 256], wrap=True)
    spec = solve_stage1(p, max_split=2, time_limit_s=LIMIT).spec
    measured = [(f"s{n.stream}", n.label, 10 + n.start_ms * 1.1, 10 + n.end_ms * 1.1) for n in spec.nano_ops]
    out = plot_gantt(spec, measured, tmp_path / "gantt.png", "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_gantt(None, measured, tmp_path / "measured.png", "measured only")
    with pytest.raises(ValueError, match="no planned times"):
        plot_gantt(PipelineSpec.sequential(p.layer_graph(), 256), None, tmp_path / "x.png")
    assert math.isfinite(spec.meta["period_ms"])
