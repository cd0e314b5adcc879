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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
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
    assert torch.equal(cache.longest_prefix(b).kv.view(torch.uint8), kvb.view(torch.uint8))
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


def _engine(tiny, cls, kv_tokens=2048, async_scheduling=True, pipeline=None, arena_bytes=64 << 20,
            kv_cache_dtype="auto", staging_slots=None, **kw):
    """``arena_bytes``: the offloading engine's host arena (small: the default maps 1 GiB + the KV cache per engine;
    None: that default)."""
    spec, weights, path = tiny
    parts = {"model": model_class(spec.architecture)(spec, weights), "tokenizer": None, "dtype": torch.float32,
             "source": ModelSource(spec, path, "safetensors", "tiny")}
    extra = {} if arena_bytes is None else {"kv_host_arena_bytes": arena_bytes}
    if staging_slots is not None:
        extra["kv_staging_slots"] = staging_slots
    args = EngineArgs(model=path, device="cpu", dtype="float32", dense_batch_size=64, kv_cache_tokens=kv_tokens,
                      async_scheduling=async_scheduling, cuda_graphs=False, compile=False, pipeline=pipeline,
                      kv_cache_dtype=kv_cache_dtype, extra=extra)
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


@pytest.mark.parametrize("simultaneous,async_scheduling,kv_dtype", [
    (True, True, "auto"), (True, False, "auto"), (False, True, "auto"), (False, False, "auto"),
    (True, True, "fp8"), (False, False, "fp8")])  # a float8 cache is saved and reloaded byte for byte too
def test_multiround_reuse_matches_recompute(tiny, async_scheduling, simultaneous, kv_dtype):
    g = torch.Generator().manual_seed(7)
    firsts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (37, 20)]
    turns = [[torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 5)] for _ in firsts]
    plain = _engine(tiny, Engine, async_scheduling=async_scheduling, kv_cache_dtype=kv_dtype)
    want = _conversation(plain, firsts, turns, 10, offloading=False)
    reuse = _engine(tiny, OffloadingEngine, async_scheduling=async_scheduling, simultaneous_offload=simultaneous,
                    kv_cache_dtype=kv_dtype)
    assert reuse.runner.kv_cache.dtype == (torch.float8_e4m3fn if kv_dtype == "fp8" else torch.float32)
    got = _conversation(reuse, firsts, turns, 10, offloading=True)
    assert got == want
    assert reuse.stats_reused_tokens > 0
    assert (reuse.stats_saved_from_host_copy > 0) == simultaneous
    assert reuse.prefill_tokens == plain.prefill_tokens - reuse.stats_reused_tokens
    assert reuse.prefill_tokens < plain.prefill_tokens


def _first_round(tiny):
    """An offloading engine that has served one 40-token prompt of conversation "a" (its KV now stored)."""
    g = torch.Generator().manual_seed(8)
    p = torch.randint(0, VOCAB, (40,), generator=g).tolist()
    engine = _engine(tiny, OffloadingEngine)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = engine.add_request(p, params, conversation_id="a")
    engine.run_until_done()
    return engine, p, first, params


def test_other_conversation_does_not_reuse(tiny):
    engine, p, first, params = _first_round(tiny)
    engine.add_request(p + first.token_ids + [1, 2], params, conversation_id="b")
    engine.run_until_done()
    assert engine.stats_reused_tokens == 0
    engine.add_request(p + first.token_ids + [1, 2], params, conversation_id="a")
    engine.run_until_done()
    assert engine.stats_reused_tokens == 32


def test_prompt_logprobs_compute_the_whole_prompt(tiny):
    """A request asking for prompt logprobs does not load its conversation's KV (those positions would have no
    logprobs); it computes its prompt and gets every logprob, equal to a plain engine's."""
    engine, p, first, _ = _first_round(tiny)
    again = p + first.token_ids + [1, 2]
    with_lp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=0)
    out = engine.add_request(again, with_lp, conversation_id="a")
    engine.run_until_done()
    assert engine.stats_reused_tokens == 0
    plain = _engine(tiny, Engine)
    ref = plain.add_request(again, with_lp)
    plain.run_until_done()
    assert out.prompt_logprobs[0] is None and all(e is not None for e in out.prompt_logprobs[1:])
    assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx([e.logprob for e in ref.prompt_logprobs[1:]],
                                                                         abs=1e-5)


