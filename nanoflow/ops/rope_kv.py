"""RoPE and the paged-KV write in one Triton kernel (the ``rope_kv`` op on a GPU).

The unfused path (:func:`nanoflow.models.layers.rope_qkv_into` then :func:`nanoflow.ops.kv_store.store_kv`) runs six
to eight kernels per layer: the cos/sin gather, the compiled rotation, the float8 rounding written back into the
QKV rows, the float8 cast and two ``index_copy_`` scatters. On an H100 they took 3.6 ms of a 60 ms LLaMA-3-8B step
with a float8 cache (benchmarks/results/2026-12-07-s13-bench-fp8kv-modes-profile-h100-llama3-8b.json, top kernels).
Here one program per token reads its QKV row once and writes everything the unfused path writes:

- the rotated q into ``q_out``;
- the rotated k back into the QKV rows' k columns (prefill attention reads the chunk's own keys there), and v as
  it is; under a float8 cache both rounded as the cache holds them, so the chunk attends what it would read back;
- k and v into the cache at the token's slot (float8: clamped to +-448 and rounded to nearest, unit scale).

The arithmetic is the unfused eager path's: fp32 rotation ``x1 * cos - x2 * sin`` / ``x2 * cos + x1 * sin`` (compiled
without fused multiply-adds, so each product is rounded as torch rounds it), rounded to the model dtype, then (float8
cache) clamped and rounded to nearest e4m3, so on a GPU the results are meant to equal the eager path's bit for
bit (tests/test_rope_kv_gpu.py; shown on an H100 for a bf16 cache, benchmarks/results/*-s14-test-rope-kv-gpu-h100.log);
the CPU interpreter narrows floats its own way (tests/test_rope_kv.py says how).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoflow.ops.kv_store import FP8, FP8_MAX


@triton.jit
def _rotate(row, cols, mask, half: tl.constexpr, cos, sin, out_ty: tl.constexpr):
    """Load the two halves of each head at ``row + cols`` and rotate them (fp32), rounded to ``out_ty``."""
    x1 = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + cols + half, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    return o1.to(out_ty), o2.to(out_ty)


@triton.jit
def _like_cache(x, lim: tl.constexpr, cache_ty: tl.constexpr):
    """``x`` as the cache will hold it: clamped to +-``lim`` and rounded to ``cache_ty`` (float8 e4m3), or, with
    ``lim`` 0 (a cache of the model's dtype), unchanged. One return (Triton wants one type from a helper)."""
    return tl.clamp(x.to(tl.float32), -lim, lim).to(cache_ty) if lim > 0 else x.to(cache_ty)


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, q_ptr, k_cache_ptr, v_cache_ptr, cos_sin_ptr, pos_ptr, slot_ptr,
    qkv_stride, q_stride, cs_stride, c_block, c_off, c_head,
    block_size,
    H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
    BH: tl.constexpr, BKV: tl.constexpr, BHALF: tl.constexpr, LIM: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t)
    j = tl.arange(0, BHALF)
    jm = j < HALF
    cos = tl.load(cos_sin_ptr + pos * cs_stride + j, mask=jm, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * cs_stride + HALF + j, mask=jm, other=0.0)
    row = qkv_ptr + t.to(tl.int64) * qkv_stride
    out_ty = q_ptr.dtype.element_ty

    # q heads -> q_out
    h = tl.arange(0, BH)
    hm = (h < H)[:, None] & jm[None, :]
    hc = h[:, None] * D + j[None, :]
    q1, q2 = _rotate(row, hc, hm, HALF, cos, sin, out_ty)
    q_row = q_ptr + t.to(tl.int64) * q_stride
    tl.store(q_row + hc, q1, mask=hm)
    tl.store(q_row + hc + HALF, q2, mask=hm)

    # k and v heads -> the QKV rows (rotated / rounded like the cache) and the cache at this token's slot
    g = tl.arange(0, BKV)
    gm = (g < KV)[:, None] & jm[None, :]
    kc = H * D + g[:, None] * D + j[None, :]
    vc = kc + KV * D
    k1, k2 = _rotate(row, kc, gm, HALF, cos, sin, out_ty)
    cache_ty = k_cache_ptr.dtype.element_ty
    k1, k2 = _like_cache(k1, LIM, cache_ty), _like_cache(k2, LIM, cache_ty)
    v1 = _like_cache(tl.load(row + vc, mask=gm, other=0.0), LIM, cache_ty)
    v2 = _like_cache(tl.load(row + vc + HALF, mask=gm, other=0.0), LIM, cache_ty)
    tl.store(row + kc, k1.to(out_ty), mask=gm)
    tl.store(row + kc + HALF, k2.to(out_ty), mask=gm)
    if LIM > 0:  # float8 cache: v rounded like the cache, in the rows too
        tl.store(row + vc, v1.to(out_ty), mask=gm)
        tl.store(row + vc + HALF, v2.to(out_ty), mask=gm)
    blk = slot // block_size
    off = slot - blk * block_size
    cc = blk * c_block + off * c_off + g[:, None] * c_head + j[None, :]
    tl.store(k_cache_ptr + cc, k1, mask=gm)
    tl.store(k_cache_ptr + cc + HALF, k2, mask=gm)
    tl.store(v_cache_ptr + cc, v1, mask=gm)
    tl.store(v_cache_ptr + cc + HALF, v2, mask=gm)


def rope_kv_store(qkv: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                  q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                  head_dim: int) -> None:
    """Rotate ``qkv [T, (H + 2 KV) * D]`` at ``positions [T]`` by the table ``cos_sin [max_pos, D]`` (fp32, cos in
    the first half), write q to ``q_out [T, H * D]``, k (and under a float8 cache, v) back into ``qkv``, and k, v
    to slots ``slot_mapping [T]`` of the paged caches ``[blocks, block_size, KV, D]``.

    Equivalent to ``store_kv(*rope_qkv_into(qkv, cos_sin[positions], ...), k_cache, v_cache, slot_mapping)``.
    """
    t = qkv.shape[0]
    if t == 0:
        return
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    if qkv.shape[1] != (heads + 2 * kv_heads) * head_dim or qkv.stride(1) != 1 or q_out.stride(1) != 1:
        raise ValueError(f"qkv must be [T, (heads + 2 kv_heads) * head_dim] = [T, {(heads + 2 * kv_heads) * head_dim}]"
                         f" with unit column stride, got {tuple(qkv.shape)} strides {qkv.stride()}")
    if k_cache.dtype != v_cache.dtype or k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError("k_cache and v_cache must share dtype and layout [blocks, block_size, kv_heads, head_dim]")
    half = head_dim // 2
    _rope_kv_kernel[(t,)](
        qkv, q_out, k_cache, v_cache, cos_sin, positions, slot_mapping,
        qkv.stride(0), q_out.stride(0), cos_sin.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[1],
        H=heads, KV=kv_heads, D=head_dim, HALF=half, BH=triton.next_power_of_2(heads),
        BKV=triton.next_power_of_2(kv_heads), BHALF=triton.next_power_of_2(half),
        LIM=FP8_MAX if k_cache.dtype == FP8 else 0.0, num_warps=4, enable_fp_fusion=False)
