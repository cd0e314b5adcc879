#!/usr/bin/env python3
"""CPU cost of the KV offload worker's copies: staged rows into fresh host buffers vs buffers of the host arena.

The offload worker copies each step's staged K/V rows into per-request host buffers. Into a fresh ``torch.empty``
every 4 KB page is faulted and zeroed on first write; ``HostArena`` maps its memory once and recycles it, so the
worker writes into mapped pages. LLaMA-3-8B KV shape (32 layers, 8 kv heads, 128 dims, bf16): ``--rounds`` rounds of
``--requests`` buffers of ``--tokens`` positions, filled in 256-token chunks and then dropped (arena ranges come back
and are taken again by the next round). Writes ``--out`` (JSON) with GB/s of both.

Then one engine step's copies (``steps``): a decode-heavy step (500 requests x 1 token) and a prefill-heavy one (2 x
1,024 tokens), copied the session-2 way (one thread, torch's intra-op threads) and by ``OffloadWorker.copy`` with 1..N
single-threaded copy threads, with the "engine" thread idle and busy (Python + small matmuls).

    python scripts/bench_host_copy.py --out benchmarks/results/host-copy-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanoflow.bench import git_commit  # noqa: E402
from nanoflow.engine.host_arena import HostArena  # noqa: E402


def fill(bufs: list[torch.Tensor], stage: torch.Tensor, tokens: int, chunk: int = 256) -> float:
    """Seconds to copy ``tokens`` positions into every buffer, chunk by chunk, one foreach copy per chunk."""
    t0 = time.perf_counter()
    for pos in range(0, tokens, chunk):
        n = min(chunk, tokens - pos)
        torch._foreach_copy_([b[:, :, pos:pos + n] for b in bufs], [stage[:, :, :n]] * len(bufs))
    return time.perf_counter() - t0


def step_copies(max_threads: int, repeats: int = 5) -> list[dict]:
    """Median ms and GB/s of one step's worker copies, per way of copying and engine-thread load."""
    import threading

    from nanoflow.engine.host_kv import OffloadWorker, run_copies

    L, H, D = 32, 8, 128
    stage = torch.randn(L, 2, 2048, H, D).to(torch.bfloat16)
    arena = HostArena((500 * 64 + 2 * 1536) * L * 2 * H * D * 2 + (64 << 20), background=False)
    dec = [arena.take((L, 2, 64, H, D), torch.bfloat16) for _ in range(500)]
    pre = [arena.take((L, 2, 1536, H, D), torch.bfloat16) for _ in range(2)]
    jobs = {"decode 500x1": [(b[:, :, 5:6], stage[:, :, i:i + 1]) for i, b in enumerate(dec)],
            "prefill 2x1024": [(pre[0][:, :, :1024], stage[:, :, :1024]), (pre[1][:, :, :1024], stage[:, :, 1024:])]}
    stop = threading.Event()

    def busy() -> None:
        x = torch.randn(64, 64)
        while not stop.is_set():
            for _ in range(50):
                x = (x @ x).tanh_()
            sum(range(2000))

    def old_way(copies) -> None:  # session 2: the worker thread copied with torch's intra-op threads
        t = threading.Thread(target=run_copies, args=(copies,))
        t.start()
        t.join()

    rows = []
    for load in ("idle", "busy"):
        stop.clear()
        engine = threading.Thread(target=busy) if load == "busy" else None
        if engine is not None:
            engine.start()
        ways = [("torch intra-op threads", old_way, None)]
        for k in range(1, max_threads + 1):
            w = OffloadWorker(copy_threads=k)
            ways.append((f"OffloadWorker copy_threads={k}", lambda c, w=w: w.wait(w.submit(lambda: w.copy(c))), w))
        for name, fn, worker in ways:
            for tag, copies in jobs.items():
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn(copies)
                    ts.append(time.perf_counter() - t0)
                med = sorted(ts)[len(ts) // 2]
                nbytes = sum(src.numel() * src.element_size() for _, src in copies)
                rows.append({"engine_thread": load, "way": name, "step": tag, "median_ms": med * 1e3,
                             "GBps": nbytes / med / 1e9})
                print(rows[-1], flush=True)
            if worker is not None:
                worker.close()
        stop.set()
        if engine is not None:
            engine.join()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=8, help="host buffers filled per round")
    ap.add_argument("--tokens", type=int, default=1536, help="positions per buffer (prompt + output)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --requests buffers, each dropped after its round")
    ap.add_argument("--copy-threads", type=int, default=2, help="largest OffloadWorker copy_threads in the step part")
    ap.add_argument("--out", default=None, help="JSON path for the result (default: print only)")
    args = ap.parse_args()
    shape = (32, 2, args.tokens, 8, 128)
    stage = torch.randn(32, 2, 256, 8, 128).to(torch.bfloat16)
    nbytes = args.requests * args.tokens * 32 * 2 * 8 * 128 * 2
    t0 = time.perf_counter()
    arena = HostArena(nbytes + (64 << 20), background=False)  # maps its pages once, here
    t_setup = time.perf_counter() - t0
    rounds: dict[str, list[float]] = {"fresh": [], "arena": []}
    for _ in range(args.rounds):
        for kind in rounds:
            take = (lambda: torch.empty(shape, dtype=torch.bfloat16)) if kind == "fresh" else (
                lambda: arena.take(shape, torch.bfloat16))
            bufs = [take() for _ in range(args.requests)]
            rounds[kind].append(nbytes / fill(bufs, stage, args.tokens) / 1e9)
            del bufs
    stats = arena.stats()
    rec = {"what": "offload worker copies, staged rows -> host buffers (fresh torch.empty vs HostArena ranges)",
           "device": f"CPU ({platform.processor() or platform.machine()})", "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "bytes_per_round": nbytes,
           "arena_setup_s": t_setup,
           "fresh_GBps": rounds["fresh"], "arena_GBps": rounds["arena"],
           "arena_fallbacks": stats["arena_fallbacks"], "arena_peak_in_use": stats["arena_peak_in_use"],
           "steps": step_copies(args.copy_threads),
           "command": "python " + " ".join(sys.argv), "commit": git_commit()}
    print(json.dumps(rec, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
