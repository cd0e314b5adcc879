"""Engine behaviour on a tiny model: bad requests fail alone, async == sync, tight KV gives lone-run tokens,
sampling is reproducible per request, and configuration errors say what to change."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import save_tiny_llama  # noqa: E402

from nanoflow import LLM, SamplingParams  # noqa: E402
from nanoflow.config import ConfigError, EngineArgs, ModelSpec  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _prompts(n: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 128, (int(k),), generator=g).tolist() for k in torch.randint(3, 60, (n,), generator=g)]


def _llm(path: str, **kw) -> LLM:
    base = dict(device="cpu", dtype="float32", dense_batch_size=64, kv_cache_tokens=4096)
    base.update(kw)
    return LLM(path, **base)


def test_bad_requests_fail_alone(tiny_path):
    llm = _llm(tiny_path, max_model_len=100)
    good = _prompts(3)
    prompts = [good[0], [i % 128 for i in range(150)], good[1], [5, 999], "text but no tokenizer", good[2], []]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    reasons = [o.finish_reason for o in outs]
    assert reasons == ["length", "error", "length", "error", "error", "length", "error"]
    assert "150" in outs[1].error and "100" in outs[1].error
    assert "999" in outs[3].error
    assert "token-id" in outs[4].error
    assert all(len(outs[i].token_ids) == 5 for i in (0, 2, 5))


def test_async_equals_sync_and_tight_kv_equals_lone_runs(tiny_path):
    prompts = _prompts(8)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    lone = []
    solo = _llm(tiny_path, async_scheduling=False)
    for p in prompts:
        lone.append(solo.generate([p], params, use_tqdm=False)[0].token_ids)
    sync = _llm(tiny_path, async_scheduling=False).generate(prompts, params, use_tqdm=False)
    asyn = _llm(tiny_path, async_scheduling=True).generate(prompts, params, use_tqdm=False)
    # 16-token dense batches and room for ~3 requests: chunked prefill, requests admitted as others finish.
    tight = _llm(tiny_path, dense_batch_size=16, kv_cache_tokens=240).generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in sync] == lone
    assert [o.token_ids for o in asyn] == lone
    assert [o.token_ids for o in tight] == lone


def test_engine_freezes_its_long_lived_objects_out_of_the_gc(tiny_path):
    import gc

    gc.unfreeze()
    llm = _llm(tiny_path)
    built = gc.get_freeze_count()
    assert built > 1000  # modules, weights, compiled glue: no full GC pass walks them during serving
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = llm.generate(_prompts(2), params, use_tqdm=False)
    assert llm.engine.freeze_gc() >= built  # again after the first steps (what they compiled or captured)
    assert [o.token_ids for o in llm.generate(_prompts(2), params, use_tqdm=False)] == [o.token_ids for o in first]
    # A batch of FREEZE_MIN_REQUESTS or more: the queued requests are frozen too (their prompt lists are the bulk of
    # what a full collection would walk during the run), and the outputs are unchanged by it.
    from nanoflow.engine.llm import FREEZE_MIN_REQUESTS

    many = _prompts(2) + _prompts(FREEZE_MIN_REQUESTS - 2)
    before = gc.get_freeze_count()
    seen = []
    run = llm.engine.run_until_done
    llm.engine.run_until_done = lambda *a: (seen.append(gc.get_freeze_count()), run(*a))[1]
    outs = llm.generate(many, params, use_tqdm=False)
    assert seen and seen[0] >= before + FREEZE_MIN_REQUESTS  # at least one tracked object per queued request
    assert [o.token_ids for o in outs[:2]] == [o.token_ids for o in first]  # same prompts first: same tokens
    llm.shutdown()  # closing hands the frozen objects back, so cycles through the closed engine can be collected
    assert gc.get_freeze_count() == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_path):
    prompts = _prompts(4)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=100 + i, ignore_eos=True)
              for i in range(4)]
    llm = _llm(tiny_path)
    together = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], [sp], use_tqdm=False)[0].token_ids for p, sp in zip(prompts, params)]
    assert together == alone
    other_seed = llm.generate([prompts[0]], [SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True)],
                              use_tqdm=False)[0].token_ids
    assert other_seed != together[0]


def test_eos_stops_and_is_reported(tiny_path):
    llm = _llm(tiny_path)
    prompt = _prompts(1)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    eos = free.token_ids[3]
    stopped = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[eos]),
                           use_tqdm=False)[0]
    first = free.token_ids.index(eos)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]  # never the token after the stop (async scheduling)


def test_configuration_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="supported: .*LlamaForCausalLM"):
        ModelSpec.from_hf_config({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "hidden_size": 8,
                                  "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        EngineArgs(dtype="int8")
    with pytest.raises(ConfigError, match="neither a folder"):
        LLM(str(tmp_path / "missing-model"), device="cpu")
    with pytest.raises(ConfigError, match="known:"):
        ModelSpec.load("llama-9-400b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        LLM(str(tmp_path / "empty"), device="cpu")
