"""Mixtral (sparse MoE) on the CPU: routing, the expert sort, the MoE block and whole-model greedy decoding.

References are independent of the code under test: routing against a float64 softmax/top-k/renormalise written out
here, the expert sort against ``torch.argsort(stable=True)``, the MoE block against the float64 loop-over-experts
:func:`moe_reference`, and the whole model against Hugging Face transformers' ``MixtralForCausalLM`` with the same
saved weights (greedy tokens equal, fp32 last-token logits within 1e-3). The Triton kernel itself is tested in
``test_grouped_gemm.py``; on the CPU the model runs the torch loop over experts.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import hf_greedy

from nanoflow.config import ModelSpec
from nanoflow.models.loader import load_weights
from nanoflow.models.mixtral import MixtralForCausalLM
from nanoflow.ops import moe

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (5, 17, 33, 64)
NEW_TOKENS = 24


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


# ---- routing and sorting -----------------------------------------------------------------------------------
def test_route_matches_hf_order():
    """softmax over all experts (fp32), top-k, renormalise: the weights equal a softmax over the chosen logits."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=gen) * 3
    weights, experts = moe.route(logits, 2)
    ref_ids = torch.sort(logits.double(), dim=-1, descending=True).indices[:, :2]
    assert torch.equal(experts, ref_ids)
    chosen = logits.double().gather(1, ref_ids)
    ref_w = torch.exp(chosen - chosen.max(-1, keepdim=True).values)
    ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights.double(), ref_w, atol=1e-6)
    with pytest.raises(moe.MoEInputError, match="top_k"):
        moe.route(logits, 9)


