"""Batch-invariant kernels: every row's result is bitwise independent of the other rows in its batch.

cuBLAS picks its GEMM kernel (tile shape, split-K) by the row count ``M``, and torch's row reductions pick their
launch by the shape too, so the same token gives slightly different bits in a batch of 2,048 rows than in a
nano-batch of 640. Greedy outputs of random ("dummy") weights, whose logits are nearly tied, then diverge between the
non-overlapped baseline and any nano-batch split (session 12: 0 of 1,024 bf16 outputs equal; 255 of 256 in float32).

These kernels fix everything that decides a row's arithmetic regardless of the batch:

- :func:`linear_into`: a Triton GEMM with one tile config per (device, dtype), no split-K, a K loop in fixed order;
  a row of ``x @ w.T`` is the same chain of MMAs whatever ``M`` is and wherever the row sits in its tile.
- :func:`add_rms_norm_into`: one program per row reducing the whole row in one block (fixed reduction tree).

With the attention kernels held to one tile config and one KV split (``TritonAttention(batch_invariant=True)``),
the element-wise ops run eagerly and the engine's ``batch_invariant`` option set, a request's tokens no longer depend
on how the batch is cut into nano-batches, on chunked-prefill boundaries, or on which requests share its batch
(what vLLM's ``VLLM_BATCH_INVARIANT`` and SGLang's deterministic inference offer). The price is speed: the Triton GEMM
is slower than cuBLAS, and attention loses split-KV parallelism on short batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from nanoflow.ops.tile_dot import dot_precision


class BatchInvariantError(ValueError):
    """Inputs the batch-invariant kernels cannot take (message says what to change)."""


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    """``out[M, N] = x[M, K] @ w[N, K].T (+ b[N])``, fp32 accumulation; programs grouped GROUP_M row tiles at a time
    along N (L2 reuse of the weight tiles)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + rk < K
        a = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + rn[None, :] * stride_wn + (k0 + rk)[:, None] * stride_wk,
                    mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if PRECISION == "rowwise":  # off CUDA: see tile_dot.dot_precision
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def matmul_config(dtype: torch.dtype, device: torch.device) -> dict[str, int]:
    """The one tile config per (device, dtype): ``BLOCK_M/N/K``, ``GROUP_M``, ``num_warps``, ``num_stages``.

    Never chosen by the shape: a config picked per ``M`` would bring back the batch dependence this module removes.
    """
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # exact fp32 (no tf32) runs on the FMA units: small tiles, few registers
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = x @ weight.T (+ bias)``, batch-invariant (``models.layers.linear_into``'s signature)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise BatchInvariantError(f"linear_into needs x [M, K] and weight [N, K]; got {list(x.shape)} and "
                                  f"{list(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if tuple(out.shape) != (m, n):
        raise BatchInvariantError(f"linear_into: out must be [{m}, {n}], got {list(out.shape)}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise BatchInvariantError(f"linear_into: x and weight must share dtype and device; got {x.dtype} on "
                                  f"{x.device} and {weight.dtype} on {weight.device}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise BatchInvariantError(f"linear_into: bias must be [{n}], got {list(bias.shape)}")
    if m == 0 or n == 0:
        return
    cfg = matmul_config(x.dtype, x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _matmul_kernel[grid](
        x, weight, bias if bias is not None else x, out, m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype, x.device, batch_invariant=True), **cfg,
    )


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` as a new tensor (:func:`linear_into`)."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    linear_into(x, weight, bias, out)
    return out


@triton.jit
def _add_rms_norm_kernel(
    h_ptr, r_ptr, w_ptr, out_ptr, N, eps, stride_h, stride_r, stride_o,
    BLOCK: tl.constexpr,
):
    """Row ``pid``: ``r = r + h`` (rounded to the activation dtype, as torch adds), ``out = w * (r / rms(r))`` with the
    norm in fp32 rounded to the activation dtype before the weight (the Hugging Face LLaMA order)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    h = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0)
    r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0)
    s = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
    tl.store(r_ptr + row * stride_r + cols, s, mask=ok)
    xf = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    y = (xf * inv).to(h.dtype)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=ok)


def add_rms_norm_into(hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      out: torch.Tensor) -> None:
    """``residual += hidden``; ``out = rms_norm(residual) * weight`` (``ops.norm.add_rms_norm_into``'s contract),
    one program per row."""
    if hidden.dim() != 2 or residual.shape != hidden.shape or out.shape != hidden.shape:
        raise BatchInvariantError(f"add_rms_norm_into needs hidden, residual and out of one shape [T, H]; got "
                                  f"{list(hidden.shape)}, {list(residual.shape)}, {list(out.shape)}")
    rows, n = hidden.shape
    if tuple(weight.shape) != (n,):
        raise BatchInvariantError(f"add_rms_norm_into: weight must be [{n}], got {list(weight.shape)}")
    if any(t.stride(-1) != 1 for t in (hidden, residual, out, weight)):
        raise BatchInvariantError("add_rms_norm_into needs unit stride along the hidden dimension")
    if rows == 0:
        return
    block = triton.next_power_of_2(n)
    warps = 1 if hidden.device.type != "cuda" else max(1, min(16, block // 512))
    _add_rms_norm_kernel[(rows,)](hidden, residual, weight, out, n, float(eps), hidden.stride(0), residual.stride(0),
                                  out.stride(0), BLOCK=block, num_warps=warps)


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + hidden), residual + hidden)`` as new tensors (:func:`add_rms_norm_into`)."""
    new_residual = residual.clone()
    out = torch.empty_like(hidden)
    add_rms_norm_into(hidden, new_residual, weight, eps, out)
    return out, new_residual


def batch_invariant_glue() -> dict[str, Callable[..., Any]]:
    """The ``StepContext.glue`` of batch-invariant mode: the GEMMs and norms above. Every other glue op (RoPE, SiLU,
    the KV store) is element-wise and runs eagerly, so each element is computed the same way in every batch."""
    return {"linear_into": linear_into, "add_rms_norm_into": add_rms_norm_into, "add_rms_norm": add_rms_norm}
