"""The paged-attention contract and its plain-torch oracle.

Layout (fixed by :class:`nanoflow.config.CacheSpec`): one layer's ``k_cache`` and ``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` of a sequence lives at page
``block_tables[row, t // block_size]``, offset ``t % block_size``. Block 0 is the null page that padding tokens write
to; it never holds a valid position of a real sequence. Query and output are ``[tokens, num_heads, head_dim]``; query
head ``h`` reads kv head ``h // (num_heads // num_kv_heads)`` (GQA).

This module holds the shape checks every kernel wrapper applies at its boundary (host metadata only: no device
tensor is read, so the wrappers stay CUDA-graph safe) and the reference implementations, which gather pages on the
host side and compute in float64. The references read lengths with ``.tolist()``; they are oracles, not kernels.
"""

from __future__ import annotations

import math

import torch

from nanoflow.ops.kv_store import FP8

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AttentionInputError(ValueError):
    """Tensors handed to an attention op that break the layout contract; the message says what to change."""


def check_qo(q: torch.Tensor, out: torch.Tensor) -> None:
    """``q`` and ``out``: ``[tokens, num_heads, head_dim]``, same shape/dtype/device, unit stride on ``head_dim``."""
    if q.dim() != 3:
        raise AttentionInputError(f"q must be [tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if out.shape != q.shape:
        raise AttentionInputError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise AttentionInputError(f"q dtype {q.dtype} is not supported; use float32, bfloat16 or float16")
    if out.dtype != q.dtype:
        raise AttentionInputError(f"out dtype {out.dtype} differs from q dtype {q.dtype}; allocate out like q")
    if out.device != q.device:
        raise AttentionInputError(f"out is on {out.device} but q is on {q.device}")
    for name, t in (("q", q), ("out", out)):
        if t.shape[2] > 1 and t.stride(2) != 1:
            raise AttentionInputError(
                f"{name} must be contiguous along head_dim (stride 1), got strides {t.stride()}; "
                f"row and head strides may be arbitrary, so slice before reshaping rather than after"
            )


def check_kv_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    """Check one layer's paged cache against ``q``; return ``(block_size, group)`` with group = heads per kv head."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise AttentionInputError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, FP8):
        raise AttentionInputError(
            f"KV cache dtypes ({k_cache.dtype}, {v_cache.dtype}) must both be q's dtype {q.dtype} or float8_e4m3fn"
        )
    if k_cache.device != q.device or v_cache.device != q.device:
        raise AttentionInputError(f"KV cache is on {k_cache.device}/{v_cache.device} but q is on {q.device}")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise AttentionInputError(f"q head_dim {q.shape[2]} differs from the cache's head_dim {head_dim}")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise AttentionInputError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    if block_size <= 0 or block_size & (block_size - 1):
        raise AttentionInputError(f"block_size must be a positive power of two, got {block_size}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise AttentionInputError(
            f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads} (grouped-query attention)"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(3) != 1:
            raise AttentionInputError(f"{name} must be contiguous along head_dim, got strides {t.stride()}")
    return block_size, num_heads // num_kv_heads


def check_index(name: str, t: torch.Tensor, rows: int, device: torch.device, ndim: int = 1) -> None:
    """An int32 metadata tensor (lengths, offsets, block tables) with ``rows`` rows and a unit last stride."""
    if t.dtype != torch.int32:
        raise AttentionInputError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != ndim or t.shape[0] != rows:
        want = f"[{rows}]" if ndim == 1 else f"[{rows}, max_blocks]"
        raise AttentionInputError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.device != device:
        raise AttentionInputError(f"{name} is on {t.device} but q is on {device}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise AttentionInputError(f"{name} must be contiguous along its last dim, got strides {t.stride()}")


def _gather_kv(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from its pages: ``[length, num_kv_heads, head_dim]``."""
    block_size = cache.shape[1]
    pages = table_row[: math.ceil(length / block_size)].long()
    return cache[pages].reshape(-1, cache.shape[2], cache.shape[3])[:length]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, first_pos: int) -> torch.Tensor:
    """Causal attention in float64: query ``i`` sits at position ``first_pos + i`` and sees keys ``0..pos``."""
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    q_pos = first_pos + torch.arange(q.shape[0], device=q.device)[:, None]
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v64)


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Float64 oracle for :func:`decode_attention`: row ``n`` attends all ``seq_lens[n]`` cached tokens.

    Returns ``[N, num_heads, head_dim]`` float64; rows with ``seq_lens[n] == 0`` are zero (the kernel leaves them
    untouched, so compare only the rows it owns).
    """
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for n, length in enumerate(seq_lens.tolist()):
        if length <= 0:
            continue
        k = _gather_kv(k_cache, block_tables[n], length)
        v = _gather_kv(v_cache, block_tables[n], length)
        out[n] = _attend(q[n : n + 1], k, v, scale, first_pos=length - 1)[0]
    return out


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    ctx_len: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Float64 oracle for :func:`prefill_attention` (causal extend attention over paged context).

    Segment ``s`` owns query rows ``q_start[s] : q_start[s] + q_len[s]``; query ``i`` sits at position
    ``ctx_len[s] + i`` and attends keys ``0 .. ctx_len[s] + i`` read from the segment's pages. Returns a float64
    tensor shaped like ``q``; rows no segment owns are zero.
    """
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for s, (start, length, ctx) in enumerate(zip(q_start.tolist(), q_len.tolist(), ctx_len.tolist(), strict=True)):
        if length <= 0:
            continue
        k = _gather_kv(k_cache, block_tables[s], ctx + length)
        v = _gather_kv(v_cache, block_tables[s], ctx + length)
        out[start : start + length] = _attend(q[start : start + length], k, v, scale, first_pos=ctx)
    return out
