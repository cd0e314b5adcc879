"""The planned-beside-measured Gantt chart of `nanoflow bench --profile`: planned times of a spec from per-op times
measured alone, checked on hand-worked cases, and the chart drawn with both panels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nanoflow.bench.planned import (
    layer_rows,
    planned_from_isolated,
    planned_layer,
    plot_planned_vs_measured,
    work_fraction,
)
from nanoflow.config import ModelSpec
from nanoflow.graphs.pipeline import NanoOpSpec, PipelineSpec, load_preset
from nanoflow.models.loader import load_weights
from nanoflow.models.registry import model_class

DENSE = 64


@pytest.fixture(scope="module")
def graph():
    spec = ModelSpec.from_hf_config(dict(architectures=["LlamaForCausalLM"], vocab_size=64, hidden_size=32,
                                         intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    weights = load_weights(spec, None, load_format="dummy", dtype=torch.float32, progress=False)
    return model_class(spec.architecture)(spec, weights).graphs[0]


# ms per op for the whole batch, one layer
OP_MS = {"attn_norm": 0.5, "qkv": 2.0, "rope_kv": 0.5, "decode_attn": 3.0, "prefill_attn": 1.0, "o_proj": 1.0,
         "ffn_norm": 0.5, "gate_up": 4.0, "act": 0.5, "down": 2.0}


def test_work_fraction_follows_where_each_op_has_work():
    assert work_fraction("gate_up", 0, 16, 64, 40) == 0.25
    assert work_fraction("decode_attn", 0, 32, 64, 40) == 32 / 40  # decode rows come first
    assert work_fraction("decode_attn", 32, 64, 64, 40) == 8 / 40
    assert work_fraction("prefill_attn", 32, 64, 64, 40) == 1.0  # all 24 prefill rows
    assert work_fraction("prefill_attn", 0, 32, 64, 40) == 0.0
    assert work_fraction("decode_attn", 0, 64, 64, 0) == 0.0


def test_sequential_plan_is_the_sum_and_a_one_stream_split_keeps_it(graph):
    seq = planned_from_isolated(PipelineSpec.sequential(graph, DENSE), graph, OP_MS, decode_rows=40)
    assert max(n.end_ms for n in seq.nano_ops) == pytest.approx(sum(OP_MS.values()))
    ends = [n.end_ms for n in seq.nano_ops]
    assert ends == sorted(ends)
    split = planned_from_isolated(PipelineSpec.nano_batch_only(graph, DENSE, 2), graph, OP_MS, decode_rows=40)
    assert max(n.end_ms for n in split.nano_ops) == pytest.approx(sum(OP_MS.values()))


def test_two_streams_overlap_decode_with_the_mlp(graph):
    """Hand-worked: nano-batch 1's decode attention (its 32 of 40 decode rows: 2.4 ms) on stream 1 runs beside
    nano-batch 0's MLP on stream 0."""
    half = [(0, 32), (32, 64)]
    ops = [NanoOpSpec("attn_norm", 0, 64, 0), NanoOpSpec("qkv", 0, 64, 0), NanoOpSpec("rope_kv", 0, 64, 0)]
    ops += [NanoOpSpec("decode_attn", lo, hi, 1) for lo, hi in half]
    ops += [NanoOpSpec("prefill_attn", 0, 64, 0)]
    for lo, hi in half:
        ops += [NanoOpSpec(op, lo, hi, 0) for op in ("o_proj", "ffn_norm", "gate_up", "act", "down")]
    spec = PipelineSpec("hand", DENSE, tuple(ops), num_streams=2)  # shares unset: the plan does not use them
    plan = planned_from_isolated(spec, graph, OP_MS, decode_rows=64)
    t = {(n.op, n.lo): (n.start_ms, n.end_ms) for n in plan.nano_ops}
    assert t[("decode_attn", 0)] == pytest.approx((3.0, 4.5))  # after rope_kv (0.5 + 2 + 0.5); half the rows
    assert t[("decode_attn", 32)] == pytest.approx((4.5, 6.0))  # stream order
    # prefill attention (no prefill rows: 0 ms) waits for the whole of rope_kv only; o_proj[0:32) for decode [0:32)
    assert t[("o_proj", 0)] == pytest.approx((4.5, 5.0))
    # the first nano-batch's MLP runs while the second one's decode attention does
    assert t[("gate_up", 0)][0] < t[("decode_attn", 32)][1]
    assert t[("o_proj", 32)][0] == pytest.approx(max(6.0, t[("down", 0)][1]))
    deps = spec.dependencies(graph)
    for j, n in enumerate(plan.nano_ops):
        assert all(plan.nano_ops[i].end_ms <= n.start_ms + 1e-9 for i in deps[j])


def test_preset_plan_beats_the_sequential_one_and_the_chart_has_both_panels(graph, tmp_path):
    preset = load_preset("llama-8b-overlap").rescaled(DENSE).for_graph(graph)
    plan = planned_from_isolated(preset, graph, OP_MS, decode_rows=32)
    assert max(n.end_ms for n in plan.nano_ops) < sum(OP_MS.values())
    records = [SimpleNamespace(stream="s0", layer=layer, op=n.op, lo=n.lo, hi=n.hi, start_ms=10 * layer + n.start_ms,
                               end_ms=10 * layer + n.end_ms * 1.2) for layer in (0, 1) for n in plan.nano_ops]
    rows = layer_rows(records, 1)
    assert len(rows) == len(plan.nano_ops) and rows[0][1].startswith(plan.nano_ops[0].op + "[")
    path = plot_planned_vs_measured(planned_layer(preset, graph, OP_MS, 32), graph, records, 1, tmp_path / "g.png",
                                    "test")
    assert path.stat().st_size > 10_000