@pytest.mark.parametrize("async_scheduling,kv_dtype", [(False, "auto"), (True, "auto"), (True, "fp8")])
def test_preemption_swaps_instead_of_recomputing(tiny, async_scheduling, kv_dtype):
    g = torch.Generator().manual_seed(9)
    short = [torch.randint(0, VOCAB, (5,), generator=g).tolist() for _ in range(3)]
    long = [torch.randint(0, VOCAB, (20,), generator=g).tolist() for _ in range(4)]

    def run(cls, **kw):
        engine = _engine(tiny, cls, kv_tokens=160, async_scheduling=async_scheduling, kv_cache_dtype=kv_dtype, **kw)
        outs = [engine.add_request(p, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)) for p in short]
        # An unreachable stop id leaves their length unknown to the scheduler: it admits them on the average decode
        # length (1 token, from the short requests), and they outgrow the cache.
        outs += [engine.add_request(p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                      stop_token_ids=[10**9])) for p in long]
        engine.run_until_done()
        return engine, [o.token_ids for o in outs]

    plain, want = run(Engine)
    swap, got = run(OffloadingEngine)
    assert got == want
    assert swap.stats_swapped_out_tokens > 0 and swap.stats_swapped_in_tokens > 0
    assert swap.prefill_tokens < plain.prefill_tokens
    # Swapped-in requests restart their host copies from the swapped KV; what they save equals the gather path's.
    gathered, _ = run(OffloadingEngine, simultaneous_offload=False)
    assert swap.stats_saved_from_host_copy == 4 and gathered.stats_saved_from_host_copy == 0
    assert _entries(swap) == _entries(gathered) and len(_entries(swap)) == 4


# ---- simultaneous offload: host copies grown from the KV staged inside each step ---------------------------------
def _rand(g, n):
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def _entries(engine) -> dict:
    """{(namespace, token ids): KV bytes} of every host-cache entry."""
    with engine.host_cache._lock:
        return {(e.namespace, tuple(e.token_ids)): e.kv.contiguous().view(torch.uint8).numpy().tobytes()
                for e in engine.host_cache._entries.values()}


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_host_copy_equals_pages_after_every_step(tiny, async_scheduling):
    """After every step, each running request's host copy is ``gather_pages`` of its pages, and holds every token
    computed by the steps already processed (async: all but those of the step in flight)."""
    from nanoflow.ops.kv_transfer import gather_pages
    from nanoflow.scheduler.request import RequestStatus

    g = torch.Generator().manual_seed(11)
    engine = _engine(tiny, OffloadingEngine, async_scheduling=async_scheduling)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [_rand(g, n) for n in (5, 30, 100, 47)]  # 100 > the dense batch: a prefill in two chunks
    checked = {"fresh": 0, "seeded": 0}
    for rnd in range(2):  # round 2 reuses round 1's KV: those host copies start from the loaded prefix
        outs = [engine.add_request(p, params, conversation_id=f"c{i}") for i, p in enumerate(prompts)]
        while engine.has_unfinished():
            engine.step()
            inflight = {s.request_id: s.num_tokens for s in engine._inflight[0].seqs} if engine._inflight else {}
            for rid, copy in engine._copies.items():
                req = engine.scheduler.get_request(rid)
                if req is None or req.status is not RequestStatus.RUNNING:
                    continue
                assert copy.num_tokens == req.num_computed_tokens - inflight.get(rid, 0)
                want = gather_pages(engine.runner.kv_cache, req.block_ids, copy.num_tokens)
                assert torch.equal(copy.tensor(copy.num_tokens), want)
                checked["seeded" if rnd else "fresh"] += 1
        prompts = [p + o.token_ids + _rand(g, 3) for p, o in zip(prompts, outs)]
    assert engine.stats_reused_tokens > 0
    assert checked["fresh"] > 20 and checked["seeded"] > 20
    assert not engine._copies  # finished requests leave nothing behind


