"""End-to-end correctness: NanoFlow generates exactly what Hugging Face transformers generates.

Tiny random models are saved with ``save_pretrained`` and loaded by our loader; transformers' greedy ``generate`` on
the same weights is the reference (token for token), and fp32 last-token logits must agree within 1e-3 relative.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import hf_greedy  # noqa: E402

from nanoflow import LLM, SamplingParams  # noqa: E402

PROMPT_LENS = (5, 17, 33, 64)
NEW_TOKENS = 32


def _save(tmp_path, config, model_cls) -> str:
    torch.manual_seed(0)
    model = model_cls(config).eval()
    # Larger-than-default weights make the logits peaked, so greedy choices are not decided by rounding noise.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith(".bias"):
                p.normal_(0.0, 0.08)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return str(tmp_path)


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _check(path: str, vocab: int, dense: int = 48) -> None:
    prompts = _prompts(vocab)
    expected, ref_logits = hf_greedy(path, prompts, NEW_TOKENS)
    # A small dense batch forces chunked prefill and mixed decode/prefill batches.
    llm = LLM(path, device="cpu", dtype="float32", dense_batch_size=dense, kv_cache_tokens=4096,
              async_scheduling=True)
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    for o, exp in zip(outs, expected):
        assert o.finish_reason == "length"
        assert o.token_ids == exp
    logits = llm.engine.prompt_logits(prompts[:2])
    for got, ref in zip(logits, ref_logits[:2]):
        assert (got - ref).norm() / ref.norm() < 1e-3


def test_llama3_gqa_rope_scaling(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )
    _check(_save(tmp_path, cfg, transformers.LlamaForCausalLM), 256)


def test_llama2_mha(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
    )
    _check(_save(tmp_path, cfg, transformers.LlamaForCausalLM), 256, dense=40)


def test_qwen2_bias_tied(tmp_path):
    cfg = transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False,
    )
    path = _save(tmp_path, cfg, transformers.Qwen2ForCausalLM)
    _check(path, 256)
