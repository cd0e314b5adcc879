"""PipelineSpec: validation errors name the op, JSON round-trips, presets fit the LLaMA graph, dependencies.

Expected dependencies and boundaries are worked out by hand from the LLaMA layer's reads/writes (listed in
``llama_graph`` below) and the paper's rule, not taken from earlier runs.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from nanoflow.graphs.nanoop import LayerGraph, Op, ResourceKind
from nanoflow.graphs.pipeline import (
    NanoOpSpec,
    PipelineSpec,
    PipelineSpecError,
    list_presets,
    load_preset,
    op_dependencies,
)

C, M, N, OT = ResourceKind.COMPUTE, ResourceKind.MEMORY, ResourceKind.NETWORK, ResourceKind.OTHER


def llama_graph(tp: bool = False) -> LayerGraph:
    ops = [Op("attn_norm", OT, ("hidden", "residual"), ("x_attn", "residual")),
           Op("qkv", C, ("x_attn",), ("qkv",)),
           Op("rope_kv", OT, ("qkv",), ("q", "kv_cache")),
           Op("decode_attn", M, ("q", "kv_cache"), ("attn",), cross_token_reads=("kv_cache",)),
           Op("prefill_attn", C, ("q", "kv_cache"), ("attn",), cross_token_reads=("kv_cache",)),
           Op("o_proj", C, ("attn",), ("attn_out",))]
    if tp:
        ops.append(Op("attn_all_reduce", N, ("attn_out",), ("attn_out",)))
    ops += [Op("ffn_norm", OT, ("attn_out", "residual"), ("x_ffn", "residual")),
            Op("gate_up", C, ("x_ffn",), ("gate_up",)),
            Op("act", OT, ("gate_up",), ("act",)),
            Op("down", C, ("act",), ("hidden",))]
    if tp:
        ops.append(Op("ffn_all_reduce", N, ("hidden",), ("hidden",)))
    return LayerGraph(tuple(ops))


def two_batch(graph: LayerGraph, cut: int = 1024, dense: int = 2048) -> PipelineSpec:
    nano = tuple(NanoOpSpec(op.name, lo, hi, 0) for op in graph.ops for lo, hi in ((0, cut), (cut, dense)))
    return PipelineSpec("two", dense, nano)


def index(spec: PipelineSpec, label: str) -> int:
    return [n.label for n in spec.nano_ops].index(label)


# ---- dependency rules ----------------------------------------------------------------------------------------
def test_op_dependencies_of_llama():
    deps = op_dependencies(llama_graph())
    intra = {(e.src, e.dst): e.cross_token for e in deps.intra}
    assert intra[("rope_kv", "decode_attn")] and intra[("rope_kv", "prefill_attn")]  # the KV cache
    assert not intra[("qkv", "rope_kv")]
    assert ("attn_norm", "ffn_norm") in intra  # residual
    # The wrap: attn_norm of layer l+1 reads hidden (down) and residual (ffn_norm) of layer l; ffn_norm -> gate_up
    # -> act -> down covers every row, so only down remains. Under TP the last writer of hidden is the all-reduce.
    assert [(e.src, e.dst) for e in deps.wrap] == [("down", "attn_norm")]
    assert [(e.src, e.dst) for e in op_dependencies(llama_graph(tp=True)).wrap] == [("ffn_all_reduce", "attn_norm")]


def test_write_after_read_hazards():
    # A reads h and writes the scratch buffer s, B reads s (its output o is read by nobody), C updates h in place.
    # Inside a layer C overwrites h that A reads, and no read path orders A before C: a WAR edge A -> C. Across the
    # wrap, A of layer l+1 overwrites s while B of layer l may still read it, and nothing else orders B_l before
    # A_l+1: a WAR wrap edge B -> A. C -> A is the wrap's RAW on h; the other hazards (C_l -> C_l+1, ...) are implied.
    g = LayerGraph((Op("A", C, ("h",), ("s",)), Op("B", M, ("s",), ("o",)), Op("C", C, ("h",), ("h",))))
    deps = op_dependencies(g)
    assert {(e.src, e.dst, e.hazard) for e in deps.intra} == {("A", "B", "raw"), ("A", "C", "war")}
    assert {(e.src, e.dst, e.hazard) for e in deps.wrap} == {("B", "A", "war"), ("C", "A", "raw")}
    spec = PipelineSpec("war", 256, (NanoOpSpec("A", 0, 128, 0), NanoOpSpec("A", 128, 256, 0),
                                     NanoOpSpec("B", 0, 256, 1), NanoOpSpec("C", 0, 256, 0)), num_streams=2)
    assert spec.wrap_dependencies(g) == [[2, 3], [2, 3], [], []]
    assert spec.dependencies(g) == [[], [], [0, 1], [0, 1]]


def test_nano_dependencies_follow_the_rule():
    g = llama_graph()
    spec = two_batch(g)
    deps = spec.dependencies(g)
    rope0, rope1 = index(spec, "rope_kv[0:1024)"), index(spec, "rope_kv[1024:2048)")
    # Cross-token: prefill rows 1024.. read the KV of rows 0.. too; rows 0..1024 only their own.
    assert deps[index(spec, "prefill_attn[1024:2048)")] == [rope0, rope1]
    assert deps[index(spec, "prefill_attn[0:1024)")] == [rope0]
    assert deps[index(spec, "qkv[1024:2048)")] == [index(spec, "attn_norm[1024:2048)")]
    assert deps[index(spec, "o_proj[0:1024)")] == sorted([index(spec, "decode_attn[0:1024)"),
                                                         index(spec, "prefill_attn[0:1024)")])
    wrap = spec.wrap_dependencies(g)
    assert wrap[index(spec, "attn_norm[0:1024)")] == [index(spec, "down[0:1024)")]
    assert wrap[index(spec, "attn_norm[1024:2048)")] == [index(spec, "down[1024:2048)")]
    assert all(not w for i, w in enumerate(wrap) if spec.nano_ops[i].op != "attn_norm")


def test_wrap_uses_range_intersection():
    g = llama_graph()
    spec = two_batch(g)
    # attn_norm split differently from down: [0, 512) meets down[0:1024) only; [512, 2048) meets both.
    nano = [n for n in spec.nano_ops if n.op != "attn_norm"]
    spec = replace(spec, nano_ops=(NanoOpSpec("attn_norm", 0, 512, 0), NanoOpSpec("attn_norm", 512, 2048, 0),
                                   *nano))
    spec.validate(g)
    wrap = spec.wrap_dependencies(g)
    assert wrap[0] == [index(spec, "down[0:1024)")]
    assert wrap[1] == sorted([index(spec, "down[0:1024)"), index(spec, "down[1024:2048)")])


# ---- validation errors ---------------------------------------------------------------------------------------
def with_nano(spec: PipelineSpec, nano: list[NanoOpSpec], **kw) -> PipelineSpec:
    return replace(spec, nano_ops=tuple(nano), **kw)


@pytest.mark.parametrize("edit, message", [
    (lambda n: [replace(n[0], op="attn_nrm")] + n[1:], r"attn_nrm.*lacks"),
    (lambda n: [x for x in n if x.op != "act"], r"op 'act' has no nano-op"),
    (lambda n: [replace(x, lo=1040) if x.label == "qkv[1024:2048)" else x for x in n],
     r"op 'qkv': rows \[1024, 1040\) are covered by no nano-op"),
    (lambda n: [replace(x, hi=1040) if x.label == "qkv[0:1024)" else x for x in n],
     r"op 'qkv': rows \[1024, 1040\) are covered twice"),
    (lambda n: [replace(x, lo=1024) if x.label == "down[0:1024)" else x for x in n], r"down.*non-empty"),
    (lambda n: [replace(x, hi=4096) if x.label == "down[1024:2048)" else x for x in n], r"down.*inside \[0, 2048\)"),
    (lambda n: [replace(x, stream=3) if x.op == "gate_up" else x for x in n], r"gate_up.*stream 3"),
    (lambda n: [replace(x, share=0.0) if x.op == "act" else x for x in n], r"act.*share 0.0"),
    (lambda n: [replace(x, share=1.5) if x.op == "act" else x for x in n], r"act.*share 1.5"),
])
def test_validation_errors_name_the_op(edit, message):
    g = llama_graph()
    spec = two_batch(g)
    spec.validate(g)
    bad = with_nano(spec, edit(list(spec.nano_ops)), num_streams=2)
    with pytest.raises(PipelineSpecError, match=message):
        bad.validate(g)


def test_dependency_on_a_later_issued_nano_op_is_rejected():
    g = llama_graph()
    nano = list(two_batch(g).nano_ops)
    nano[0], nano[2] = nano[2], nano[0]  # qkv[0:1024) issued before attn_norm[0:1024)
    with pytest.raises(PipelineSpecError, match=r"qkv\[0:1024\) .* depends on attn_norm\[0:1024\).*issued after"):
        with_nano(two_batch(g), nano).validate(g)
    # Disjoint rows do not depend: qkv[1024:2048) may go before attn_norm[0:1024).
    nano = list(two_batch(g).nano_ops)
    order = [1, 3, 0, 2] + list(range(4, len(nano)))
    with_nano(two_batch(g), [nano[i] for i in order]).validate(g)


def test_extra_edges_must_point_forward():
    g = llama_graph()
    spec = two_batch(g)
    replace(spec, extra_edges=((1, 5),)).validate(g)
    with pytest.raises(PipelineSpecError, match=r"depends on .* issued after"):
        replace(spec, extra_edges=((5, 1),)).validate(g)
    with pytest.raises(PipelineSpecError, match=r"outside"):
        replace(spec, extra_edges=((0, 99),)).validate(g)


def three_independent(shares: tuple[float, float, float], edges=()) -> tuple[LayerGraph, PipelineSpec]:
    g = LayerGraph((Op("gemm", C, ("x",), ("a",)), Op("gemv", M, ("x",), ("b",)), Op("comm", N, ("x",), ("c",))))
    nano = tuple(NanoOpSpec(op, 0, 128, s, sh) for s, (op, sh) in enumerate(zip(("gemm", "gemv", "comm"), shares)))
    return g, PipelineSpec("three", 128, nano, tuple(edges), 3)


def test_concurrent_shares_pairs_and_triples():
    g, spec = three_independent((0.4, 0.3, 0.3))
    spec.validate(g)
    with pytest.raises(PipelineSpecError, match=r"gemm\[0:128\).*gemv\[0:128\).*1.100"):
        three_independent((0.6, 0.5, 0.1))[1].validate(g)
    # Pairwise sums 0.9, 0.9, 0.8 are fine; the three together are not.
    with pytest.raises(PipelineSpecError, match=r"gemm.*gemv.*comm.*1.300"):
        three_independent((0.5, 0.4, 0.4))[1].validate(g)
    # An extra edge orders gemm before gemv inside a layer, but gemv may still run with the next layer's gemm
    # (nothing links the layers in this toy graph) until an extra wrap edge orders that pair too.
    ordered = three_independent((0.7, 0.7, 0.3), edges=[(0, 1)])[1]
    with pytest.raises(PipelineSpecError, match=r"gemv\[0:128\).*gemm\[0:128\) of the next layer"):
        ordered.validate(g)
    replace(ordered, extra_wrap_edges=((1, 0),)).validate(g)


def test_concurrency_in_the_8b_preset():
    g = llama_graph()
    spec = load_preset("llama-8b-overlap")
    pairs, triples = spec.concurrency(g)
    dec = index(spec, "decode_attn[0:1024)")
    partners = {spec.nano_ops[j if i == dec else i].label for i, j, _ in pairs if dec in (i, j)}
    # decode of nano-batch 0 overlaps nano-batch 1's GEMMs but not nano-batch 0's o_proj/FFN (they wait for it)
    # nor the next layer (its attn_norm waits for down[0:1024), which waits for decode).
    assert {"qkv[1024:2048)", "o_proj[1024:2048)", "gate_up[1024:2048)", "down[1024:2048)"} <= partners
    assert not partners & {"o_proj[0:1024)", "gate_up[0:1024)", "down[0:1024)", "qkv[0:1024)"}
    assert not triples  # two streams


# ---- constructors --------------------------------------------------------------------------------------------
def test_sequential_and_nano_batch_only():
    g = llama_graph()
    seq = PipelineSpec.sequential(g, 2048)
    seq.validate(g)
    assert [n.label for n in seq.nano_ops][:2] == ["attn_norm[0:2048)", "qkv[0:2048)"]
    nb = PipelineSpec.nano_batch_only(g, 2048, 3)
    nb.validate(g)
    # 2048/3 = 682.7 -> 688 and 1365.3 -> 1360 (nearest multiples of 16)
    assert [(n.lo, n.hi) for n in nb.nano_ops[:3]] == [(0, 688), (688, 1360), (1360, 2048)]
    assert {n.stream for n in nb.nano_ops} == {0} and nb.num_streams == 1
    with pytest.raises(PipelineSpecError, match="nano-batches"):
        PipelineSpec.nano_batch_only(g, 32, 4)


def test_rescaled_rounds_to_multiples_of_16():
    spec = load_preset("llama-70b-tp-overlap")
    small = spec.rescaled(1000)
    # 384 -> 187.5 -> 192, 768 -> 375 -> 368, 1408 -> 687.5 -> 688, 2048 -> 1000
    assert sorted({n.lo for n in small.nano_ops} | {n.hi for n in small.nano_ops}) == [0, 192, 368, 688, 1000]
    small.validate(llama_graph(tp=True))
    assert small.meta["rescaled_from"] == 2048 and all(n.start_ms is None for n in small.nano_ops)
    with pytest.raises(PipelineSpecError, match="empty"):
        spec.rescaled(32)


# ---- JSON and presets ----------------------------------------------------------------------------------------
def test_json_round_trip(tmp_path):
    spec = replace(load_preset("llama-8b-overlap"), extra_edges=((0, 3),), extra_wrap_edges=((19, 0),))
    spec = replace(spec, nano_ops=(replace(spec.nano_ops[0], start_ms=0.0, end_ms=0.125), *spec.nano_ops[1:]))
    again = PipelineSpec.from_json(spec.to_json())
    assert again == spec
    path = tmp_path / "spec.json"
    spec.save(path)
    assert PipelineSpec.load(path) == spec
    text = path.read_text()
    assert sum('"op":' in line for line in text.splitlines()) == len(spec.nano_ops)  # one line per nano-op
    with pytest.raises(PipelineSpecError, match="malformed"):
        PipelineSpec.from_json('{"name": "x", "nano_ops": [{"op": "qkv"}]}')


def test_default_preset_follows_the_layer_graph():
    """'preset' (and 'auto' without a searched spec) resolves to the model's own overlap preset."""
    from nanoflow.graphs.pipeline import default_preset

    assert default_preset(llama_graph()) == "llama-8b-overlap"
    assert default_preset(llama_graph(tp=True)) == "llama-70b-tp-overlap"
    for tp in (False, True):
        load_preset(default_preset(llama_graph(tp))).validate(llama_graph(tp))


