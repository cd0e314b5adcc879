"""The compiled glue ops write the same values into the callers' buffers as the eager ops (on this CPU, through
inductor's C++ backend; an in-place form it fails to compile falls back to the out-of-place one plus copies)."""

from __future__ import annotations

import torch

from nanoflow.graphs.glue import compiled_glue
from nanoflow.models.layers import rope_qkv
from nanoflow.ops.activation import silu_and_mul
from nanoflow.ops.kv_store import FP8, round_like_cache
from nanoflow.ops.norm import add_rms_norm
from nanoflow.ops.rotary import cos_sin_cache


def test_compiled_glue_writes_into_row_slices_like_eager():
    gen = torch.Generator().manual_seed(0)
    glue = compiled_glue()
    t, hidden, inter, heads, kv_heads, head_dim = 12, 64, 96, 4, 2, 16
    lo, hi = 4, 10  # a nano-batch's rows of the engine's buffers: rows outside must stay untouched

    h, r, w = (torch.randn(t, hidden, generator=gen), torch.randn(t, hidden, generator=gen),
               torch.randn(hidden, generator=gen))
    x_ref, res_ref = add_rms_norm(h[lo:hi], r[lo:hi].clone(), w, 1e-5)
    out, r_before = torch.zeros(t, hidden), r.clone()
    glue["add_rms_norm_into"](h[lo:hi], r[lo:hi], w, 1e-5, out[lo:hi])
    torch.testing.assert_close(out[lo:hi], x_ref)
    torch.testing.assert_close(r[lo:hi], res_ref)
    assert not out[:lo].any() and not out[hi:].any()
    assert torch.equal(r[:lo], r_before[:lo]) and torch.equal(r[hi:], r_before[hi:])

    gate_up, act = torch.randn(t, 2 * inter, generator=gen), torch.zeros(t, inter)
    glue["silu_and_mul_into"](gate_up[lo:hi], act[lo:hi])
    torch.testing.assert_close(act[lo:hi], silu_and_mul(gate_up[lo:hi]))
    assert not act[:lo].any() and not act[hi:].any()

    cos_sin = cos_sin_cache(head_dim, 64, 10000.0, None, "cpu")[torch.arange(lo, hi)]
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    for kv_dtype in (None, FP8):
        qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=gen) * 300  # some beyond float8's 448
        before = qkv.clone()
        q_out = torch.zeros(t, heads * head_dim)
        k, v = glue["rope_qkv_into"](qkv[lo:hi], cos_sin, heads, kv_heads, head_dim, q_out[lo:hi], kv_dtype)
        q_ref, k_ref, v_ref = rope_qkv(before[lo:hi], cos_sin, heads, kv_heads, head_dim)
        if kv_dtype == FP8:  # k and v as the float8 cache will hold them
            k_ref, v_ref = round_like_cache(k_ref), round_like_cache(v_ref)
        torch.testing.assert_close(q_out[lo:hi], q_ref)
        torch.testing.assert_close(k, k_ref)
        torch.testing.assert_close(v, v_ref)
        # k and v are views of qkv's own columns (prefill attention reads the chunk's keys there); q's are untouched
        assert k.data_ptr() == qkv[lo:hi, q_size:].data_ptr()
        assert v.data_ptr() == qkv[lo:hi, q_size + kv_size:].data_ptr()
        assert torch.equal(qkv[lo:hi, :q_size], before[lo:hi, :q_size])
        assert torch.equal(qkv[:lo], before[:lo]) and torch.equal(qkv[hi:], before[hi:])
        assert not q_out[:lo].any() and not q_out[hi:].any()


def test_compiled_moe_combine_gathers_and_sums_like_eager():
    from nanoflow.ops.moe import combine_into, combine_weighted_into

    gen = torch.Generator().manual_seed(1)
    n, k, hidden = 7, 2, 32
    expert_out = torch.randn(n * k, hidden, generator=gen).to(torch.bfloat16)
    position = torch.randperm(n * k, generator=gen)
    want = torch.zeros(n + 2, hidden, dtype=torch.bfloat16)
    got = torch.zeros(n + 2, hidden, dtype=torch.bfloat16)
    combine_into(expert_out, position, want[1:n + 1])
    compiled_glue()["moe_combine_into"](expert_out, position, got[1:n + 1])
    torch.testing.assert_close(got, want)
    ref = expert_out.float()[position].view(n, k, hidden).sum(1).to(torch.bfloat16)
    torch.testing.assert_close(want[1:n + 1], ref)
    assert not want[0].any() and not want[n + 1].any()
    # The weighted form (rows not yet scaled by their routing weights), compiled against eager.
    weights = torch.rand(n, k, generator=gen)
    want.zero_()
    got.zero_()
    combine_weighted_into(expert_out, position, weights, want[1:n + 1])
    compiled_glue()["moe_combine_weighted_into"](expert_out, position, weights, got[1:n + 1])
    torch.testing.assert_close(got, want)
    ref = (expert_out.float()[position].view(n, k, hidden) * weights[:, :, None]).sum(1).to(torch.bfloat16)
    torch.testing.assert_close(want[1:n + 1], ref)
    assert not want[0].any() and not want[n + 1].any()


def test_glue_compiles_every_bucket_once_and_engines_share_it():
    """The engine's glue meets 12 token buckets and nano-batch slices of them: none may run eagerly past dynamo's
    recompile limit (8 compiled versions per function, all wrappers together; with a static compile per shape the
    last buckets, and every shape of an engine built second in the process, ran uncompiled: s15). A second engine's
    glue compiles nothing new."""
    from torch._dynamo.utils import counters

    from nanoflow.graphs.glue import recompile_limit_hits

    inter, dense = 24, 192
    gate_up, act = torch.randn(dense, 2 * inter), torch.zeros(dense, inter)
    hits, graphs = recompile_limit_hits(), counters["stats"]["unique_graphs"]
    fn = compiled_glue()["silu_and_mul_into"]
    buckets = [192, 160, 128, 112, 96, 80, 64, 48, 40, 32, 24, 16]
    for n in buckets + [70, 30]:  # then two nano-batch sizes
        fn(gate_up[:n], act[:n])
        torch.testing.assert_close(act[:n], silu_and_mul(gate_up[:n]))
    lo, hi = 50, 130  # a nano-batch's rows in the middle of the buffers
    fn(gate_up[lo:hi], act[lo:hi])
    torch.testing.assert_close(act[lo:hi], silu_and_mul(gate_up[lo:hi]))
    first_engine = counters["stats"]["unique_graphs"] - graphs
    assert first_engine <= 3  # the first shape's static graph, one row-dynamic graph (and the fallback's op)
    second = compiled_glue()["silu_and_mul_into"]  # the next engine in this process
    for n in (176, 144, 8):
        second(gate_up[:n], act[:n])
        torch.testing.assert_close(act[:n], silu_and_mul(gate_up[:n]))
    assert counters["stats"]["unique_graphs"] - graphs == first_engine
    assert recompile_limit_hits() == hits