def _stop_run(tiny, cls, pipeline=None, **kw):
    """Two rounds of four conversations; round 1 ends each request at a stop token its greedy output contains
    (EOS-like finishes: with async scheduling the next step is already in flight), round 2 reuses the KV."""
    g = torch.Generator().manual_seed(12)
    prompts = [_rand(g, n) for n in (21, 40, 90, 17)]
    probe = _engine(tiny, Engine)
    greedy = [probe.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in prompts]
    probe.run_until_done()
    stops = [o.token_ids[5] for o in greedy]
    engine = _engine(tiny, cls, pipeline=pipeline, **kw)
    kw_conv = (lambda i: {"conversation_id": f"c{i}"}) if cls is OffloadingEngine else (lambda i: {})
    answers = []
    for rnd in range(2):
        params = [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[s] if rnd == 0 else None,
                                 ignore_eos=True) for s in stops]
        outs = [engine.add_request(p, sp, **kw_conv(i)) for i, (p, sp) in enumerate(zip(prompts, params))]
        engine.run_until_done()
        answers.append([o.token_ids for o in outs])
        prompts = [p + o.token_ids + _rand(g, 4) for p, o in zip(prompts, outs)]
    assert all(len(a) <= 6 for a in answers[0])  # round 1 did stop at the stop tokens
    return engine, answers


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_saved_entries_equal_the_gather_path(tiny, async_scheduling):
    on, got = _stop_run(tiny, OffloadingEngine, async_scheduling=async_scheduling)
    off, want = _stop_run(tiny, OffloadingEngine, async_scheduling=async_scheduling, simultaneous_offload=False)
    assert got == want
    assert on.stats_saved_from_host_copy == 8 and off.stats_saved_from_host_copy == 0
    assert (on.stats_deferred_saves > 0) == async_scheduling  # stop-token finishes waited for the step in flight
    assert on.stats_reused_tokens == off.stats_reused_tokens > 0
    entries = _entries(on)
    assert len(entries) == 4 and entries == _entries(off)  # byte for byte
    assert not on._copies


def test_pipeline_with_kv_offload_matches_baseline(tiny):
    """A two-nano-batch, two-stream preset gets kv_offload on a third (copy) stream; on the CPU its nano-ops run in
    issue order. Tokens equal the sequential plain engine's, saved KV equals the gather path's."""
    on, got = _stop_run(tiny, OffloadingEngine, pipeline="llama-8b-overlap")
    spec = on.runner.executor.spec
    copies = [n for n in spec.nano_ops if n.op == "kv_offload"]
    assert [(n.lo, n.hi, n.stream) for n in copies] == [(0, 32, 2), (32, 64, 2)] and spec.num_streams == 3
    _, want = _stop_run(tiny, Engine)
    assert got == want
    off, _ = _stop_run(tiny, OffloadingEngine, pipeline="llama-8b-overlap", simultaneous_offload=False)
    assert on.stats_saved_from_host_copy == 8
    assert _entries(on) == _entries(off)


def test_host_kv_copy_grows_rewrites_and_refuses_gaps():
    from nanoflow.engine.host_kv import HostKVCopy

    kv = _kv(40, seed=5)  # [L, 2, 40, H, D]: the reference positions
    copy = HostKVCopy(capacity=8, seed=kv[:, :, :6])
    assert copy.put(6, kv[:, :, 6:20]) and copy.num_tokens == 20  # past the hint: the buffer grows
    assert not copy.put(21, kv[:, :, 21:22]) and copy.num_tokens == 20  # a gap: refused, nothing stored
    assert copy.put(20, kv[:, :, 20:40])
    assert torch.equal(copy.tensor(40), kv) and copy.tensor(40).is_contiguous()
    assert copy.put(10, kv[:, :, 10:12] + 1) and copy.num_tokens == 12  # recomputed rows replace the old ones
    assert torch.equal(copy.tensor(12)[:, :, 10:], kv[:, :, 10:12] + 1)
    with pytest.raises(ValueError, match="holds 12 tokens"):
        copy.tensor(13)


# ---- the offload worker: staged rows copied off the engine thread ---------------------------------------------------
def test_worker_copies_on_several_threads_equal_one_by_one():
    """Large jobs are split by bytes (big copies cut along the layer dimension) over the copy threads; the result
    equals copying each pair in turn, and the copy threads run single-threaded torch ops without changing the
    calling thread's or later threads' settings."""
    import threading

    from nanoflow.engine.host_kv import PARALLEL_BYTES, OffloadWorker, split_copies

    g = torch.Generator().manual_seed(0)
    srcs = [torch.randn(8, 2, n, 4, 32, generator=g) for n in (1, 1, 3, 700, 1200, 2)]
    assert sum(s.numel() * 4 for s in srcs) > PARALLEL_BYTES
    groups = split_copies([(torch.empty_like(s), s) for s in srcs], 3)
    loads = [sum(s.numel() for _, s in grp) for grp in groups]
    assert len(groups) == 3 and max(loads) < 0.5 * sum(loads)  # the two big copies were cut and spread
    dsts = [torch.zeros_like(s) for s in srcs]
    threads_before = torch.get_num_threads()
    worker = OffloadWorker(copy_threads=3)
    try:
        worker.wait(worker.submit(lambda: worker.copy(list(zip(dsts, srcs)))))
        assert worker.copy_threads == 3
    finally:
        worker.close()
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == threads_before and seen == [threads_before]



