"""Mixtral: the LLaMA attention block, then a sparse mixture-of-experts FFN instead of the dense MLP.

Op names, resource kinds and buffers after ``ffn_norm`` (the attention half is ``models.layers``'s):

==============  ========  ====================================  ===================================================
op              kind      reads                                 writes
==============  ========  ====================================  ===================================================
router          COMPUTE   x_ffn                                 router_logits, topk_weights, topk_ids
experts         COMPUTE   x_ffn, topk_weights, topk_ids         hidden (+ its scratch: moe_x, moe_gate_up, moe_act,
                                                                moe_out)
ffn_all_reduce  NETWORK   hidden                                hidden     (TP only)
==============  ========  ====================================  ===================================================

Both ops are token-local: ``experts`` over rows ``[lo, hi)`` routes, sorts and computes exactly those rows' ``k``
choices, using rows ``[lo, hi)`` of scratch buffers ``k`` times as wide as one token's data (viewed as
``[(hi - lo) * k, width]``), so nano-ops over disjoint ranges share no memory. For the auto-search: unlike a dense
GEMM, the work inside ``experts`` depends on the routing, which changes every iteration — the rows per expert (and
with them the tiles of the grouped GEMM) vary while the op's token count stays fixed, so profiles of this op are
averages over routings, not exact per-iteration costs.
"""

from __future__ import annotations

import torch

from nanoflow.graphs.nanoop import LayerGraph, Op, ResourceKind
from nanoflow.models.base import BufferSpec, DecoderModel, StepContext
from nanoflow.models.layers import attention_ops, ffn_norm_op
from nanoflow.ops.activation import silu_and_mul_into
from nanoflow.ops.moe import MoEScratch, combine_into, combine_weighted_into, experts_forward, route

SCRATCH = ("moe_x", "moe_gate_up", "moe_act", "moe_out")


def moe_ops(w: dict[str, torch.Tensor], prefix: str, top_k: int, tp: bool) -> list[Op]:
    """router -> experts (+ all-reduce): the sparse MoE FFN of one layer, reading ``x_ffn`` and writing ``hidden``."""
    router_w = w[f"{prefix}.router.weight"]
    w13, w2 = w[f"{prefix}.experts.w13"], w[f"{prefix}.experts.w2"]

    def router(ctx: StepContext, lo: int, hi: int) -> None:
        b = ctx.bufs
        # Logits in the model dtype, then fp32 for the softmax (what Hugging Face Mixtral does).
        logits = b["router_logits"][lo:hi]
        logits.copy_(torch.mm(b["x_ffn"][lo:hi], router_w.t()))
        weights, ids = route(logits, top_k)
        b["topk_weights"][lo:hi].copy_(weights)
        b["topk_ids"][lo:hi].copy_(ids)

    def experts(ctx: StepContext, lo: int, hi: int) -> None:
        b = ctx.bufs
        rows = (hi - lo) * top_k
        scratch = MoEScratch(*(b[name][lo:hi].view(rows, -1) for name in SCRATCH))
        act = ctx.glue.get("silu_and_mul_into", silu_and_mul_into)
        combine = ctx.glue.get("moe_combine_into", combine_into)
        weighted = ctx.glue.get("moe_combine_weighted_into", combine_weighted_into)
        experts_forward(b["x_ffn"][lo:hi], b["topk_weights"][lo:hi], b["topk_ids"][lo:hi], w13, w2,
                        b["hidden"][lo:hi], scratch, act_into=act, combine=combine, combine_weighted=weighted,
                        backend=ctx.moe_backend)

    def ffn_all_reduce(ctx: StepContext, lo: int, hi: int) -> None:
        ctx.comm.all_reduce(ctx.bufs["hidden"][lo:hi])

    C = ResourceKind.COMPUTE
    ops = [
        Op("router", C, ("x_ffn",), ("router_logits", "topk_weights", "topk_ids"), router),
        Op("experts", C, ("x_ffn", "topk_weights", "topk_ids"), ("hidden", *SCRATCH), experts),
    ]
    if tp:
        ops.append(Op("ffn_all_reduce", ResourceKind.NETWORK, ("hidden",), ("hidden",), ffn_all_reduce))
    return ops


class MixtralForCausalLM(DecoderModel):
    """Mixtral-8x7B / 8x22B: ``num_experts`` SwiGLU experts per layer, ``num_experts_per_tok`` chosen per token.

    Weights (see ``models.loader``): ``layers.i.router.weight [E, hidden]``, ``layers.i.experts.w13
    [E, 2*inter, hidden]`` (per expert ``cat(w1, w3)``) and ``layers.i.experts.w2 [E, hidden, inter]``, where
    ``inter`` is this rank's shard of the intermediate size.
    """

    @property
    def top_k(self) -> int:
        return self.spec.num_experts_per_tok

    def buffer_specs(self) -> dict[str, BufferSpec]:
        """The dense model's buffers without ``gate_up``/``act``, plus routing and MoE scratch buffers.

        Scratch buffers hold ``top_k`` rows per token side by side (row ``t`` of ``moe_gate_up`` is ``top_k *
        2 * inter`` wide), so any token range ``[lo, hi)`` owns ``(hi - lo) * top_k`` contiguous scratch rows.
        """
        s, k = self.spec, self.top_k
        inter = s.intermediate_size // self.tp_size
        specs = {name: b for name, b in super().buffer_specs().items() if name not in ("gate_up", "act")}
        specs.update(
            router_logits=BufferSpec(s.num_experts, torch.float32),
            topk_weights=BufferSpec(k, torch.float32),
            topk_ids=BufferSpec(k, torch.int64),
            moe_x=BufferSpec(k * s.hidden_size),
            moe_gate_up=BufferSpec(k * 2 * inter),
            moe_act=BufferSpec(k * inter),
            moe_out=BufferSpec(k * s.hidden_size),
        )
        return specs

    def layer_graph(self, layer: int) -> LayerGraph:
        s = self.spec
        return mixtral_layer_graph(self.weights, layer, self.local_heads, self.local_kv_heads, s.head_dim,
                                   s.rms_norm_eps, self.top_k, self.tp_size > 1)


def mixtral_layer_graph(w: dict[str, torch.Tensor], layer: int, heads: int, kv_heads: int, head_dim: int,
                        eps: float, top_k: int, tp: bool) -> LayerGraph:
    """The Mixtral decoder layer: LLaMA attention, then the sparse MoE FFN (router -> experts [+ all-reduce])."""
    prefix = f"layers.{layer}"
    return LayerGraph(tuple(
        attention_ops(w, prefix, heads, kv_heads, head_dim, eps, tp)
        + [ffn_norm_op(w, prefix, eps)]
        + moe_ops(w, prefix, top_k, tp)
    ))
