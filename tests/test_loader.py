"""Weight loading checked against Hugging Face transformers holding the same files.

Tiny random LLaMA (GQA), Qwen2 (bias, tied embeddings) and Mixtral checkpoints are written with ``save_pretrained``
and every NanoFlow tensor is compared with slices of the HF model's state dict; the SmolLM2 GGUF is compared with the
model transformers dequantizes from the same file (which proves the rotary row un-permutation).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nanoflow.config import ConfigError, ModelSpec
from nanoflow.models.loader import WeightLoadError, expected_shapes, load_weights, shard_layout

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=90, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _save(model: torch.nn.Module, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**TINY, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    return _save(model, tmp_path_factory.mktemp("llama")), model.state_dict()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg)
    for name, p in model.named_parameters():  # HF initialises biases to zero; make them tell q, k, v apart
        if name.endswith("bias"):
            p.data.normal_()
    return _save(model, tmp_path_factory.mktemp("qwen2")), model.state_dict()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(2)
    cfg = transformers.MixtralConfig(**TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(cfg)
    return _save(model, tmp_path_factory.mktemp("mixtral")), model.state_dict()


def _reference(spec: ModelSpec, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NanoFlow's fused tensors written out by hand from a HF state dict."""
    ref = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not spec.tie_word_embeddings:
        ref["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(spec.num_layers):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        attn = [sd[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"]
        ref[n + "qkv.weight"] = torch.cat(attn)
        if spec.attention_bias:
            ref[n + "qkv.bias"] = torch.cat([sd[f"{p}self_attn.{x}_proj.bias"] for x in "qkv"])
        ref[n + "o_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        ref[n + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        ref[n + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        if spec.is_moe:  # transformers 5 holds experts fused in memory: gate_up_proj = cat(w1, w3) per expert
            ref[n + "router.weight"] = sd[p + "mlp.gate.weight"]
            ref[n + "experts.w13"] = sd[p + "mlp.experts.gate_up_proj"]
            ref[n + "experts.w2"] = sd[p + "mlp.experts.down_proj"]
        else:
            ref[n + "gate_up.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
            ref[n + "down.weight"] = sd[p + "mlp.down_proj.weight"]
    return ref


def _assert_equal(weights: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(weights) == set(ref)
    for name, want in ref.items():
        assert weights[name].dtype == torch.float32
        torch.testing.assert_close(weights[name], want, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fixture", ["llama", "qwen2", "mixtral"])
def test_safetensors_matches_hf(fixture: str, request: pytest.FixtureRequest) -> None:
    folder, sd = request.getfixturevalue(fixture)
    spec = ModelSpec.load(folder)
    weights = load_weights(spec, folder, dtype=torch.float32, progress=False)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected_shapes(spec)
    _assert_equal(weights, _reference(spec, sd))


def test_sharded_checkpoint_and_bf16(llama: tuple[Path, dict], tmp_path: Path) -> None:
    folder, sd = llama
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    _save(model, tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    spec = ModelSpec.load(tmp_path)
    _assert_equal(load_weights(spec, tmp_path, dtype=torch.float32, progress=False), _reference(spec, sd))
    bf16 = load_weights(spec, tmp_path, progress=False)
    assert bf16["layers.1.qkv.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(bf16["layers.1.qkv.weight"], _reference(spec, sd)["layers.1.qkv.weight"].bfloat16())


def test_mixtral_fused_expert_layout(mixtral: tuple[Path, dict], tmp_path: Path) -> None:
    folder, sd = mixtral
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    spec = ModelSpec.load(tmp_path)
    _assert_equal(load_weights(spec, tmp_path, dtype="float32", progress=False), _reference(spec, sd))


# ---- tensor parallelism --------------------------------------------------------------------------------------
def _unshard(spec: ModelSpec, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rebuild full tensors from per-rank shards, splitting each fused shard into its parts first."""
    tp = len(shards)
    lays = [shard_layout(spec, r, tp) for r in range(tp)]
    kv_owner = [r for r in range(tp) if r == 0 or lays[r].kv_head_start != lays[r - 1].kv_head_start]
    full: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        if name.endswith(("qkv.weight", "qkv.bias")):
            lq, lkv = lays[0].num_heads * spec.head_dim, lays[0].num_kv_heads * spec.head_dim
            split = [p.split([lq, lkv, lkv]) for p in parts]
            q = torch.cat([s[0] for s in split])
            k = torch.cat([split[r][1] for r in kv_owner])
            v = torch.cat([split[r][2] for r in kv_owner])
            full[name] = torch.cat([q, k, v])
        elif name.endswith(("gate_up.weight", "experts.w13")):
            dim = parts[0].dim() - 2
            halves = [p.chunk(2, dim=dim) for p in parts]
            gate, up = (torch.cat([h[j] for h in halves], dim) for j in (0, 1))
            full[name] = torch.cat([gate, up], dim)
        elif name.endswith(("o_proj.weight", "down.weight", "experts.w2")):
            full[name] = torch.cat(parts, dim=-1)
        elif name in ("embed.weight", "lm_head.weight"):
            padded = torch.cat(parts)
            assert not padded[spec.vocab_size :].any(), "vocab padding rows must be zero"
            full[name] = padded[: spec.vocab_size]
        else:
            assert all(torch.equal(p, parts[0]) for p in parts), f"{name} must be replicated"
            full[name] = parts[0]
    return full


@pytest.mark.parametrize(("fixture", "tp"), [("llama", 2), ("llama", 4), ("qwen2", 2), ("mixtral", 2)])
def test_tensor_parallel_shards_rebuild_full(fixture: str, tp: int, request: pytest.FixtureRequest) -> None:
    folder, sd = request.getfixturevalue(fixture)
    spec = ModelSpec.load(folder)
    shards = [load_weights(spec, folder, dtype=torch.float32, tp_rank=r, tp_size=tp, progress=False) for r in range(tp)]
    for s in shards:
        assert {k: tuple(v.shape) for k, v in s.items()} == expected_shapes(spec, tp_size=tp)
    if tp == 4:  # 90 rows over 4 ranks: padded to 92; 2 KV heads over 4 ranks: each replicated on 2 ranks
        assert shards[0]["embed.weight"].shape[0] == 23
        assert shard_layout(spec, 3, 4).kv_head_start == 1
    _assert_equal(_unshard(spec, shards), _reference(spec, sd))


def test_known_shapes_llama3_8b_tp() -> None:
    spec = ModelSpec.load("llama-3-8b")
    assert expected_shapes(spec)["layers.0.qkv.weight"] == (6144, 4096)
    assert expected_shapes(spec)["layers.31.gate_up.weight"] == (28672, 4096)
    shapes = expected_shapes(spec, tp_size=8)
    assert shapes["layers.0.qkv.weight"] == (512 + 2 * 128, 4096)
    assert shapes["layers.0.o_proj.weight"] == (4096, 512)
    assert shapes["layers.0.down.weight"] == (4096, 1792)
    assert shapes["embed.weight"] == (128256 // 8, 4096)
    with pytest.raises(ConfigError, match="heads"):
        expected_shapes(spec, tp_size=3)


# ---- dummy ----------------------------------------------------------------------------------------------------
def test_dummy_weights_shapes_determinism_and_stats() -> None:
    spec = ModelSpec.load("llama-3-8b").replace(
        num_layers=2, vocab_size=1001, hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=768
    )
    a = load_weights(spec, None, load_format="dummy", seed=3, progress=False)
    b = load_weights(spec, None, load_format="dummy", seed=3, progress=False)
    c = load_weights(spec, None, load_format="dummy", seed=4, progress=False)
    assert {k: tuple(v.shape) for k, v in a.items()} == expected_shapes(spec)
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.qkv.weight"], c["layers.0.qkv.weight"])
    assert torch.all(a["layers.0.attn_norm.weight"] == 1) and torch.all(a["norm.weight"] == 1)
    assert abs(a["layers.0.gate_up.weight"].float().std().item() - 0.02) < 0.001
    shard = load_weights(spec, None, load_format="dummy", tp_rank=1, tp_size=2, dtype="float16", progress=False)
    assert {k: tuple(v.shape) for k, v in shard.items()} == expected_shapes(spec, tp_size=2)
    assert shard["embed.weight"].dtype == torch.float16
    assert not shard["embed.weight"][500:].any() and shard["embed.weight"][:500].any()  # row 1001 is padding


# ---- errors ---------------------------------------------------------------------------------------------------
def test_missing_and_empty_folders(tmp_path: Path, llama: tuple[Path, dict]) -> None:
    spec = ModelSpec.load(llama[0])
    with pytest.raises(WeightLoadError, match="does not exist"):
        load_weights(spec, tmp_path / "nope", load_format="safetensors")
    with pytest.raises(WeightLoadError, match=r"model\.safetensors"):
        load_weights(spec, tmp_path)
    with pytest.raises(WeightLoadError, match="dummy"):
        load_weights(spec, None)
    with pytest.raises(WeightLoadError, match="needs a weight source"):
        load_weights(spec, None, load_format="safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    with pytest.raises(WeightLoadError, match="model-1.safetensors"):
        load_weights(spec, tmp_path, load_format="safetensors")


def _rewrite(folder: Path, dest: Path, edit) -> Path:
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors")
    return dest


def test_missing_extra_and_misshapen_tensors(tmp_path: Path, llama: tuple[Path, dict]) -> None:
    folder, _ = llama
    spec = ModelSpec.load(folder)
    missing = _rewrite(folder, tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*layers\.1\.qkv"):
        load_weights(spec, missing, progress=False)
    extra = _rewrite(folder, tmp_path, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(2)}))
    with pytest.raises(WeightLoadError, match=r"unexpected tensor model\.layers\.0\.mystery\.weight"):
        load_weights(spec, extra, progress=False)
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    harmless = _rewrite(folder, tmp_path, lambda t: t.update(inv_freq))
    assert "norm.weight" in load_weights(spec, harmless, dtype=torch.float32, progress=False)
    with pytest.raises(WeightLoadError, match=r"mlp\.gate_proj\.weight has shape \[48, 32\], expected \[64, 32\]"):
        load_weights(spec.replace(intermediate_size=64), folder, progress=False)


def test_unsupported_dtype(llama: tuple[Path, dict]) -> None:
    spec = ModelSpec.load(llama[0])
    for bad in (torch.int8, "float64"):
        with pytest.raises(WeightLoadError, match="not supported; use one of float32, bfloat16, float16"):
            load_weights(spec, llama[0], dtype=bad)
    with pytest.raises(WeightLoadError, match="load_format"):
        load_weights(spec, llama[0], load_format="pickle")


# ---- GGUF (SmolLM2-135M-Instruct Q4_1) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_path() -> Path:
    pytest.importorskip("gguf")
    from nanoflow.models.gguf_loader import default_gguf_path

    try:
        return default_gguf_path()
    except WeightLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def gguf_spec(gguf_path: Path) -> ModelSpec:
    from nanoflow.models.gguf_loader import spec_from_gguf

    return spec_from_gguf(gguf_path)


def test_spec_from_gguf_matches_smollm2(gguf_spec: ModelSpec) -> None:
    s = gguf_spec
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads) == (576, 30, 9, 3)
    assert (s.intermediate_size, s.vocab_size, s.head_dim, s.rope_theta) == (1536, 49152, 64, 100000.0)
    assert s.tie_word_embeddings and s.architecture == "LlamaForCausalLM"
    assert (s.bos_token_id, s.eos_token_ids, s.rms_norm_eps, s.max_position_embeddings) == (1, (2,), 1e-5, 8192)
    assert s.replace(name="smollm2-135m") == ModelSpec.load("smollm2-135m")


def test_gguf_weights_match_transformers(gguf_path: Path, gguf_spec: ModelSpec) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    sd = hf.state_dict()
    weights = load_weights(gguf_spec, gguf_path, dtype=torch.float32, progress=False)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected_shapes(gguf_spec)
    ref = _reference(gguf_spec, sd)
    keep = ("embed.weight", "norm.weight", "layers.0.", "layers.1.", "layers.29.")
    pick = lambda d: {k: v for k, v in d.items() if k.startswith(keep)}  # noqa: E731
    _assert_equal(pick(weights), pick(ref))