def _slow_copies(monkeypatch, delay):
    """Make every worker job of the engine take ``delay`` seconds longer (jobs queue up behind the engine)."""
    import time

    from nanoflow.engine import host_kv

    real = host_kv.OffloadWorker.copy

    def slow(self, copies):
        time.sleep(delay)
        real(self, copies)

    monkeypatch.setattr(host_kv.OffloadWorker, "copy", slow)


@pytest.mark.parametrize("async_scheduling,slots", [(True, 2), (True, 3), (False, 3), (True, 5)])
def test_slow_worker_keeps_saves_byte_exact(tiny, monkeypatch, async_scheduling, slots):
    """Worker jobs lag the engine by up to ``slots - 1`` steps (the staging-slot guard holds launches back): tokens,
    saves and reuse are still those of the gather path, byte for byte, whatever the number of staging slots."""
    off, want = _stop_run(tiny, OffloadingEngine, async_scheduling=async_scheduling, simultaneous_offload=False)
    _slow_copies(monkeypatch, 0.03)
    on, got = _stop_run(tiny, OffloadingEngine, async_scheduling=async_scheduling, staging_slots=slots)
    assert on.runner.kv_staging.shape[0] == slots
    assert got == want
    assert on.stats_staging_waits > 0  # launches did wait for the worker to consume their slot
    assert on.stats_saved_from_host_copy == 8 and on.stats_reused_tokens == off.stats_reused_tokens > 0
    assert _entries(on) == _entries(off)
    on.close()
    assert not on._worker.alive


def test_saves_hand_over_the_host_copy_buffer(tiny, monkeypatch):
    """A save stores a slice of the request's host-copy buffer: no copy, no pinned allocation (on the hot path)."""
    from nanoflow.engine.host_kv import HostKVCopy

    pinned = []
    real_empty, real_pin = torch.empty, torch.Tensor.pin_memory

    def empty(*args, **kw):
        if kw.get("pin_memory"):
            pinned.append(args)
        return real_empty(*args, **kw)

    def pin_memory(self, *args, **kw):
        pinned.append(self.shape)
        return real_pin(self, *args, **kw)

    views = {}
    real_view = HostKVCopy.view

    def view(self, n):
        out = real_view(self, n)
        views[out.data_ptr()] = self.buf
        return out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(HostKVCopy, "view", view)
    on, _ = _stop_run(tiny, OffloadingEngine)
    with on.host_cache._lock:
        stored = [e.kv for e in on.host_cache._entries.values()]
    assert len(stored) == 4 and not pinned
    for kv in stored:
        assert kv.data_ptr() in views and kv.untyped_storage().data_ptr() == views[kv.data_ptr()].data_ptr()
        assert not kv.is_pinned()


def test_worker_failure_surfaces_and_close_stops_it(tiny, monkeypatch):
    from nanoflow.engine import host_kv

    def broken(self, copies):
        raise OSError("simulated copy failure")

    monkeypatch.setattr(host_kv.OffloadWorker, "copy", broken)
    engine = _engine(tiny, OffloadingEngine)
    engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    with pytest.raises(RuntimeError, match="offload worker failed") as info:
        engine.run_until_done()
    assert isinstance(info.value.__cause__, OSError)
    engine.close()
    assert not engine._worker.alive


def test_offload_worker_order_wait_and_close():
    import threading

    from nanoflow.engine.host_kv import OffloadWorker, Ticket

    worker = OffloadWorker()
    gate, seen = threading.Event(), []
    first = worker.submit(gate.wait)
    jobs = [worker.submit(lambda i=i: seen.append(i)) for i in range(5)]
    assert jobs == list(range(first + 1, first + 6)) and not worker.done(first)
    gate.set()
    Ticket(worker, jobs[-1]).synchronize()
    assert seen == list(range(5)) and worker.done(jobs[-1])
    worker.submit(lambda: seen.append(5))
    worker.close()  # runs what was queued, then stops
    assert seen == list(range(6)) and not worker.alive
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(lambda: None)