@pytest.mark.parametrize("num_experts", [1, 4, 8])
def test_sort_by_expert_is_a_stable_counting_sort(num_experts: int):
    gen = torch.Generator().manual_seed(num_experts)
    for tokens in (0, 1, 37):
        experts = torch.randint(0, max(1, num_experts // 2), (tokens, 2), generator=gen)  # some experts get none
        flat = experts.reshape(-1)
        got = moe.sort_by_expert(experts, num_experts)
        assert torch.equal(got.order, torch.argsort(flat, stable=True))
        counts = torch.bincount(flat, minlength=num_experts)
        assert got.offsets.dtype == torch.int32
        assert got.offsets.tolist() == [0, *counts.cumsum(0).tolist()]
        assert torch.equal(got.order[got.position], torch.arange(flat.numel()))


# ---- the MoE block -----------------------------------------------------------------------------------------
def _moe_weights(gen: torch.Generator, h: int, inter: int, e: int) -> tuple[torch.Tensor, ...]:
    router = torch.randn(e, h, generator=gen)
    w13 = torch.randn(e, 2 * inter, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, inter, generator=gen) / inter**0.5
    return router, w13, w2


def _scratch(rows: int, h: int, inter: int, dtype: torch.dtype = torch.float32) -> moe.MoEScratch:
    return moe.MoEScratch(*(torch.empty(rows, w, dtype=dtype) for w in (h, 2 * inter, inter, h)))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_experts_forward_matches_float64_reference(dtype: torch.dtype, tol: float):
    gen = torch.Generator().manual_seed(3)
    t, h, inter, e, k = 41, 32, 24, 6, 2
    router, w13, w2 = _moe_weights(gen, h, inter, e)
    x = torch.randn(t, h, generator=gen)
    xd, w13d, w2d = x.to(dtype), w13.to(dtype), w2.to(dtype)
    weights, experts = moe.route((xd @ router.to(dtype).t()).float(), k)
    out = torch.empty(t, h, dtype=dtype)
    moe.experts_forward(xd, weights, experts, w13d, w2d, out, _scratch(t * k, h, inter, dtype))
    # The reference routes in float64 from the same (rounded) inputs; check it picked the same experts.
    ref = moe.moe_reference(xd, router.to(dtype), w13d, w2d, k, dtype=torch.float64)
    assert torch.equal(torch.topk(xd.double() @ router.to(dtype).double().t(), k).indices, experts)
    assert rel_err(out, ref) < tol


def test_tensor_parallel_shards_sum_to_the_full_block():
    """Slices of every expert's intermediate dim (the loader's TP layout) give partial sums that add up."""
    gen = torch.Generator().manual_seed(4)
    t, h, inter, e, k, tp = 13, 16, 24, 4, 2, 2
    router, w13, w2 = _moe_weights(gen, h, inter, e)
    x = torch.randn(t, h, generator=gen)
    weights, experts = moe.route(x @ router.t(), k)
    total = torch.zeros(t, h)
    li = inter // tp
    for r in range(tp):
        rows = slice(r * li, (r + 1) * li)
        w13_r = torch.cat([w13[:, :inter][:, rows], w13[:, inter:][:, rows]], dim=1)
        part = torch.empty(t, h)
        moe.experts_forward(x, weights, experts, w13_r, w2[:, :, rows].contiguous(), part, _scratch(t * k, h, li))
        total += part
    assert rel_err(total, moe.moe_reference(x, router, w13, w2, k, dtype=torch.float64)) < 1e-5


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_moe_ops_are_nano_batch_safe(backend: str):
    """router + experts over split token ranges equal one call over all rows, and write nothing outside (with the
    grouped GEMM's loop off the GPU, and with ``torch._grouped_mm``, whose results are fresh tensors)."""
    spec = ModelSpec.from_hf_config(dict(
        architectures=["MixtralForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=24,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2))
    model = MixtralForCausalLM(spec, load_weights(spec, None, load_format="dummy", dtype="float32", progress=False))
    graph = model.graphs[0]
    assert graph.names[-3:] == ["ffn_norm", "router", "experts"]
    t = 37

    def run(ranges: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        bufs = {n: torch.full((t + 3, b.width), float("nan"), dtype=b.dtype or torch.float32)
                if (b.dtype or torch.float32).is_floating_point else torch.zeros(t + 3, b.width, dtype=b.dtype)
                for n, b in model.buffer_specs().items()}
        bufs["x_ffn"][:t] = torch.randn(t, spec.hidden_size, generator=torch.Generator().manual_seed(6)) * 3
        ctx = type("Ctx", (), {"bufs": bufs, "glue": {}, "moe_backend": backend})()
        for name in ("router", "experts"):
            for lo, hi in ranges:
                graph.op(name).run(ctx, lo, hi)
        return bufs

    whole, split = run([(0, t)]), run([(0, 16), (16, 21), (21, t)])
    # Equal up to rounding (CPU GEMMs block differently for different row counts); same routing exactly.
    assert torch.equal(whole["topk_ids"][:t], split["topk_ids"][:t])
    assert rel_err(split["hidden"][:t], whole["hidden"][:t]) < 1e-6
    assert split["hidden"][t:].isnan().all()
    w = model.weights
    ref = moe.moe_reference(whole["x_ffn"][:t], w["layers.0.router.weight"], w["layers.0.experts.w13"],
                            w["layers.0.experts.w2"], 2, dtype=torch.float64)
    assert rel_err(whole["hidden"][:t], ref) < 1e-5


# ---- the whole model against transformers --------------------------------------------------------------------
def _save_tiny(tmp_path) -> str:
    cfg = transformers.MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=False, sliding_window=None,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    # Larger-than-default weights make logits (and router choices) peaked, so rounding noise decides nothing.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return str(tmp_path)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[list[int]], list, list]:
    path = _save_tiny(tmp_path_factory.mktemp("mixtral"))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENS]
    expected, ref_logits = hf_greedy(path, prompts, NEW_TOKENS)
    return path, prompts, expected, ref_logits


def _generate(llm, prompts: list[list[int]]) -> list[list[int]]:
    from nanoflow import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    assert all(o.finish_reason == "length" for o in outs)
    return [o.token_ids for o in outs]


def test_greedy_matches_transformers(tiny_mixtral):
    from nanoflow import LLM

    path, prompts, expected, ref_logits = tiny_mixtral
    # A small dense batch forces chunked prefill and mixed decode/prefill batches.
    llm = LLM(path, device="cpu", dtype="float32", dense_batch_size=48, kv_cache_tokens=4096)
    assert _generate(llm, prompts) == expected
    for got, ref in zip(llm.engine.prompt_logits(prompts[:2]), ref_logits[:2]):
        assert rel_err(got, ref) < 1e-3


def test_greedy_matches_transformers_with_nano_batches(tiny_mixtral, tmp_path):
    """Three nano-batches per op (the executor splits router and experts too): the same tokens."""
    from nanoflow import LLM
    from nanoflow.graphs.pipeline import PipelineSpec

    path, prompts, expected, _ = tiny_mixtral
    spec = ModelSpec.load(path)
    graph = MixtralForCausalLM(spec, load_weights(spec, path, dtype="float32", progress=False)).graphs[0]
    pipe = tmp_path / "three.json"
    PipelineSpec.nano_batch_only(graph, 48, 3).save(pipe)
    llm = LLM(path, device="cpu", dtype="float32", dense_batch_size=48, kv_cache_tokens=4096, pipeline=str(pipe))
    assert _generate(llm, prompts) == expected


@pytest.mark.parametrize("preset", ["mixtral-overlap", "mixtral-split-experts", "mixtral-decode-split"])
def test_greedy_matches_transformers_with_the_overlap_presets(tiny_mixtral, preset):
    """The shipped Mixtral overlap presets (two nano-batches, decode attention on its own stream; run in issue order
    on the CPU) validate on the MoE layer graph and give the same tokens."""
    from nanoflow import LLM

    path, prompts, expected, _ = tiny_mixtral
    llm = LLM(path, device="cpu", dtype="float32", dense_batch_size=64, kv_cache_tokens=4096, pipeline=preset)
    assert llm.engine.runner.executor.spec.name == preset
    assert _generate(llm, prompts) == expected


@pytest.mark.parametrize("pipeline", ["preset", "auto"])
def test_the_default_pipelines_pick_the_moe_preset(tiny_mixtral, tmp_path, monkeypatch, pipeline):
    """'preset', and 'auto' with no searched spec cached, run mixtral-overlap on a Mixtral (not the dense model's
    preset, whose FFN ops the MoE layer does not have) and keep transformers' tokens."""
    from nanoflow import LLM

    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path / "empty-cache"))
    path, prompts, expected, _ = tiny_mixtral
    llm = LLM(path, device="cpu", dtype="float32", dense_batch_size=64, kv_cache_tokens=4096, pipeline=pipeline)
    assert llm.engine.runner.executor.spec.name == "mixtral-overlap"
    assert _generate(llm, prompts) == expected


def test_mixtral_overlap_keeps_the_experts_whole(tiny_mixtral):
    """mixtral-overlap: one experts nano-op over every row (the expert weights are read once a layer), and decode
    attention of nano-batch 0 runs beside nano-batch 1's attention side, never beside the experts."""
    from nanoflow.graphs.pipeline import load_preset

    path, *_ = tiny_mixtral
    spec = ModelSpec.load(path)
    graph = MixtralForCausalLM(spec, load_weights(spec, path, dtype="float32", progress=False)).graphs[0]
    preset = load_preset("mixtral-overlap")
    preset.validate(graph)
    assert [(n.lo, n.hi) for n in preset.nano_ops if n.op == "experts"] == [(0, 2048)]
    pairs, _ = preset.concurrency(graph)
    labels = [n.label for n in preset.nano_ops]
    dec = labels.index("decode_attn[0:1024)")
    partners = {labels[j if i == dec else i] for i, j, _ in pairs if dec in (i, j)}
    assert {"qkv[1024:2048)", "prefill_attn[0:1024)", "o_proj[1024:2048)", "router[1024:2048)"} <= partners
    assert not partners & {"experts[0:2048)", "o_proj[0:1024)", "router[0:1024)"}


def test_mixtral_decode_split_runs_the_two_nano_batches_side_by_side(tiny_mixtral):
    """mixtral-decode-split: every op of the decode rows (stream 1) may run beside every op of the prefill rows
    (stream 0) but the prefill rows' attention, which reads the KV the decode rows' rope_kv wrote."""
    from nanoflow.graphs.pipeline import load_preset

    path, *_ = tiny_mixtral
    spec = ModelSpec.load(path)
    graph = MixtralForCausalLM(spec, load_weights(spec, path, dtype="float32", progress=False)).graphs[0]
    preset = load_preset("mixtral-decode-split")
    preset.validate(graph)
    labels = [n.label for n in preset.nano_ops]
    pairs, _ = preset.concurrency(graph)
    concurrent = {frozenset((labels[i], labels[j])) for i, j, _ in pairs}
    assert frozenset(("experts[0:640)", "experts[640:2048)")) in concurrent
    assert frozenset(("decode_attn[0:640)", "experts[640:2048)")) in concurrent
    deps = preset.dependencies(graph)
    assert labels.index("rope_kv[0:640)") in deps[labels.index("prefill_attn[640:2048)")]


def test_search_plans_the_moe_layer_and_its_plans_keep_the_tokens(tiny_mixtral, tmp_path, monkeypatch, capsys):
    """`nanoflow search` on a Mixtral: the router and the experts are profiled and planned like any COMPUTE op; the
    saved spec validates on the MoE layer graph, and both it and the stage II plan generate transformers' tokens."""
    import json

    from nanoflow import LLM
    from nanoflow.cli import main
    from nanoflow.config import EngineArgs
    from nanoflow.engine.engine import Engine
    from nanoflow.graphs.pipeline import PipelineSpec
    from nanoflow.search.problem import problem_from_graph
    from nanoflow.search.profiler import profile_ops
    from nanoflow.search.stage1 import solve_stage1
    from nanoflow.search.stage2 import solve_stage2

    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path / "cache"))
    path, prompts, expected, _ = tiny_mixtral
    engine = Engine(EngineArgs(model=path, device="cpu", dtype="float32", dense_batch_size=64, kv_cache_tokens=4096))
    graph = engine.model.graphs[0]
    profile = profile_ops(engine, [16, 32, 48, 64], decode_rows=8, ctx=40, chunk=32, reps=1,
                          path=tmp_path / "profile.json")
    assert {"router", "experts"} <= set(profile["ops"]) and set(profile["ops"]) == set(graph.names)
    out = tmp_path / "searched.json"
    assert main(["search", "--model", path, "--profile", str(tmp_path / "profile.json"), "--dense-batch", "64",
                 "--step", "16", "--time-limit", "10", "--max-split", "2", "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["spec"] == str(out)
    PipelineSpec.load(out).validate(graph)
    problem = problem_from_graph(graph, 64, profile)
    s2 = solve_stage2(problem, solve_stage1(problem, max_split=2, time_limit_s=10), time_limit_s=10)
    s2.spec.validate(graph)
    stage2 = tmp_path / "stage2.json"
    s2.spec.save(stage2)
    for spec_path in (out, stage2):
        llm = LLM(path, device="cpu", dtype="float32", dense_batch_size=64, kv_cache_tokens=4096,
                  pipeline=str(spec_path))
        assert _generate(llm, prompts) == expected


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_each_engine_keeps_its_own_moe_backend(tiny_mixtral, monkeypatch: pytest.MonkeyPatch):
    """Two engines in one process with different ``moe_backend``: each one's expert GEMMs run its own backend, also
    after the other was built (the backend travels in the step context, not in a module setting)."""
    from nanoflow import LLM

    path, prompts, expected, _ = tiny_mixtral
    calls: list[str] = []
    torch_mm, loop_mm = moe.grouped_mm_torch, moe.grouped_mm_reference
    monkeypatch.setattr(moe, "grouped_mm_torch", lambda *a, **k: calls.append("torch") or torch_mm(*a, **k))
    monkeypatch.setattr(moe, "grouped_mm_reference", lambda *a, **k: calls.append("loop") or loop_mm(*a, **k))
    kw = dict(device="cpu", dtype="float32", dense_batch_size=48, kv_cache_tokens=4096)
    with_torch = LLM(path, moe_backend="torch", **kw)
    with_loop = LLM(path, moe_backend="triton", **kw)  # Triton's grouped GEMM runs as the torch loop off the GPU
    for llm, name in ((with_torch, "torch"), (with_loop, "loop"), (with_torch, "torch")):
        calls.clear()
        assert _generate(llm, prompts[:2]) == expected[:2]
        assert calls and set(calls) == {name}
