"""Tile products shared by the Triton kernels (attention, grouped GEMM): fp32-accumulated ``tl.dot`` whose precision
is picked per dtype and device, so CPU-interpreter runs match what the GPU's MMA computes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """The PRECISION constexpr for :func:`tile_dot`: exact fp32 for fp32 inputs (tf32 would cost ~3e-4 relative).

    Triton's CPU interpreter multiplies bfloat16 operands as their raw uint16 bits (seen with triton 3.9), so off
    CUDA bf16 tiles are upcast first; bf16 products are exact in fp32, so the result matches the GPU's MMA.
    """
    if dtype == torch.float32:
        return "ieee"
    if dtype == torch.bfloat16 and device.type != "cuda":
        return "upcast"
    return "tf32"  # ignored by Triton for 16-bit operands


@triton.jit
def tile_dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in fp32; see :func:`dot_precision` for PRECISION."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)
