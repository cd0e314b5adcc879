#!/usr/bin/env python3
"""CPU cost of the KV offload worker's copies: staged rows into fresh host buffers vs pre-faulted ones.

The offload worker copies each step's staged K/V rows into per-request host buffers. Into a fresh ``torch.empty``
every 4 KB page is faulted and zeroed on first write; ``HostBufferReserve`` prepares buffers in the background so
the worker writes into mapped pages. LLaMA-3-8B KV shape (32 layers, 8 kv heads, 128 dims, bf16): ``--requests``
buffers of ``--tokens`` positions, filled in 256-token chunks. Writes ``--out`` (JSON) with GB/s of both.

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
from nanoflow.engine.host_kv import HostBufferReserve  # noqa: E402


def fill(bufs: list[torch.Tensor], stage: torch.Tensor, tokens: int, chunk: int = 256) -> float:
    """Seconds to copy ``tokens`` positions into every buffer, chunk by chunk, one foreach copy per chunk."""
    t0 = time.perf_counter()
    for pos in range(0, tokens, chunk):
        n = min(chunk, tokens - pos)
        torch._foreach_copy_([b[:, :, pos:pos + n] for b in bufs], [stage[:, :, :n]] * len(bufs))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=8, help="host buffers filled per measurement")
    ap.add_argument("--tokens", type=int, default=1536, help="positions per buffer (prompt + output)")
    ap.add_argument("--out", default=None, help="JSON path for the result (default: print only)")
    args = ap.parse_args()
    shape = (32, 2, args.tokens, 8, 128)
    stage = torch.randn(32, 2, 256, 8, 128).to(torch.bfloat16)
    nbytes = args.requests * args.tokens * 32 * 2 * 8 * 128 * 2
    fresh = [torch.empty(shape, dtype=torch.bfloat16) for _ in range(args.requests)]
    t_fresh = fill(fresh, stage, args.tokens)
    del fresh
    reserve = HostBufferReserve(depth=args.requests, classes=1)
    reserve.take(shape, torch.bfloat16)  # asks for the class; the thread prepares `depth` buffers
    key = reserve.key(shape, torch.bfloat16)
    while len(reserve._ready.get(key, ())) < args.requests:
        time.sleep(0.05)
    ready = [reserve.take(shape, torch.bfloat16) for _ in range(args.requests)]
    t_ready = fill(ready, stage, args.tokens)
    reserve.close()
    rec = {"what": "offload worker copies, staged rows -> host buffers", "device": f"CPU ({platform.processor()})",
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "bytes": nbytes, "fresh_GBps": nbytes / t_fresh / 1e9, "prefaulted_GBps": nbytes / t_ready / 1e9,
           "command": "python " + " ".join(sys.argv), "commit": git_commit()}
    print(json.dumps(rec, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
