"""Shared building blocks: the LLaMA-style decoder layer declared as a graph of operations.

Op names, resource kinds and buffers (the pipeline spec and the auto-search refer to these names):

==============  ========  ===========================  =====================================
op              kind      reads                        writes
==============  ========  ===========================  =====================================
attn_norm       OTHER     hidden, residual             x_attn, residual
qkv             COMPUTE   x_attn                       qkv
rope_kv         OTHER     qkv                          q, kv_cache, qkv (k rotated in place)
kv_offload      COPY      kv_cache (own rows)          kv_staging (KV offload only)
decode_attn     MEMORY    q, kv_cache (cross-token)    attn
prefill_attn    COMPUTE   q, qkv, kv_cache (cross-tok) attn
o_proj          COMPUTE   attn                         attn_out
attn_all_reduce NETWORK   attn_out                     attn_out   (TP only)
ffn_norm        OTHER     attn_out, residual           x_ffn, residual
gate_up         COMPUTE   x_ffn                        gate_up
act             OTHER     gate_up                      act
down            COMPUTE   act                          hidden
ffn_all_reduce  NETWORK   hidden                       hidden     (TP only)
==============  ========  ===========================  =====================================

Every op reads and writes only rows ``[lo, hi)`` (attention reads the KV of earlier tokens through the cache), so
the executor may split any op into nano-operations over token ranges.

``kv_offload`` ("simultaneous offload", paper §4.2.2) exists only in graphs built with :func:`with_kv_offload` (the
runner's ``kv_offload`` flag): right after ``rope_kv`` it copies the K/V rows that op stored for the same tokens to a
pinned host staging buffer, one device->host copy per K and V, on a copy stream while the FFN computes. Nothing
reads ``kv_staging`` inside the layer; the engine reads it once the step is done.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nanoflow.graphs.nanoop import LayerGraph, Op, ResourceKind
from nanoflow.models.base import StepContext
from nanoflow.ops.activation import silu_and_mul_into
from nanoflow.ops.kv_store import FP8, round_like_cache, store_kv
from nanoflow.ops.norm import add_rms_norm_into
from nanoflow.ops.rotary import apply_rotary

C, M, N, OT, CP = ResourceKind.COMPUTE, ResourceKind.MEMORY, ResourceKind.NETWORK, ResourceKind.OTHER, ResourceKind.COPY


def _glue(ctx: StepContext, name: str, fallback: Callable) -> Callable:
    return ctx.glue.get(name, fallback)


def linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = x @ weight.T (+ bias)`` written in place (cuBLAS through torch); the ops call it through the glue
    (``"linear_into"``), where batch-invariant mode puts ``ops.batch_invariant.linear_into``."""
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


