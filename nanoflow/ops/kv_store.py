"""Writing new keys and values into the paged KV cache."""

from __future__ import annotations

import torch


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter ``k, v [T, kv_heads, head_dim]`` to slots ``slot_mapping [T]`` (int64) of the paged caches.

    Padding tokens carry slots inside the reserved null block 0, so the scatter needs no mask and keeps a static
    shape (CUDA-graph friendly).
    """
    kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)
