"""``kv_cache_dtype="fp8"``: the engine keeps K/V in float8 e4m3 and generates what transformers generates when its
attention sees float8-rounded keys and values (the reference: transformers' SDPA attention with K/V rounded to
float8 e4m3 and back before every call, in a greedy loop of full forwards)."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import save_tiny_llama

from nanoflow import LLM, SamplingParams
from nanoflow.config import ConfigError, EngineArgs, ModelSpec
from nanoflow.engine.builder import kv_bytes_per_token, resolve_kv_dtype
from nanoflow.ops.kv_store import store_kv

transformers = pytest.importorskip("transformers")
FP8 = torch.float8_e4m3fn
NEW_TOKENS = 10


def _round_fp8(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(-448, 448).to(FP8).to(t.dtype)


def _hf_fp8_kv(path: str, prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def fp8_kv_attention(module, query, key, value, *args, **kwargs):
        return sdpa_attention_forward(module, query, _round_fp8(key), _round_fp8(value), *args, **kwargs)

    AttentionInterface.register("fp8_kv_reference", fp8_kv_attention)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="fp8_kv_reference").eval()
    outs, logits = [], []
    with torch.no_grad():  # a full forward per token: every step attends the rounded K/V of all tokens so far
        for p in prompts:
            logits.append(model(torch.tensor([p])).logits[0, -1])
            new: list[int] = []
            for _ in range(NEW_TOKENS):
                new.append(int(model(torch.tensor([p + new])).logits[0, -1].argmax()))
            outs.append(new)
    return outs, torch.stack(logits)


def test_fp8_cache_generates_what_transformers_does_on_fp8_rounded_kv(tmp_path) -> None:
    # Keys and values of magnitude ~5-20 so that float8 rounding really changes the logits.
    path = save_tiny_llama(tmp_path / "m", std=0.35, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2)
    rng = random.Random(0)
    prompts = [[rng.randrange(128) for _ in range(rng.randrange(3, 40))] for _ in range(5)]
    ref_tokens, ref_logits = _hf_fp8_kv(path, prompts)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    with LLM(path, device="cpu", kv_cache_dtype="fp8", dense_batch_size=256) as llm:
        assert llm.engine.runner.kv_cache.dtype == FP8
        got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        fp8_logits = llm.engine.prompt_logits(prompts)
    with LLM(path, device="cpu", dense_batch_size=256) as llm:
        full_logits = llm.engine.prompt_logits(prompts)
    assert got == ref_tokens
    torch.testing.assert_close(fp8_logits, ref_logits, atol=2e-4, rtol=2e-4)
    # the float8 path is really taken: its logits differ from the full-precision cache's by far more than noise
    assert (fp8_logits - full_logits).abs().max() > 1e-2


def test_store_kv_rounds_into_a_float8_cache() -> None:
    k, v = torch.randn(5, 2, 16) * 100, torch.randn(5, 2, 16)
    k[0, 0, 0] = 1e4  # beyond float8 e4m3's range: clamped to 448, not NaN
    kc, vc = torch.zeros(4, 8, 2, 16, dtype=FP8), torch.zeros(4, 8, 2, 16, dtype=FP8)
    slots = torch.tensor([9, 10, 11, 30, 8])
    store_kv(k, v, kc, vc, slots)
    torch.testing.assert_close(kc.view(-1, 2, 16)[slots].float(), _round_fp8(k), atol=0, rtol=0)
    torch.testing.assert_close(vc.view(-1, 2, 16)[slots].float(), _round_fp8(v), atol=0, rtol=0)
    assert kc.view(-1, 2, 16)[9, 0, 0].float() == 448.0


def test_fp8_halves_the_bytes_per_token_and_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec.load("llama-3-70b")
    assert kv_bytes_per_token(spec, 4, FP8) * 2 == kv_bytes_per_token(spec, 4, torch.bfloat16) == 2 * 80 * 4 * 128 * 2
    with pytest.raises(ConfigError, match="kv_cache_dtype 'int4' is not supported"):
        EngineArgs(kv_cache_dtype="int4")
    assert resolve_kv_dtype("auto", torch.bfloat16, torch.device("cpu")) is torch.bfloat16
    assert resolve_kv_dtype("fp8", torch.float32, torch.device("cpu")) is FP8
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match="compute capability 8.9 or newer; NVIDIA A100-SXM4-80GB is 8.0"):
        resolve_kv_dtype("fp8", torch.bfloat16, torch.device("cuda"))


def test_decode_tile_default_follows_the_cache_dtype_and_grid() -> None:
    """On a GPU a float8 cache gets 2-warp, 64-token, 3-stage decode tiles on the full grid and 4-warp 128-token ones
    on a bounded grid (each measured fastest on an H200), bf16 keeps 64 tokens and 4 warps; the interpreter keeps 16
    tokens for both, so the tests' tiny shapes still cross tiles."""
    from nanoflow.ops.attention.decode import _default_tiles

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _default_tiles(cuda, 128, 1) == (64, 2, 3) and _default_tiles(cuda, 128, 2) == (64, 4, 2)
    assert _default_tiles(cuda, 128, 1, bounded=True) == (128, 4, 2)
    assert _default_tiles(cuda, 256, 1)[0] == _default_tiles(cuda, 256, 2)[0] == 32
    assert _default_tiles(cpu, 128, 1)[0] == _default_tiles(cpu, 128, 2)[0] == 16
