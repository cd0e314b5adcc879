"""Host/SSD KV cache (LRU, eviction, checksums, full disk) and KV reuse in the engine, against independent references.

The engine tests compare an :class:`OffloadingEngine` with a plain :class:`Engine` that recomputes every prompt: the
greedy tokens must be identical while the offloading engine prefills fewer tokens (counted from the plans).
"""

from __future__ import annotations

import errno
import logging

import pytest
import torch

from nanoflow.scheduler.offload import HostKVCache

L, H, D, BS = 2, 2, 4, 4


def _kv(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn((L, 2, n, H, D), generator=torch.Generator().manual_seed(seed)).to(dtype)


def _nbytes(n: int) -> int:
    return L * 2 * n * H * D * 4


def _toks(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefix_granularity_and_namespaces():
    cache = HostKVCache(1 << 20, block_size=BS)
    t, kv = _toks(10, 1), _kv(10, 1)
    assert cache.put(t, kv, namespace="c1")
    hit = cache.longest_prefix(t + [5, 6, 7], namespace="c1")
    assert hit.num_tokens == 8 and torch.equal(hit.kv[:, :, :8], kv[:, :, :8])
    assert cache.longest_prefix(t[:7] + [-1] * 5, namespace="c1").num_tokens == 4  # diverges inside block 2
    assert cache.longest_prefix([t[0] + 1] + t[1:], namespace="c1") is None
    assert cache.longest_prefix(t, namespace="c1", max_tokens=7).num_tokens == 4
    assert cache.longest_prefix(t, namespace="other") is None
    assert not cache.put(t[:3], _kv(3, 2))  # shorter than one block: nothing to reuse
    # A longer entry of the same conversation subsumes the shorter one.
    t2 = t + _toks(6, 3)
    assert cache.put(t2, _kv(16, 3), namespace="c1")
    assert cache.stats()["host_entries"] == 1 and cache.longest_prefix(t2, namespace="c1").num_tokens == 16


def test_lru_order_host_only():
    cache = HostKVCache(2 * _nbytes(8), block_size=BS)
    a, b, c = (_toks(8, s) for s in (10, 11, 12))
    cache.put(a, _kv(8, 10))
    cache.put(b, _kv(8, 11))
    assert cache.longest_prefix(a) is not None  # a is now the most recently used
    cache.put(c, _kv(8, 12))
    assert cache.tier_of(b) is None and cache.tier_of(a) == "host" and cache.tier_of(c) == "host"
    assert cache.stats()["dropped"] == 1 and cache.host_bytes == 2 * _nbytes(8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evict_to_ssd_and_back_byte_exact(tmp_path, dtype):
    per = _nbytes(8) // 4 * dtype.itemsize
    cache = HostKVCache(per, tmp_path, ssd_capacity_bytes=10 * per, block_size=BS)
    a, b = _toks(8, 20), _toks(8, 21)
    kva, kvb = _kv(8, 20, dtype), _kv(8, 21, dtype)
    cache.put(a, kva.clone())
    cache.put(b, kvb.clone())
    cache.flush()
    assert cache.tier_of(a) == "disk" and len(list(tmp_path.glob("*.kv"))) == 1
    assert not list(tmp_path.glob("*.tmp*"))
    hit = cache.longest_prefix(a)
    assert hit.num_tokens == 8 and hit.kv.dtype == dtype
    assert torch.equal(hit.kv.view(torch.uint8), kva.view(torch.uint8))
    cache.flush()
    assert cache.tier_of(a) == "host" and cache.tier_of(b) == "disk"  # b was LRU when a came back
    assert torch.equal(cache.longest_prefix(b).kv, kvb)
    assert cache.stats()["ssd_reads"] == 2
    cache.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_corrupt_file_is_a_miss(tmp_path, caplog, damage):
    cache = HostKVCache(_nbytes(8), tmp_path, ssd_capacity_bytes=1 << 20, block_size=BS)
    a = _toks(8, 30)
    cache.put(a, _kv(8, 30))
    cache.put(_toks(8, 31), _kv(8, 31))
    cache.flush()
    (path,) = tmp_path.glob("*.kv")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x40
    elif damage == "truncate":
        data = data[:-7]
    else:
        data[2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="nanoflow"):
        assert cache.longest_prefix(a) is None
    assert "corrupt" in caplog.text
    assert cache.tier_of(a) is None and not path.exists() and cache.stats()["ssd_errors"] == 1
    cache.close()


def test_full_disk_degrades_to_host_only(tmp_path, caplog, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(HostKVCache, "_write_file", staticmethod(no_space))
    cache = HostKVCache(2 * _nbytes(8), tmp_path, ssd_capacity_bytes=1 << 20, block_size=BS)
    toks = [_toks(8, 40 + i) for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="nanoflow"):
        for i, t in enumerate(toks):
            cache.put(t, _kv(8, 40 + i))
            cache.flush()
    assert "host-only" in caplog.text and not cache.ssd_enabled
    assert torch.equal(cache.longest_prefix(toks[-1]).kv, _kv(8, 44))  # the newest still served from host
    assert cache.host_bytes <= cache.capacity_bytes and not list(tmp_path.iterdir())


def test_tiny_ssd_capacity_keeps_lru_on_disk(tmp_path):
    cache = HostKVCache(_nbytes(8), tmp_path, ssd_capacity_bytes=_nbytes(8), block_size=BS)
    toks = [_toks(8, 50 + i) for i in range(3)]
    for i, t in enumerate(toks):
        cache.put(t, _kv(8, 50 + i))
        cache.flush()
    assert [cache.tier_of(t) for t in toks] == [None, "disk", "host"]
    assert cache.stats()["disk_bytes"] == _nbytes(8) and len(list(tmp_path.glob("*.kv"))) == 1
    huge = HostKVCache(_nbytes(8), tmp_path / "h", ssd_capacity_bytes=16, block_size=BS)
    huge.put(toks[0], _kv(8, 50))
    huge.put(toks[1], _kv(8, 51))
    huge.flush()
    assert huge.tier_of(toks[0]) is None and huge.ssd_enabled  # too big for the SSD tier: dropped, not an error
    cache.close()
    huge.close()


# ---- the engine: reuse across rounds and swap on preemption ---------------------------------------------------------
transformers = pytest.importorskip("transformers")

from nanoflow.config import EngineArgs, ModelSpec  # noqa: E402
from nanoflow.engine.builder import ModelSource  # noqa: E402
from nanoflow.engine.engine import Engine  # noqa: E402
from nanoflow.engine.kv_reuse import OffloadingEngine  # noqa: E402
from nanoflow.models.loader import load_weights  # noqa: E402
from nanoflow.models.registry import model_class  # noqa: E402
from nanoflow.scheduler.request import SamplingParams  # noqa: E402

VOCAB = 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-offload")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    spec = ModelSpec.load(path)
    weights = load_weights(spec, path, load_format="safetensors", dtype=torch.float32, device="cpu", progress=False)
    return spec, weights, str(path)


def _engine(tiny, cls, kv_tokens=2048, async_scheduling=True, **kw):
    spec, weights, path = tiny
    parts = {"model": model_class(spec.architecture)(spec, weights), "tokenizer": None, "dtype": torch.float32,
             "source": ModelSource(spec, path, "safetensors", "tiny")}
    args = EngineArgs(model=path, device="cpu", dtype="float32", dense_batch_size=64, kv_cache_tokens=kv_tokens,
                      async_scheduling=async_scheduling, cuda_graphs=False, compile=False)
    engine = cls(args, parts=parts, **kw)
    engine.prefill_tokens = 0

    def count(plan):
        engine.prefill_tokens += plan.num_prefill_tokens

    engine.plan_hook = count
    return engine


def _conversation(engine, firsts, turns, max_tokens, offloading):
    """Run each conversation's rounds; round r+1's prompt = round r's prompt + its answer + a new user turn."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    prompts = [list(p) for p in firsts]
    answers = []
    for r in range(len(turns[0]) + 1):
        kw = [{"conversation_id": f"conv{i}"} if offloading else {} for i in range(len(prompts))]
        outs = [engine.add_request(p, params, **k) for p, k in zip(prompts, kw)]
        engine.run_until_done()
        answers.append([o.token_ids for o in outs])
        if r < len(turns[0]):
            prompts = [p + o.token_ids + t[r] for p, o, t in zip(prompts, outs, turns)]
    return answers


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_multiround_reuse_matches_recompute(tiny, async_scheduling):
    g = torch.Generator().manual_seed(7)
    firsts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (37, 20)]
    turns = [[torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 5)] for _ in firsts]
    plain = _engine(tiny, Engine, async_scheduling=async_scheduling)
    want = _conversation(plain, firsts, turns, 10, offloading=False)
    reuse = _engine(tiny, OffloadingEngine, async_scheduling=async_scheduling)
    got = _conversation(reuse, firsts, turns, 10, offloading=True)
    assert got == want
    assert reuse.stats_reused_tokens > 0
    assert reuse.prefill_tokens == plain.prefill_tokens - reuse.stats_reused_tokens
    assert reuse.prefill_tokens < plain.prefill_tokens


def test_other_conversation_does_not_reuse(tiny):
    g = torch.Generator().manual_seed(8)
    p = torch.randint(0, VOCAB, (40,), generator=g).tolist()
    engine = _engine(tiny, OffloadingEngine)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = engine.add_request(p, params, conversation_id="a")
    engine.run_until_done()
    engine.add_request(p + first.token_ids + [1, 2], params, conversation_id="b")
    engine.run_until_done()
    assert engine.stats_reused_tokens == 0
    engine.add_request(p + first.token_ids + [1, 2], params, conversation_id="a")
    engine.run_until_done()
    assert engine.stats_reused_tokens == 32


def test_preemption_swaps_instead_of_recomputing(tiny):
    g = torch.Generator().manual_seed(9)
    short = [torch.randint(0, VOCAB, (5,), generator=g).tolist() for _ in range(3)]
    long = [torch.randint(0, VOCAB, (20,), generator=g).tolist() for _ in range(4)]

    def run(cls):
        engine = _engine(tiny, cls, kv_tokens=160, async_scheduling=False)
        outs = [engine.add_request(p, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)) for p in short]
        outs += [engine.add_request(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)) for p in long]
        engine.run_until_done()
        return engine, [o.token_ids for o in outs]

    plain, want = run(Engine)
    swap, got = run(OffloadingEngine)
    assert got == want
    assert swap.stats_swapped_out_tokens > 0 and swap.stats_swapped_in_tokens > 0
    assert swap.prefill_tokens < plain.prefill_tokens