def rope_qkv(qkv: torch.Tensor, cos_sin: torch.Tensor, heads: int, kv_heads: int,
             head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``qkv [T, (H + 2 KV) * D]`` and rotate q and k; returns ``(q [T, H*D], k, v [T, KV, D])``."""
    t = qkv.shape[0]
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q = apply_rotary(qkv[:, :q_size].view(t, heads, head_dim), cos_sin)
    k = apply_rotary(qkv[:, q_size:q_size + kv_size].view(t, kv_heads, head_dim), cos_sin)
    v = qkv[:, q_size + kv_size:].view(t, kv_heads, head_dim)
    return q.reshape(t, q_size), k, v


def kv_columns(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k and v columns of a fused ``qkv [T, (H + 2 KV) * D]`` buffer as views ``[T, KV, D]``."""
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    t = qkv.shape[0]
    return (qkv[:, q_size:q_size + kv_size].view(t, kv_heads, head_dim),
            qkv[:, q_size + kv_size:q_size + 2 * kv_size].view(t, kv_heads, head_dim))


def rope_qkv_into(qkv: torch.Tensor, cos_sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                  q_out: torch.Tensor, kv_dtype: torch.dtype | None = None,
                  op: Callable = rope_qkv) -> tuple[torch.Tensor, torch.Tensor]:
    """``op`` (:func:`rope_qkv`) with the rotated q written into ``q_out [T, H*D]`` and the rotated k back into
    ``qkv``'s k columns, where prefill attention reads the chunk's own keys; returns ``(k, v)`` as views of ``qkv``
    ``[T, KV, D]``. With a float8 cache (``kv_dtype``) k and v are rounded there as the cache will hold them, so
    the chunk attends the same values it would read back from the cache (every float8 e4m3 value is exact in bf16)."""
    q, k, v = op(qkv, cos_sin, heads, kv_heads, head_dim)
    q_out.copy_(q)
    k_cols, v_cols = kv_columns(qkv, heads, kv_heads, head_dim)
    if kv_dtype == FP8:
        k_cols.copy_(round_like_cache(k))
        v_cols.copy_(round_like_cache(v))
    else:
        k_cols.copy_(k)
    return k_cols, v_cols


def attention_ops(w: dict[str, torch.Tensor], prefix: str, heads: int, kv_heads: int, head_dim: int,
                  eps: float, tp: bool) -> list[Op]:
    """attn_norm .. o_proj (+ all-reduce): the attention half of a LLaMA-style layer."""
    norm_w, qkv_w, qkv_b = w[f"{prefix}.attn_norm.weight"], w[f"{prefix}.qkv.weight"], w.get(f"{prefix}.qkv.bias")
    o_w = w[f"{prefix}.o_proj.weight"]

    def attn_norm(ctx: StepContext, lo: int, hi: int) -> None:
        b = ctx.bufs
        _glue(ctx, "add_rms_norm_into", add_rms_norm_into)(b["hidden"][lo:hi], b["residual"][lo:hi], norm_w, eps,
                                                          b["x_attn"][lo:hi])

    def qkv(ctx: StepContext, lo: int, hi: int) -> None:
        _glue(ctx, "linear_into", linear_into)(ctx.bufs["x_attn"][lo:hi], qkv_w, qkv_b, ctx.bufs["qkv"][lo:hi])

    def rope_kv(ctx: StepContext, lo: int, hi: int) -> None:
        fused = ctx.glue.get("rope_kv_store")  # ops.rope_kv: one Triton kernel (the runner's choice on a GPU)
        if fused is not None:
            fused(ctx.bufs["qkv"][lo:hi], ctx.cos_sin, ctx.batch.positions[lo:hi], ctx.batch.slot_mapping[lo:hi],
                  ctx.bufs["q"][lo:hi], ctx.k_cache, ctx.v_cache, heads, kv_heads, head_dim)
            return
        cos_sin = ctx.cos_sin[ctx.batch.positions[lo:hi]]
        k, v = _glue(ctx, "rope_qkv_into", rope_qkv_into)(ctx.bufs["qkv"][lo:hi], cos_sin, heads, kv_heads, head_dim,
                                                          ctx.bufs["q"][lo:hi], ctx.k_cache.dtype)
        store_kv(k, v, ctx.k_cache, ctx.v_cache, ctx.batch.slot_mapping[lo:hi])

    def decode_attn(ctx: StepContext, lo: int, hi: int) -> None:
        meta = ctx.batch.attn_meta(lo, hi).decode
        if meta is None:
            return
        rows = meta.rows
        q = ctx.bufs["q"][lo:lo + rows].view(rows, heads, head_dim)
        out = ctx.bufs["attn"][lo:lo + rows].view(rows, heads, head_dim)
        ctx.attention.decode(q, ctx.k_cache, ctx.v_cache, meta, out)

    def prefill_attn(ctx: StepContext, lo: int, hi: int) -> None:
        meta = ctx.batch.attn_meta(lo, hi).prefill
        if meta is None:
            return
        q = ctx.bufs["q"][lo:hi].view(hi - lo, heads, head_dim)
        out = ctx.bufs["attn"][lo:hi].view(hi - lo, heads, head_dim)
        # The chunk's own K (rotated by rope_kv) and V, read from the QKV rows; only the context from the pages.
        k_new, v_new = kv_columns(ctx.bufs["qkv"][lo:hi], heads, kv_heads, head_dim)
        ctx.attention.prefill(q, ctx.k_cache, ctx.v_cache, meta, out, k_new=k_new, v_new=v_new)

    def o_proj(ctx: StepContext, lo: int, hi: int) -> None:
        _glue(ctx, "linear_into", linear_into)(ctx.bufs["attn"][lo:hi], o_w, None, ctx.bufs["attn_out"][lo:hi])

    def attn_all_reduce(ctx: StepContext, lo: int, hi: int) -> None:
        ctx.comm.all_reduce(ctx.bufs["attn_out"][lo:hi])

    ops = [
        Op("attn_norm", OT, ("hidden", "residual"), ("x_attn", "residual"), attn_norm),
        Op("qkv", C, ("x_attn",), ("qkv",), qkv),
        Op("rope_kv", OT, ("qkv",), ("q", "kv_cache", "qkv"), rope_kv),
        Op("decode_attn", M, ("q", "kv_cache"), ("attn",), decode_attn, cross_token_reads=("kv_cache",)),
        Op("prefill_attn", C, ("q", "kv_cache", "qkv"), ("attn",), prefill_attn, cross_token_reads=("kv_cache",)),
        Op("o_proj", C, ("attn",), ("attn_out",), o_proj),
    ]
    if tp:
        ops.append(Op("attn_all_reduce", N, ("attn_out",), ("attn_out",), attn_all_reduce))
    return ops


def ffn_norm_op(w: dict[str, torch.Tensor], prefix: str, eps: float) -> Op:
    norm_w = w[f"{prefix}.ffn_norm.weight"]

    def ffn_norm(ctx: StepContext, lo: int, hi: int) -> None:
        b = ctx.bufs
        _glue(ctx, "add_rms_norm_into", add_rms_norm_into)(b["attn_out"][lo:hi], b["residual"][lo:hi], norm_w,
                                                          eps, b["x_ffn"][lo:hi])

    return Op("ffn_norm", OT, ("attn_out", "residual"), ("x_ffn", "residual"), ffn_norm)


def mlp_ops(w: dict[str, torch.Tensor], prefix: str, tp: bool) -> list[Op]:
    """gate_up -> act -> down (+ all-reduce): the SwiGLU MLP."""
    gu_w, down_w = w[f"{prefix}.gate_up.weight"], w[f"{prefix}.down.weight"]

    def gate_up(ctx: StepContext, lo: int, hi: int) -> None:
        _glue(ctx, "linear_into", linear_into)(ctx.bufs["x_ffn"][lo:hi], gu_w, None, ctx.bufs["gate_up"][lo:hi])

    def act(ctx: StepContext, lo: int, hi: int) -> None:
        _glue(ctx, "silu_and_mul_into", silu_and_mul_into)(ctx.bufs["gate_up"][lo:hi], ctx.bufs["act"][lo:hi])

    def down(ctx: StepContext, lo: int, hi: int) -> None:
        _glue(ctx, "linear_into", linear_into)(ctx.bufs["act"][lo:hi], down_w, None, ctx.bufs["hidden"][lo:hi])

    def ffn_all_reduce(ctx: StepContext, lo: int, hi: int) -> None:
        ctx.comm.all_reduce(ctx.bufs["hidden"][lo:hi])

    ops = [
        Op("gate_up", C, ("x_ffn",), ("gate_up",), gate_up),
        Op("act", OT, ("gate_up",), ("act",), act),
        Op("down", C, ("act",), ("hidden",), down),
    ]
    if tp:
        ops.append(Op("ffn_all_reduce", N, ("hidden",), ("hidden",), ffn_all_reduce))
    return ops


def llama_layer_graph(w: dict[str, torch.Tensor], layer: int, heads: int, kv_heads: int, head_dim: int,
                      eps: float, tp: bool) -> LayerGraph:
    """The full LLaMA / Qwen2 / Mistral decoder layer (QKV bias is used when the weights carry one)."""
    prefix = f"layers.{layer}"
    return LayerGraph(tuple(
        attention_ops(w, prefix, heads, kv_heads, head_dim, eps, tp)
        + [ffn_norm_op(w, prefix, eps)]
        + mlp_ops(w, prefix, tp)
    ))


def kv_offload_op() -> Op:
    """``kv_offload``: K/V of rows ``[lo, hi)`` (just stored by ``rope_kv``) -> ``ctx.kv_staging[layer, :, lo:hi]``.

    The rows are gathered from the cache by their slots into a temporary (one small kernel each for K and V), then
    copied to the pinned staging buffer without blocking: a device->pinned-host copy is stream-ordered and CUDA-graph
    capturable. Both copies are contiguous (rows ``lo:hi`` of one ``[T, kv_heads, head_dim]`` plane), so none falls
    back to a synchronous staged copy.
    """

    def kv_offload(ctx: StepContext, lo: int, hi: int) -> None:
        staging = ctx.kv_staging[ctx.layer]  # [2, T, kv_heads, head_dim]
        slots = ctx.batch.slot_mapping[lo:hi]
        for i, cache in enumerate((ctx.k_cache, ctx.v_cache)):
            rows = cache.view(-1, *cache.shape[-2:]).index_select(0, slots)
            staging[i, lo:hi].copy_(rows, non_blocking=True)

    return Op("kv_offload", CP, ("kv_cache",), ("kv_staging",), kv_offload)


def with_kv_offload(graph: LayerGraph) -> LayerGraph:
    """``graph`` with :func:`kv_offload_op` right after ``rope_kv`` (any architecture whose layer has one)."""
    names = graph.names
    if "rope_kv" not in names:
        raise ValueError(f"KV offload needs a rope_kv op to follow; this layer graph has {', '.join(names)}")
    if "kv_offload" in names:
        return graph
    at = names.index("rope_kv") + 1
    return graph.with_ops(graph.ops[:at] + (kv_offload_op(),) + graph.ops[at:])