def test_host_arena_recycles_ranges_once_no_tensor_views_them():
    """Ranges come back only when the last view is gone, coalesce, and are handed out again; a request larger than any
    free range falls back to a fresh tensor; a hold keeps a range until its event completes."""
    import gc

    from nanoflow.engine.host_arena import ALIGN, HostArena

    arena = HostArena(8 * ALIGN, background=False)
    a = arena.take((2, 2, 100, 2, 8), torch.bfloat16)  # one ALIGN unit
    b = arena.take((2 * ALIGN,), torch.uint8)  # two units
    assert arena.owns(a) and arena.owns(b) and arena.stats()["arena_in_use"] == 3 * ALIGN
    a.fill_(1.5)
    view = a[:, :, :7]
    del a
    gc.collect()
    assert arena.stats()["arena_in_use"] == 3 * ALIGN  # the slice still views it
    assert torch.all(view == 1.5)
    del view
    assert arena.stats()["arena_in_use"] == 2 * ALIGN
    too_big = arena.take((7 * ALIGN,), torch.uint8)  # 6 units free, in two pieces: fresh memory instead
    assert not arena.owns(too_big) and arena.stats()["arena_fallbacks"] == 1

    class Event:
        done = False

        def query(self):
            return self.done

    ev = Event()
    arena.hold(b, ev)
    del b
    assert arena.stats()["arena_in_use"] == 2 * ALIGN  # held: a copy may still read it
    ev.done = True
    stats = arena.stats()
    assert stats["arena_in_use"] == 0 and stats["arena_peak_in_use"] == 3 * ALIGN
    whole = arena.take((8 * ALIGN,), torch.uint8)  # everything coalesced into one range again
    assert arena.owns(whole)
    arena.close()
    assert not arena.owns(arena.take((4,), torch.float32))  # closed: fresh tensors


def test_host_arena_never_hands_out_a_live_range_twice():
    """Two threads take and drop tensors concurrently (finalizers run in either thread): every live tensor keeps the
    bytes it wrote."""
    import random
    import threading

    from nanoflow.engine.host_arena import ALIGN, HostArena

    arena = HostArena(64 * ALIGN, background=False)
    errors: list[str] = []

    def churn(seed: int) -> None:
        rng = random.Random(seed)
        live: list[tuple[torch.Tensor, int]] = []
        for i in range(400):
            if live and rng.random() < 0.5:
                t, tag = live.pop(rng.randrange(len(live)))
                if not torch.all(t == tag):
                    errors.append(f"thread {seed}: tensor {tag} was overwritten")
            else:
                tag = seed * 1000 + i
                t = arena.take((rng.randrange(1, 3 * ALIGN // 4),), torch.int32)
                t.fill_(tag)
                live.append((t, tag))
        for t, tag in live:
            if not torch.all(t == tag):
                errors.append(f"thread {seed}: tensor {tag} was overwritten")

    threads = [threading.Thread(target=churn, args=(k,)) for k in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    stats = arena.stats()
    assert stats["arena_in_use"] == 0 and stats["arena_taken"] > 0


def test_offloading_engine_keeps_host_kv_in_its_arena(tiny):
    """Host copies and the cache entries made from them live in the engine's arena (pre-faulted memory); with
    ``kv_host_arena_bytes=0`` they are fresh tensors, with the same outputs."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = {}
    for arena_bytes in (None, 0):
        engine = _engine(tiny, OffloadingEngine, arena_bytes=arena_bytes)
        try:
            assert engine.host_arena.wait_ready(30) == (arena_bytes is None)
            got = []
            for i in range(4):
                got.append(engine.add_request([5 + i] * 40, params))
                engine.run_until_done()
            outs[arena_bytes] = [o.token_ids for o in got]
            entries = list(engine.host_cache._entries.values())
            assert len(entries) == 4
            stats = engine.host_arena.stats()
            if arena_bytes is None:
                assert all(engine.host_arena.owns(e.kv) for e in entries)
                assert stats["arena_taken"] >= 4 and stats["arena_fallbacks"] == 0 and stats["arena_in_use"] > 0
            else:
                assert not any(engine.host_arena.owns(e.kv) for e in entries) and stats["arena_taken"] == 0
        finally:
            engine.close()
    assert outs[None] == outs[0]




def test_staging_slots_are_used_in_turn_and_fewer_than_two_are_refused(tiny):
    """Steps write staging slots 0, 1, 2, 0, ... (three by default); one slot cannot work (a step's rows are read
    after the next step is launched) and is refused when the engine is built."""
    from nanoflow.scheduler.batcher import BatchPlan

    engine = _engine(tiny, OffloadingEngine)
    runner = engine.runner
    assert runner.kv_staging.shape[0] == 3
    plan = BatchPlan(0, [], [], 0, 64, [])
    assert [runner.prepare(plan).staging_slot for _ in range(5)] == [0, 1, 2, 0, 1]
    engine.close()
    with pytest.raises(ValueError, match="staging_slots must be >= 2"):
        _engine(tiny, OffloadingEngine, staging_slots=1)