def test_presets_validate_against_the_llama_graph():
    assert {"llama-8b-overlap", "llama-70b-tp-overlap", "llama-8b-nanobatch"} <= set(list_presets())
    for name in ("llama-8b-overlap", "llama-8b-nanobatch"):
        load_preset(name).validate(llama_graph())
    tp = load_preset("llama-70b-tp-overlap")
    tp.validate(llama_graph(tp=True))
    with pytest.raises(PipelineSpecError, match="attn_all_reduce.*for_graph"):
        tp.validate(llama_graph())
    dropped = tp.for_graph(llama_graph())
    dropped.validate(llama_graph())
    assert len(dropped.nano_ops) == len(tp.nano_ops) - 4 and dropped.num_streams == 2
    assert load_preset("llama-8b-overlap").for_graph(llama_graph()) == load_preset("llama-8b-overlap")
    with pytest.raises(PipelineSpecError, match="unknown pipeline preset"):
        load_preset("no-such-preset")


def test_70b_preset_follows_figure_6():
    spec = load_preset("llama-70b-tp-overlap")
    cuts = {op: sorted({n.hi for n in spec.nano_ops if n.op == op}) for op in {n.op for n in spec.nano_ops}}
    for op in ("attn_norm", "qkv", "rope_kv", "decode_attn", "prefill_attn"):
        assert cuts[op] == [384, 768, 1408, 2048]
    for op in ("o_proj", "attn_all_reduce", "ffn_norm", "gate_up", "act", "down", "ffn_all_reduce"):
        assert cuts[op] == [768, 2048]
    assert {n.stream for n in spec.nano_ops if "all_reduce" in n.op} == {2}
    assert {n.stream for n in spec.nano_ops if n.op == "decode_attn"} == {1}


