"""Adding a model from outside the package: register a toy architecture and generate with it.

The toy is LLaMA with a ReGLU MLP (ReLU instead of SiLU). Its reference is an independent float64 forward pass written
here from the definition (full recomputation, no KV cache), so the engine's paged attention, chunked prefill and
scheduler are all exercised against plain math.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from nanoflow import LLM, SamplingParams
from nanoflow.graphs.nanoop import LayerGraph, Op, ResourceKind
from nanoflow.models.base import DecoderModel
from nanoflow.models.layers import attention_ops, ffn_norm_op, linear_into
from nanoflow.models.registry import register_model

CFG = {"architectures": ["ToyReGLUForCausalLM"], "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
       "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False}


class ToyReGLUForCausalLM(DecoderModel):
    def layer_graph(self, layer: int) -> LayerGraph:
        w, p = self.weights, f"layers.{layer}"
        gu, down = w[f"{p}.gate_up.weight"], w[f"{p}.down.weight"]
        inter = gu.shape[0] // 2

        def reglu(ctx, lo, hi):
            linear_into(ctx.bufs["x_ffn"][lo:hi], gu, None, ctx.bufs["gate_up"][lo:hi])
            g = ctx.bufs["gate_up"][lo:hi]
            ctx.bufs["act"][lo:hi].copy_(torch.relu(g[:, :inter]) * g[:, inter:])

        def mlp_down(ctx, lo, hi):
            linear_into(ctx.bufs["act"][lo:hi], down, None, ctx.bufs["hidden"][lo:hi])

        ops = attention_ops(w, p, self.local_heads, self.local_kv_heads, self.spec.head_dim, self.spec.rms_norm_eps,
                            tp=False)
        ops += [ffn_norm_op(w, p, self.spec.rms_norm_eps),
                Op("reglu", ResourceKind.COMPUTE, ("x_ffn",), ("gate_up", "act"), reglu),
                Op("down", ResourceKind.COMPUTE, ("act",), ("hidden",), mlp_down)]
        return LayerGraph(tuple(ops))


def _reference_next(w: dict[str, torch.Tensor], ids: list[int]) -> int:
    """Float64 forward of the toy from its definition; returns the greedy next token."""
    c = CFG
    h, nh, kvh = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = h // nh
    w = {k: v.double() for k, v in w.items()}
    x = w["embed.weight"][torch.tensor(ids)]
    t = len(ids)
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    cos, sin = ang.cos(), ang.sin()

    def rope(v: torch.Tensor) -> torch.Tensor:
        a, b = v[..., : d // 2], v[..., d // 2:]
        return torch.cat([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * g

    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}"
        qkv = norm(x, w[f"{p}.attn_norm.weight"]) @ w[f"{p}.qkv.weight"].T
        q = rope(qkv[:, : nh * d].view(t, nh, d))
        k = rope(qkv[:, nh * d: (nh + kvh) * d].view(t, kvh, d)).repeat_interleave(nh // kvh, 1)
        v = qkv[:, (nh + kvh) * d:].view(t, kvh, d).repeat_interleave(nh // kvh, 1)
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        x = x + att.transpose(0, 1).reshape(t, h) @ w[f"{p}.o_proj.weight"].T
        gu = norm(x, w[f"{p}.ffn_norm.weight"]) @ w[f"{p}.gate_up.weight"].T
        inter = gu.shape[1] // 2
        x = x + (torch.relu(gu[:, :inter]) * gu[:, inter:]) @ w[f"{p}.down.weight"].T
    logits = norm(x[-1], w["norm.weight"]) @ w["lm_head.weight"].T
    return int(logits.argmax())


def test_registered_toy_architecture_generates(tmp_path):
    register_model("ToyReGLUForCausalLM", ToyReGLUForCausalLM)
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", load_format="dummy", dense_batch_size=24,
              kv_cache_tokens=1024, seed=3)
    weights = llm.engine.model.weights
    with torch.no_grad():  # peaked logits, so greedy choices are not decided by rounding
        for name, t in weights.items():
            if t.dim() == 2:
                t.normal_(0.0, 0.25, generator=torch.Generator().manual_seed(len(name)))
    assert isinstance(llm.engine.model, ToyReGLUForCausalLM)
    prompts = [[5, 17, 33, 2, 8, 41, 60, 7, 9, 11, 3], [70, 71, 72], list(range(10, 40))]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = list(prompt)
        for _ in range(6):
            ids.append(_reference_next(weights, ids))
        assert out.token_ids == ids[len(prompt):]
