"""Sizing the KV cache by measurement: ``gpu_memory_utilization``, as vLLM's option of that name.

The engine may hold ``utilization * total`` bytes of the GPU. Everything but the KV cache (weights, activation
buffers, the CUDA graphs' shared pool, cuBLAS/Triton workspaces, what the caching allocator keeps, the CUDA context,
and whatever other processes hold) is measured, not estimated: a probe engine with a small cache captures every
CUDA-graph bucket and serves requests shaped to reach the engine's peaks (a dense batch full of prefill, a long
prompt's chunked prefill over its own context, a decode step of ``max_num_seqs`` rows). Then

    kv_bytes = utilization * total - (in use after the probe - the probe's own cache)

and the probe is closed before the real engine is built with that many tokens. The probe costs one more graph
capture (the compiled glue and Triton kernels are cached by then, so the real engine's capture is the quick one).

Without ``gpu_memory_utilization`` the engine keeps its estimate (``builder.kv_capacity_tokens``: 0.9 of the free
memory, less the activation buffers and 2 GiB).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from nanoflow.config import ConfigError, EngineArgs

log = logging.getLogger("nanoflow")

GiB = 2**30
MemoryInfo = Callable[[torch.device], tuple[int, int]]
"""``(in_use_bytes, total_bytes)`` of a device; ``in_use`` includes the allocator's peak reservation."""


def cuda_memory_info(device: torch.device) -> tuple[int, int]:
    """Bytes in use on ``device`` (by anyone: ``total - free``, plus what this process's allocator reserved at its
    peak and has given back since) and its total."""
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    released = torch.cuda.max_memory_reserved(device) - torch.cuda.memory_reserved(device)
    return total - free + max(0, released), total


@dataclass(frozen=True)
class MemoryProfile:
    """What the probe measured and the KV cache it leads to (bytes; :meth:`summary` in GiB for logs and records)."""

    utilization: float
    total_bytes: int
    in_use_bytes: int  # after the probe, its own cache included
    probe_kv_bytes: int
    kv_bytes: int
    kv_tokens: int
    probe_s: float

    @property
    def non_kv_bytes(self) -> int:
        return self.in_use_bytes - self.probe_kv_bytes

    def summary(self) -> dict[str, float]:
        out = {k: round(v / GiB, 3) if k.endswith("_bytes") else v for k, v in asdict(self).items()}
        out["non_kv_bytes"] = round(self.non_kv_bytes / GiB, 3)
        return {k.replace("_bytes", "_gib"): v for k, v in out.items()}


def kv_budget(utilization: float, total: int, in_use: int, probe_kv_bytes: int, per_token: int,
              min_tokens: int) -> tuple[int, int]:
    """``(kv_bytes, kv_tokens)`` the utilization leaves; ConfigError when that is under ``min_tokens``."""
    non_kv = in_use - probe_kv_bytes
    kv_bytes = int(utilization * total) - non_kv
    tokens = max(kv_bytes, 0) // per_token
    if tokens < min_tokens:
        raise ConfigError(
            f"gpu_memory_utilization {utilization} allows {utilization * total / GiB:.1f} of the GPU's "
            f"{total / GiB:.1f} GiB, but the engine holds {non_kv / GiB:.1f} GiB without its KV cache (weights, "
            f"activations, CUDA graphs{', other processes' if non_kv > 0 else ''}), which leaves room for "
            f"{tokens} KV tokens, fewer than the {min_tokens} one full dense batch and one longest request need. "
            "Raise --gpu-memory-utilization, shorten --max-model-len or --dense-batch-size, or use --tp")
    return kv_bytes, tokens


