"""KV offload on a GPU (paper §4.2.2); writes ``$OUT/offload_bench.json``.

Three measurements in one run, in this order, each printed and written to the JSON as soon as it is done (a run cut
short keeps what it measured; ``--deadline-s`` skips what would start too late). Before the engine parts, a short run
checks after every step that each running request's host copy equals its device pages (``host_copy_check``; it also
warms the kernels up, so the first timed engine run does not pay for Triton compiles):

1. bandwidth: loading one request's KV (LLaMA-3-8B shape, bf16, shuffled pages) from pinned host memory as one
   contiguous host->device copy + the Triton scatter, against copying page by page straight into the fragmented
   pages (the paper reports 7-10x); the same load from pageable memory (how the host cache stores entries now:
   ``to_device`` bounces them through a reused pinned block); plus gather + device->host (the offload direction);
2. reuse: multi-round conversations (round r+1's prompt = round r's prompt + the model's answer + a new user turn),
   prefill tokens computed and wall time with and without reuse;
3. throughput cost of offload: the plain ``Engine`` against ``OffloadingEngine`` (saves every finished request's KV to
   host memory) on N requests of 1,024 prompt / 512 output tokens, with simultaneous offload on (every layer's new
   K/V copied to pinned host memory inside the CUDA graph, on a copy stream beside the FFN) and off (KV gathered from
   the pages when a request finishes); under ``--pipeline`` (default: the 8B overlap preset, where the copies get a
   stream of their own; ``none``: the sequential baseline, copies in line on the one stream). The offloading runs
   report how often (and how long) a launch waited for the offload worker to consume its staging slot
   (``stats_staging_waits`` / ``stats_staging_wait_s``).

Every engine captures its CUDA graphs (each token bucket, each staging slot) before its clock starts, so the timed
runs compare serving, not capture. Every offloading engine takes its host buffers from one shared ``HostArena``
(``--arena-gib``, pinned on a GPU), mapped once before the first engine part (its setup time is recorded as
``arena_setup_s``); ``--arena-gib 0`` runs them on fresh pageable buffers (the session-2 behaviour) for comparison.

    python scripts/device/bench_offload.py             # on the GPU machine (about five minutes on an H200)
    python scripts/device/bench_offload.py --dry-run   # tiny shapes on the CPU (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from _cli import parse_script_args


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="llama-3-8b", help="built-in config name (dummy weights) or an HF folder")
    ap.add_argument("--requests", type=int, default=192, help="requests of the 1,024/512 throughput run")
    ap.add_argument("--conversations", type=int, default=32, help="conversations of the multi-round run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per conversation of the multi-round run")
    ap.add_argument("--arena-gib", type=float, default=64.0,
                    help="host arena shared by the offloading engines, GiB (pinned on a GPU; 0: fresh pageable "
                         "buffers)")
    ap.add_argument("--deadline-s", type=float, default=390.0,
                    help="do not start a part or engine run after this many seconds (its entry says skipped)")
    ap.add_argument("--pipeline", default="llama-8b-overlap",
                    help="pipeline preset of the engine runs (none: the sequential baseline)")
    ap.add_argument("--parts", default="bandwidth,host_copy_check,multiround,throughput",
                    help="comma-separated parts to run, in this order (host_copy_check also warms the kernels up)")


OPTS = parse_script_args(__doc__, "offload_bench.json", _args, dry_run_help="tiny shapes and model on the CPU")

import torch  # noqa: E402
from _common import report_header  # noqa: E402

from nanoflow.ops import kv_transfer as kt  # noqa: E402

CUDA = torch.cuda.is_available() and not OPTS.dry_run
DEV = torch.device("cuda" if CUDA else "cpu")
T0 = time.perf_counter()
RESULT: dict = report_header(None if CUDA else "cpu (dry run)")
_MODEL: dict = {}


def _dump() -> None:
    """Write everything measured so far (called after every part and engine run)."""
    path = Path(OPTS.out) / "offload_bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    RESULT["elapsed_s"] = time.perf_counter() - T0
    path.write_text(json.dumps(RESULT, indent=1))


def _late(what: str) -> bool:
    late = time.perf_counter() - T0 > OPTS.deadline_s
    if late:
        print(f"skipping {what}: past --deadline-s {OPTS.deadline_s:.0f}", flush=True)
    return late


def _timed(fn, repeat: int = 10) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, wall clock on the CPU)."""
    fn()
    times = []
    for _ in range(repeat):
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bandwidth() -> list[dict]:
    layers, heads, dim, bs = (32, 8, 128, 16) if CUDA else (2, 2, 8, 4)
    lengths = (512, 2048, 8192) if CUDA else (13,)
    rows = []
    for n in lengths:
        num_blocks = 2 * (-(-n // bs)) + 1
        cache = torch.randn((layers, 2, num_blocks, bs, heads, dim), device=DEV).to(torch.bfloat16)
        table = (torch.randperm(num_blocks - 1) + 1)[: -(-n // bs)].tolist()
        host = kt.gather_pages(cache, table, n).cpu()
        host = host.pin_memory() if CUDA else host
        nbytes = host.numel() * host.element_size()

        def contiguous(cache=cache, host=host, table=table, n=n):
            kt.scatter_pages(cache, kt.to_device(host, DEV), table, n)

        pageable = host.clone() if CUDA else host  # clone() of a pinned tensor is pageable

        def bounced(cache=cache, pageable=pageable, table=table, n=n):
            kt.scatter_pages(cache, kt.to_device(pageable, DEV), table, n)

        def pagewise(cache=cache, host=host, table=table, n=n):
            kt.scatter_pages_pagewise(cache, host, table, n)

        def offload(cache=cache, table=table, n=n):
            _, ev = kt.to_host(kt.gather_pages(cache, table, n))
            if ev is not None:
                ev.synchronize()

        t_c, t_p, t_o, t_b = _timed(contiguous), _timed(pagewise, repeat=3), _timed(offload), _timed(bounced)
        check = torch.zeros_like(cache)
        kt.scatter_pages(check, kt.to_device(host, DEV), table, n)
        rows.append({"tokens": n, "bytes": nbytes, "contiguous_scatter_GBps": nbytes / t_c / 1e9,
                     "pagewise_GBps": nbytes / t_p / 1e9, "speedup": t_p / t_c,
                     "pageable_bounce_scatter_GBps": nbytes / t_b / 1e9, "pageable_is_pinned": pageable.is_pinned(),
                     "gather_d2h_GBps": nbytes / t_o / 1e9,
                     "round_trip_exact": bool(torch.equal(kt.gather_pages(check, table, n).cpu(), host))})
        print(rows[-1], flush=True)
    return rows


def _engine_args():
    from nanoflow.bench.throughput import base_args

    if OPTS.dry_run:
        from nanoflow.config import EngineArgs

        args = EngineArgs(model="smollm2-135m", load_format="dummy", dtype="float32", device="cpu",
                          dense_batch_size=256, kv_cache_tokens=8192, cuda_graphs=False, compile=False)
    else:
        args = base_args(OPTS.model, 2048, 0, None, None)
    return replace(args, pipeline=None if OPTS.pipeline == "none" else OPTS.pipeline)


def _model() -> tuple:
    """(engine args, loaded parts, vocab), loaded once and shared by every engine run."""
    if not _MODEL:
        from nanoflow.engine.builder import load_parts, resolve_device

        args = _engine_args()
        parts = load_parts(args, resolve_device(args.device))
        _MODEL.update(args=args, parts=parts, vocab=parts["model"].spec.vocab_size)
    return _MODEL["args"], _MODEL["parts"], _MODEL["vocab"]


def _host_bytes() -> int:
    return 64 << 30 if CUDA else 1 << 30


_ARENA: list = []


def _arena_bytes() -> int:
    return int(OPTS.arena_gib * 2**30) if CUDA else int(min(OPTS.arena_gib, 1 / 16) * 2**30)  # dry run: 64 MiB


def _arena():
    """The one host arena of every offloading engine in this run (mapped, and pinned on a GPU, on first use)."""
    if not _ARENA:
        from nanoflow.engine.host_arena import HostArena

        t0 = time.perf_counter()
        _ARENA.append(HostArena(_arena_bytes(), pin=CUDA, background=False))
        RESULT["arena_setup_s"] = time.perf_counter() - t0
        RESULT["arena_gib"] = _arena_bytes() / 2**30
        RESULT["arena_error"] = _ARENA[0].error
    return _ARENA[0]


def host_copy_check(args, parts, vocab: int) -> dict:
    """Step by step, each running request's host copy (built from the in-graph staged rows) against its pages."""
    from nanoflow.engine.kv_reuse import OffloadingEngine
    from nanoflow.ops.kv_transfer import gather_pages
    from nanoflow.scheduler.request import RequestStatus, SamplingParams

    engine = OffloadingEngine(args, parts=parts, host_arena=_arena())
    g = torch.Generator().manual_seed(1)
    n_req, p_len = (16, 700) if CUDA else (4, 40)  # every step gathers each request's pages: keep it short
    for i in range(n_req):
        prompt = torch.randint(0, vocab, (p_len + 13 * i,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=24 + i % 7, temperature=0, ignore_eos=True))
    checked = mismatched = 0
    while engine.has_unfinished():
        engine.step()
        inflight = {q.request_id: q.num_tokens for q in engine._inflight[0].seqs} if engine._inflight else {}
        for rid, copy in list(engine._copies.items()):
            req = engine.scheduler.get_request(rid)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue
            pages = gather_pages(engine.runner.kv_cache, req.block_ids, copy.num_tokens).cpu()
            ok = copy.num_tokens == req.num_computed_tokens - inflight.get(rid, 0)
            ok = ok and torch.equal(copy.tensor(copy.num_tokens), pages)
            checked += 1
            mismatched += not ok
    rec = {"checked": checked, "mismatched": mismatched, "saves_from_host_copy": engine.stats_saved_from_host_copy,
           "cuda_graph_replays": engine.runner.graphs.replays if engine.runner.graphs is not None else 0}
    engine.close()
    print({"host_copy_check": rec}, flush=True)
    return rec


def _run(cls, args, parts, batches, **kw) -> dict:
    """Run ``batches`` (a callable producing each wave of (prompt, max_tokens, conversation) from the last answers)."""
    from nanoflow.scheduler.request import SamplingParams

    if cls.__name__ == "OffloadingEngine":
        kw = {**kw, "host_arena": _arena()}
    engine = cls(args, parts=parts, **kw)
    if engine.runner.graphs is not None:  # capture every token bucket (and staging slot) before the clock starts
        engine.runner.graphs.capture_all()
    prefill = [0]
    engine.plan_hook = lambda plan: prefill.__setitem__(0, prefill[0] + plan.num_prefill_tokens)
    answers: list[list[int]] | None = None
    tokens = 0
    t0 = time.perf_counter()
    for wave in batches:
        reqs = wave(answers)
        extra = (lambda c: {"conversation_id": c}) if cls.__name__ == "OffloadingEngine" else (lambda c: {})
        outs = [engine.add_request(p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True), **extra(c))
                for p, m, c in reqs]
        engine.run_until_done()
        answers = [o.token_ids for o in outs]
        tokens += sum(len(p) + len(a) for (p, _, _), a in zip(reqs, answers))
    wall = time.perf_counter() - t0
    rec = {"engine": cls.__name__, "wall_s": wall, "tokens": tokens, "throughput_tok_s": tokens / wall,
           "prefill_tokens_computed": prefill[0]}
    if hasattr(engine, "simultaneous_offload"):
        rec["simultaneous_offload"] = engine.simultaneous_offload
    for k in ("stats_reused_tokens", "stats_saved_tokens", "stats_swapped_out_tokens", "stats_swapped_in_tokens",
              "stats_saved_from_host_copy", "stats_deferred_saves", "stats_staging_waits", "stats_staging_wait_s"):
        if hasattr(engine, k):
            rec[k] = getattr(engine, k)
    if hasattr(engine, "host_cache"):
        rec["host_cache"] = engine.host_cache.stats()
        rec["host_arena"] = engine.host_arena.stats()
    engine.close()
    del engine
    gc.collect()  # the cache's entries give their arena ranges back for the next run
    print(rec, flush=True)
    return rec


def multiround() -> dict:
    """Conversations over several rounds, the plain engine (recomputes every prompt) against KV reuse."""
    from nanoflow.engine.engine import Engine
    from nanoflow.engine.kv_reuse import OffloadingEngine

    args, parts, vocab = _model()
    g = torch.Generator().manual_seed(0)
    n_conv, rounds = (OPTS.conversations, OPTS.rounds) if not OPTS.dry_run else (3, 3)
    lo, hi = (200, 800) if not OPTS.dry_run else (20, 60)
    first = [torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
             for _ in range(n_conv)]
    turn_len = 64 if CUDA else 8
    turns = [[torch.randint(0, vocab, (turn_len,), generator=g).tolist() for _ in range(rounds)]
             for _ in range(n_conv)]
    o_len = 128 if CUDA else 8

    def make_waves():
        state = {"prompts": [list(p) for p in first]}

        def wave_fn(r):
            def wave(answers):
                if answers is not None:
                    state["prompts"] = [p + a + turns[i][r] for i, (p, a) in enumerate(zip(state["prompts"], answers))]
                return [(p, o_len, f"conv{i}") for i, p in enumerate(state["prompts"])]
            return wave

        return [wave_fn(r) for r in range(rounds)]

    out: dict = {"conversations": n_conv, "rounds": rounds, "runs": []}
    RESULT["multiround"] = out
    for cls in (Engine, OffloadingEngine):
        if _late(f"multiround {cls.__name__}"):
            out["runs"].append({"engine": cls.__name__, "skipped": "deadline"})
            continue
        a = replace(args, extra={**args.extra, "kv_host_bytes": _host_bytes()}) if cls is OffloadingEngine else args
        out["runs"].append(_run(cls, a, parts, make_waves()))
        _dump()
    base, reuse = out["runs"]
    if "skipped" not in base and "skipped" not in reuse:
        out["prefill_saved_fraction"] = 1 - reuse["prefill_tokens_computed"] / base["prefill_tokens_computed"]
        out["wall_speedup"] = base["wall_s"] / reuse["wall_s"]
    return out


def throughput() -> dict:
    """Plain / simultaneous offload on / off on the fixed 1,024/512 workload."""
    from nanoflow.engine.engine import Engine
    from nanoflow.engine.kv_reuse import OffloadingEngine

    args, parts, vocab = _model()
    out: dict = {"pipeline": args.pipeline}
    RESULT["throughput"] = out
    g = torch.Generator().manual_seed(0)
    n_req, p_len, o_len = (OPTS.requests, 1024, 512) if not OPTS.dry_run else (4, 64, 16)
    fixed = [(torch.randint(0, vocab, (p_len,), generator=g).tolist(), o_len, None) for _ in range(n_req)]
    out["requests"] = n_req
    out["throughput_1024_512"] = runs = []
    offload_args = replace(args, extra={**args.extra, "kv_host_bytes": _host_bytes()})
    # Untimed warm-up of both engine kinds first: the first engine of a process pays torch.compile of the glue ops
    # inside its run (graphs are captured lazily), 2-3 s that made the first plain run 16-18% slower than the last.
    t_warm = time.perf_counter()
    warm = [(p, 8, None) for p, _, _ in fixed[:8]]
    for cls, a, kw in ((Engine, args, {}), (OffloadingEngine, offload_args, {"simultaneous_offload": True})):
        _run(cls, a, parts, [lambda _: warm], **kw)
    out["warmup_s"] = time.perf_counter() - t_warm
    # The plain engine runs first and last: the offloading runs are compared with the mean of the two, and the two
    # plain runs' spread shows the run-to-run noise.
    for name, cls, a, kw in (("plain", Engine, args, {}),
                             ("simultaneous_on", OffloadingEngine, offload_args, {"simultaneous_offload": True}),
                             ("simultaneous_off", OffloadingEngine, offload_args, {"simultaneous_offload": False}),
                             ("plain_again", Engine, args, {})):
        if _late(f"throughput {name}"):
            runs.append({"run": name, "skipped": "deadline"})
            continue
        runs.append({"run": name, **_run(cls, a, parts, [lambda _: fixed], **kw)})
        plain = [r["throughput_tok_s"] for r in runs if r["run"].startswith("plain") and "throughput_tok_s" in r]
        if plain:
            base = sum(plain) / len(plain)
            out["throughput_vs_plain"] = {r["run"]: r["throughput_tok_s"] / base for r in runs
                                          if "throughput_tok_s" in r and not r["run"].startswith("plain")}
            out["plain_spread"] = (max(plain) - min(plain)) / base
        _dump()
    print({"throughput_vs_plain": out.get("throughput_vs_plain"), "plain_spread": out.get("plain_spread")}, flush=True)
    return out


def main() -> None:
    # The host-copy check also warms up (Triton compiles, autotuning) before anything engine-level is timed.
    chosen = [p.strip() for p in OPTS.parts.split(",") if p.strip()]
    for name, fn in (("bandwidth", bandwidth), ("host_copy_check", lambda: host_copy_check(*_model())),
                     ("multiround", multiround), ("throughput", throughput)):
        if name not in chosen:
            continue
        if _late(name):
            RESULT[name + "_skipped"] = "deadline"
            continue
        try:
            RESULT[name] = fn()
        except Exception:  # keep what the other parts measured
            RESULT[name + "_error"] = traceback.format_exc()
            print(RESULT[name + "_error"], file=sys.stderr, flush=True)
        _dump()
        print(f"[{time.perf_counter() - T0:.0f} s] {name} done", flush=True)
    print(f"wrote {Path(OPTS.out) / 'offload_bench.json'}")


if __name__ == "__main__":
    main()
