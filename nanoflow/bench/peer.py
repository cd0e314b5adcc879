"""The peer in the same run: Hugging Face transformers continuous batching (``generate_batch``, ``paged|sdpa``).

The HF model is built on the meta device and its parameters are *views* of NanoFlow's fused weights (q/k/v rows
of ``qkv``, gate/up rows of ``gate_up``), so both engines run the very same numbers with no extra memory.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

log = logging.getLogger("nanoflow")


def hf_state_dict(spec: Any, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q, kv, inter = spec.q_size, spec.kv_size, spec.intermediate_size
    sd = {"model.embed_tokens.weight": weights["embed.weight"], "model.norm.weight": weights["norm.weight"]}
    sd["lm_head.weight"] = weights.get("lm_head.weight", weights["embed.weight"])
    for i in range(spec.num_layers):
        p, h = f"layers.{i}", f"model.layers.{i}"
        qkv = weights[f"{p}.qkv.weight"]
        sd[f"{h}.self_attn.q_proj.weight"] = qkv[:q]
        sd[f"{h}.self_attn.k_proj.weight"] = qkv[q:q + kv]
        sd[f"{h}.self_attn.v_proj.weight"] = qkv[q + kv:]
        if f"{p}.qkv.bias" in weights:
            b = weights[f"{p}.qkv.bias"]
            sd[f"{h}.self_attn.q_proj.bias"], sd[f"{h}.self_attn.k_proj.bias"] = b[:q], b[q:q + kv]
            sd[f"{h}.self_attn.v_proj.bias"] = b[q + kv:]
        sd[f"{h}.self_attn.o_proj.weight"] = weights[f"{p}.o_proj.weight"]
        gu = weights[f"{p}.gate_up.weight"]
        sd[f"{h}.mlp.gate_proj.weight"], sd[f"{h}.mlp.up_proj.weight"] = gu[:inter], gu[inter:]
        sd[f"{h}.mlp.down_proj.weight"] = weights[f"{p}.down.weight"]
        sd[f"{h}.input_layernorm.weight"] = weights[f"{p}.attn_norm.weight"]
        sd[f"{h}.post_attention_layernorm.weight"] = weights[f"{p}.ffn_norm.weight"]
    return sd


def hf_model(config_path: str, spec: Any, weights: dict[str, torch.Tensor], attn: str = "paged|sdpa") -> Any:
    import json

    import transformers

    with open(config_path) as f:
        cfg_dict = json.load(f)
    config = transformers.AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn,
                                                              dtype=weights["embed.weight"].dtype)
    model.load_state_dict(hf_state_dict(spec, weights), assign=True, strict=False)
    # Rotary embeddings hold buffers computed at construction (on meta here): rebuild them on the real device.
    device = weights["embed.weight"].device
    for _name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            inv = getattr(child, "inv_freq", None)
            if isinstance(inv, torch.Tensor) and inv.is_meta:
                setattr(parent, child_name, type(child)(config=child.config, device=device))
    return model.eval()


def run_peer(config_path: str, spec: Any, weights: dict[str, torch.Tensor],
             reqs: list[tuple[list[int], int]]) -> dict[str, Any]:
    """Greedy ``generate_batch`` with EOS disabled; returns throughput and tokens actually generated."""
    import transformers

    model = hf_model(config_path, spec, weights)
    max_new = max(n for _, n in reqs)
    gen = transformers.GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None
    inputs = [ids for ids, _ in reqs]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=inputs, generation_config=gen, progress_bar=True)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    generated = sum(len(r.generated_tokens) for r in results.values())
    prompt = sum(len(i) for i in inputs)
    del model
    return {"requests": len(inputs), "prompt_tokens": prompt, "generated_tokens": generated, "wall_s": wall,
            "throughput_tok_s": (prompt + generated) / wall, "transformers": transformers.__version__}
