"""Writing new keys and values into the paged KV cache."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn  # the float8 KV-cache element type (EngineArgs.kv_cache_dtype="fp8")
FP8_MAX = torch.finfo(FP8).max


def round_like_cache(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float8 e4m3 the way :func:`store_kv` stores it (clamped, unit scale), in ``x``'s dtype."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8).to(x.dtype)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter ``k, v [T, kv_heads, head_dim]`` to slots ``slot_mapping [T]`` (int64) of the paged caches.

    Padding tokens carry slots inside the reserved null block 0, so the scatter needs no mask and keeps a static
    shape (CUDA-graph friendly). A float8 cache stores ``k, v`` rounded to float8 e4m3 with unit scale.
    """
    kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    for new, cache in ((k, k_cache), (v, v_cache)):
        if cache.dtype == FP8:
            # Round to float8 e4m3 (unit scale; clamped, as e4m3fn has no infinity) and scatter the bytes: torch has
            # no index_copy_ for float8.
            new = new.clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
            cache = cache.view(torch.uint8)
        cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, new)