def probe_requests(dense: int, max_seqs: int, max_len: int, vocab: int,
                   seed: int = 0) -> list[tuple[list[int], int]]:
    """``(prompt ids, max_tokens)`` that take an engine to its peaks: ``max_seqs`` short prompts (together at least
    one full dense batch of prefill, then one decode step of ``max_seqs`` rows) and one long prompt (chunked prefill
    over its own growing context)."""
    rng = random.Random(seed)
    short = max(1, math.ceil(dense / max_seqs))
    if short + 2 > max_len:
        raise ConfigError(f"max_model_len {max_len} is too short for a probe of {max_seqs} requests filling a "
                          f"{dense}-token batch; raise --max-model-len or --max-num-seqs")
    reqs = [([rng.randrange(vocab) for _ in range(short)], 2) for _ in range(max_seqs)]
    long = min(max_len - 2, dense + dense // 2)
    reqs.append(([rng.randrange(vocab) for _ in range(long)], 2))
    return reqs


def probe_kv_tokens(reqs: list[tuple[list[int], int]], block_size: int, dense: int) -> int:
    """A cache that holds every probe request at once (whole pages), plus one dense batch of slack."""
    return sum(math.ceil((len(ids) + n) / block_size) * block_size for ids, n in reqs) + dense


def profile_kv_cache(args: EngineArgs, parts: dict[str, Any], device: torch.device,
                     memory_info: MemoryInfo = cuda_memory_info) -> MemoryProfile:
    """Build a probe engine, run it to its peaks, measure, close it; the KV cache ``args`` can have.

    ``args.gpu_memory_utilization`` must be set. ``memory_info`` is injectable so the arithmetic and the probe's
    requests are testable without a GPU.
    """
    import time

    from nanoflow.engine.builder import kv_token_bytes
    from nanoflow.engine.engine import Engine
    from nanoflow.scheduler.request import SamplingParams

    util = args.gpu_memory_utilization
    if util is None:
        raise ConfigError("profile_kv_cache needs gpu_memory_utilization")
    t0 = time.perf_counter()
    spec = parts["model"].spec
    dense = args.dense_batch_size or (2048 if device.type == "cuda" else 256)
    max_len = min(args.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
    max_seqs = args.max_num_seqs or min(dense, 1024)
    reqs = probe_requests(dense, max_seqs, max_len, spec.vocab_size, args.seed)
    probe_tokens = probe_kv_tokens(reqs, args.block_size, dense)
    per_token = kv_token_bytes(args, parts, device)
    probe_args = replace(args, kv_cache_tokens=probe_tokens, gpu_memory_utilization=None, dense_batch_size=dense)
    log.info("gpu_memory_utilization %.3f: probing with a %d-token KV cache (%d requests) ...", util, probe_tokens,
             len(reqs))
    if device.type == "cuda":  # the allocator's peak from here on only: loading the weights may have peaked higher
        torch.cuda.reset_peak_memory_stats(device)
    engine = Engine(probe_args, parts=parts)
    try:
        engine.capture_all()
        for ids, n in reqs:
            engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        engine.run_until_done()
        in_use, total = memory_info(device)
        cache = engine.runner.kv_cache
        probe_kv = cache.numel() * cache.element_size()
    finally:
        engine.close()
    min_tokens = dense + max_len
    kv_bytes, tokens = kv_budget(util, total, in_use, probe_kv, per_token, min_tokens)
    prof = MemoryProfile(util, total, in_use, probe_kv, kv_bytes, tokens, time.perf_counter() - t0)
    log.info("memory profile: %.1f GiB of %.1f GiB in use without the KV cache; at utilization %.3f the cache gets "
             "%.1f GiB = %d tokens (probe %.1f s)", prof.non_kv_bytes / GiB, total / GiB, util, kv_bytes / GiB,
             tokens, prof.probe_s)
    return prof


def memory_summary(device: torch.device, kv_cache: torch.Tensor | None) -> dict[str, float]:
    """GiB in use on ``device`` now (anyone's), this process's peak reservation and allocation since the last
    ``torch.cuda.reset_peak_memory_stats``, the KV cache's size, and the total: what a run left unused, for
    choosing ``gpu_memory_utilization`` or ``--kv-fraction`` next time."""
    free, total = torch.cuda.mem_get_info(device)
    kv = 0 if kv_cache is None else kv_cache.numel() * kv_cache.element_size()
    return {"total_gib": round(total / GiB, 3), "in_use_gib": round((total - free) / GiB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GiB, 3),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GiB, 3),
            "kv_cache_gib": round(kv / GiB, 3)}