# ---- the copy op of simultaneous KV offload ------------------------------------------------------------------
def test_for_graph_adds_kv_offload_on_a_copy_stream():
    from nanoflow.models.layers import with_kv_offload

    g = with_kv_offload(llama_graph())
    assert g.names[:4] == ["attn_norm", "qkv", "rope_kv", "kv_offload"] and g.op("kv_offload").kind is ResourceKind.COPY
    deps = op_dependencies(g)
    # Reads only its own rows of this layer's cache (rope_kv's writes); nothing reads what it writes, no wrap edge.
    assert [(e.src, e.cross_token) for e in deps.intra if e.dst == "kv_offload"] == [("rope_kv", False)]
    assert not [e for e in deps.intra if e.src == "kv_offload"]
    assert not [e for e in deps.wrap if "kv_offload" in (e.src, e.dst)]
    base = load_preset("llama-8b-overlap")
    spec = base.for_graph(g)
    spec.validate(g)  # stream 0 holds GEMMs of share 1.0 that run beside the copies: copies are off the budget
    assert spec.num_streams == 3 and len(spec.nano_ops) == len(base.nano_ops) + 2
    for lo, hi in ((0, 1024), (1024, 2048)):  # issued right after the rope_kv of the same rows, on stream 2
        i = index(spec, f"rope_kv[{lo}:{hi})")
        assert spec.nano_ops[i + 1] == NanoOpSpec("kv_offload", lo, hi, 2, spec.nano_ops[i + 1].share)
        j = i + 1
        assert spec.dependencies(g)[j] == [i]
        assert not [k for k, d in enumerate(spec.dependencies(g)) if j in d]
        assert not [k for k, d in enumerate(spec.wrap_dependencies(g)) if j in d] and not spec.wrap_dependencies(g)[j]
    assert spec.for_graph(g) == spec  # already listed: kept as is
    assert spec.for_graph(llama_graph()) == replace(base, num_streams=2)  # and dropped for a graph without it
    # Extra edges follow their nano-ops to the new indices (base index 3 is decode_attn[0:1024)).
    edged = replace(base, extra_edges=((0, 3),)).for_graph(g)
    assert [(edged.nano_ops[i].label, edged.nano_ops[j].label) for i, j in edged.extra_edges] == \
        [("attn_norm[0:1024)", "decode_attn[0:1024)")]
    # Single-stream specs keep one stream: the copy runs in order after rope_kv.
    nb = load_preset("llama-8b-nanobatch").for_graph(g)
    nb.validate(g)
    assert nb.num_streams == 1 and {n.stream for n in nb.nano_ops if n.op == "kv_offload"} == {0}
    seq = PipelineSpec.sequential(g, 2048)
    seq.validate(g)
    assert seq.for_graph(g) == seq
    tp = load_preset("llama-70b-tp-overlap").for_graph(with_kv_offload(llama_graph(tp=True)))
    tp.validate(with_kv_offload(llama_graph(tp=True)))
    assert {n.stream for n in tp.nano_ops if n.op == "kv_offload"} == {3} and tp.num_streams == 4
