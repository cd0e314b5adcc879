"""Dense batch size from GPU memory (paper §4.1.1, with the workload statistics p and d of §3.1).

The formula, all per GPU-instance of the model (pass the memory and weights of the whole tensor-parallel group):

    kv_bytes/token  = model_spec.kv_bytes_per_token(elem_bytes=dtype_bytes)
    kv_tokens       = floor((gpu_mem * (1 - activation_reserve) - weight_bytes) / kv_bytes/token), whole blocks
    R (decode reqs) = floor(kv_tokens / (p + d / 2))       a request holds p + d/2 tokens on average in steady state
    prefill/iter    = R * p / d                            R/d requests finish per iteration; each is replaced by p
                                                           prefill tokens, so prefill keeps up with decode
    dense           = R + R * p / d = R * (p + d) / d, rounded down to a multiple of 128, clamped to [256, 8192]

After clamping, ``max_decode_requests`` is the decode share of the dense batch, ``dense * d / (p + d)``, capped by R.

:func:`horizon` and :func:`peak_blocks` are the scheduler's admission prediction: where each request's KV is headed,
and the most KV blocks the running requests hold at once as they grow and finish.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from nanoflow.config import ModelSpec

if TYPE_CHECKING:
    from nanoflow.scheduler.request import Request

DENSE_MULTIPLE = 128  # GEMM-tile friendly; also the profiling grid of auto-search
DENSE_MIN = 256
DENSE_MAX = 8192


class DenseBatchPlan(NamedTuple):
    max_decode_requests: int
    dense_batch_size: int
    kv_tokens: int


def dense_batch_from_memory(
    model_spec: ModelSpec,
    gpu_mem_bytes: int,
    weight_bytes: int,
    avg_prompt: float,
    avg_decode: float,
    dtype_bytes: int = 2,
    block_size: int = 16,
    activation_reserve: float = 0.1,
) -> DenseBatchPlan:
    """Pick the dense batch size that keeps the KV cache full in steady state (formula in the module docstring)."""
    if avg_prompt < 0 or not avg_decode >= 1:
        raise ValueError(f"need avg_prompt >= 0 and avg_decode >= 1 tokens, got {avg_prompt!r} and {avg_decode!r}")
    if not 0.0 <= activation_reserve < 1.0:
        raise ValueError(f"activation_reserve must be a fraction in [0, 1), got {activation_reserve!r}")
    if dtype_bytes < 1 or block_size < 1:
        raise ValueError(f"dtype_bytes and block_size must be >= 1, got {dtype_bytes} and {block_size}")
    kv_per_token = model_spec.kv_bytes_per_token(elem_bytes=dtype_bytes)
    free = gpu_mem_bytes * (1.0 - activation_reserve) - weight_bytes
    kv_tokens = int(free // kv_per_token) // block_size * block_size if free > 0 else 0
    per_request = avg_prompt + avg_decode / 2
    if kv_tokens < max(per_request, block_size):
        gib = 1024**3
        raise ValueError(
            f"{gpu_mem_bytes / gib:.1f} GiB of GPU memory minus {weight_bytes / gib:.1f} GiB of weights and a "
            f"{activation_reserve:.0%} activation reserve leaves room for {kv_tokens:,} KV tokens, less than one "
            f"average request ({per_request:,.0f}); use more GPUs (tensor parallelism) or a smaller model"
        )
    decode_requests = int(kv_tokens // per_request)
    dense = decode_requests * (avg_prompt + avg_decode) / avg_decode
    dense = int(dense // DENSE_MULTIPLE) * DENSE_MULTIPLE
    dense = max(DENSE_MIN, min(DENSE_MAX, dense))
    decode_share = int(dense * avg_decode / (avg_prompt + avg_decode))
    return DenseBatchPlan(max(1, min(decode_requests, decode_share)), dense, kv_tokens)


def steady_prefill_tokens(kv_tokens: int, avg_prompt: float, avg_decode: float) -> float:
    """Prefill tokens an iteration carries in the steady state of the module docstring's formula: ``R * p / d`` with
    ``R = kv_tokens / (p + d / 2)`` requests decoding (each length floored at one token). Admission pacing's rate."""
    p, d = max(avg_prompt, 1.0), max(avg_decode, 1.0)
    return kv_tokens / (p + d / 2) * p / d


def predicted_decode(req: Request, avg: float) -> float:
    """Tokens ``req`` is predicted to generate: ``max_tokens`` when nothing can end it earlier (``ignore_eos`` and no
    stop tokens or strings), else ``min(max_tokens, avg)`` (``avg``: the mean decode length of finished requests)."""
    sp = req.sampling_params
    if sp.ignore_eos and not sp.stop and not sp.stop_token_ids:
        return float(sp.max_tokens)
    return min(float(sp.max_tokens), avg)


def horizon(req: Request, avg: float, len_limit: int) -> tuple[int, int]:
    """``(tokens held once its prefill is done, iterations until it is predicted to finish)`` of ``req``: it ends at
    ``prompt + max(generated, predicted_decode)`` tokens, capped by ``len_limit``."""
    generated = len(req.output_token_ids) + req.num_pending
    held = len(req.prompt_token_ids) + generated
    total = min(len(req.prompt_token_ids) + max(predicted_decode(req, avg), generated), len_limit)
    return held, max(1, math.ceil(total - held))


def peak_blocks(held: list[int], remaining: list[int], block_size: int) -> int:
    """The most KV blocks a set of requests holds at once if request ``i`` holds ``held[i]`` tokens now, grows by one
    token per iteration and frees its blocks after ``remaining[i] >= 1`` more iterations.

    Between two completions the total only grows, so the peak is reached just before one: at ``t = remaining[j] - 1``
    the requests alive are those with ``remaining > t``, holding ``sum(held) + alive * t`` tokens. A request's
    blocks are at most ``(tokens + block_size - 1) // block_size``, which bounds the sum. O(n log n).
    """
    if not held:
        return 0
    r = np.asarray(remaining, dtype=np.int64)
    order = np.argsort(r, kind="stable")
    h = np.asarray(held, dtype=np.int64)[order]
    r = r[order]
    alive = np.arange(len(h), 0, -1, dtype=np.int64)
    tokens = np.cumsum(h[::-1])[::-1] + alive * (r - 1)
    return int(((tokens + alive * (block_size - 1)) // block_size).max())
