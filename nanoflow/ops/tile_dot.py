"""Tile products shared by the Triton kernels (attention, grouped GEMM): fp32-accumulated ``tl.dot`` whose precision
is picked per dtype and device, so CPU-interpreter runs match what the GPU's MMA computes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype, device: torch.device, batch_invariant: bool = False) -> str:
    """The PRECISION constexpr for :func:`tile_dot`: exact fp32 for fp32 inputs (tf32 would cost ~3e-4 relative).

    Triton's CPU interpreter multiplies bfloat16 operands as their raw uint16 bits (seen with triton 3.9), so off
    CUDA bf16 tiles are upcast first; bf16 products are exact in fp32, so the result matches the GPU's MMA.

    ``batch_invariant`` off CUDA: ``"rowwise"``, a broadcast multiply and sum. The interpreter's ``tl.dot`` is numpy's
    matmul, whose BLAS rounds a row differently by its position in the tile; an MMA computes every row alike.
    """
    if batch_invariant and device.type != "cuda":
        return "rowwise"
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and device.type != "cuda":
        return "upcast"
    return "tf32"  # ignored by Triton for 16-bit operands


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tile_dtype(q_dtype: torch.dtype, kv_dtype: torch.dtype, f16_tiles: bool | None = None) -> tl.dtype:
    """The dtype an attention kernel multiplies its query and K/V tiles in (its TILE constexpr).

    A float8 cache under a 16-bit query is widened to float16 by default (``f16_tiles=None``): float16 holds every
    e4m3 value exactly, and on sm_89+ the widening is one instruction per two elements (``cvt.rn.f16x2.e4m3x2``),
    where bfloat16 takes four (through float16 and float32): float8 decode attention on an H200 0.81 against
    0.85 ms (s6-decode-kv-tune-f16tiles-h200.json). The query loses nothing in float16 (three more mantissa bits
    than bfloat16) unless ``|q| > 65504``. ``f16_tiles=False`` keeps the query's dtype (the old path, for
    measurement). A 16/32-bit cache: the query's dtype.
    """
    if q_dtype not in _TL_DTYPES:
        raise ValueError(f"attention query dtype must be float32, bfloat16 or float16, got {q_dtype}")
    if kv_dtype.itemsize == 1 and q_dtype != torch.float32 and (f16_tiles is None or f16_tiles):
        return tl.float16
    return _TL_DTYPES[q_dtype]


@triton.jit
def tile_dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in fp32; see :func:`dot_precision` for PRECISION ("rowwise" is for the interpreter)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PRECISION == "rowwise":
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=PRECISION)
