"""Grouped GEMM for mixture-of-experts layers, in Triton: ``Y[rows of e] = X[rows of e] @ W[e]^T`` for every expert.

Inputs: ``X [M, K]`` with rows sorted by expert, ``offsets [E+1]`` int32 on the device (expert ``e`` owns rows
``[offsets[e], offsets[e+1])``), ``W [E, N, K]``; optional ``row_scale [M]`` fp32 multiplies each output row before
the cast (the routing weight, folded into the down projection). Output ``Y [M, N]``.

Scheduling: the grid is ``(max_m_tiles, cdiv(N, BLOCK_N))`` with ``max_m_tiles = min(M, cdiv(M, BLOCK_M) + E - 1)``,
an upper bound of ``sum_e cdiv(count_e, BLOCK_M)`` for any split of M rows over E experts. Program ``(t, j)`` walks
the E expert counts (E scalar loads) to find which expert's m-block ``t`` is; programs past the last block, and
experts with no rows, cost nothing but that walk. Axis 0 varies fastest, so the programs resident together share
an n-block and each expert's weight tile is read from HBM once per wave.

Loads: pointer loads with row masks, or (``GemmConfig.tma``; by default on sm_90+ for the GEMMs whose H200 sweep
favoured it) TMA tensor descriptors, with no masks: a tile may read rows of the next expert, which only feed outputs
the masked store drops, and reads past a tensor's end return zeros. Both paths share the expert lookup
(:func:`_tile_expert`) and the masked, optionally row-scaled store.

CUDA-graph invariants: the grid depends only on ``M``, ``N``, ``E`` and the block sizes, never on ``offsets`` (the
wrapper reads no device value). Rows at or past ``offsets[E]`` are never written, so ``M`` may be a static maximum.
Accumulation is fp32; fp32 inputs use exact (IEEE) products, 16-bit inputs tensor cores.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanoflow.ops.tile_dot import dot_precision, tile_dot

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class GroupedGemmError(ValueError):
    """Grouped-GEMM inputs whose shapes, dtypes, strides or devices do not fit together."""


class GemmConfig(NamedTuple):
    """Tile sizes (powers of two >= 16) and launch options of one kernel variant."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    tma: bool | None = None  # load tiles through TMA tensor descriptors; None: on sm_90+ when the strides allow
    # TMA path only: Triton's automatic warp specialization of the K loop (producer warps issue the TMA copies,
    # consumer warp groups the MMAs); needs num_warps >= 4. On an H200 it ties the best plain tiles (475 vs 470 and
    # 530 vs 532 TFLOP/s at 2,048 / 4,096 rows; benchmarks/results/2026-12-02-s8-moe-grouped-gemm-ws-h200.json).
    warp_specialize: bool = False
    # Tile order (L2 reuse). 0: a 2-D grid, m-blocks fastest, so a wave of programs spans every m-block of a few
    # n-blocks (each weight tile is read once while its expert's m-blocks run together, but X is re-read for every
    # few n-blocks: for the down GEMM, X is [rows, 14336], more than L2 holds). G > 0: a 1-D grid in groups of G
    # m-blocks, m fastest inside a group, then n, so a wave covers G m-blocks x many n-blocks and reuses both
    # operands (Triton's matmul tutorial's GROUP_SIZE_M). On an H100 it lifts the default tiles 3-6%
    # (benchmarks/results/2026-12-06-s9-moe-grouped-gemm-h100.json), so :func:`default_config` sets it.
    group_m: int = 0


def default_config(m: int, n: int, k: int, num_experts: int, device: torch.device) -> GemmConfig:
    """A tile shape from static sizes only (CUDA-graph safe): small m-tiles when experts get few rows each."""
    if device.type != "cuda":
        return GemmConfig(16, 16, 16)  # the interpreter: small tiles keep multi-tile paths exercised
    rows_per_expert = m / max(1, num_experts)
    if rows_per_expert <= 32:
        return GemmConfig(32, 128, 64, num_warps=4, num_stages=4)
    if rows_per_expert <= 96:
        return GemmConfig(64, 128, 64, num_warps=4, num_stages=4)
    # Tile sweep on an H200, pointer and TMA loads, Mixtral shapes at 2,048 and 4,096 routed rows
    # (benchmarks/results/2026-12-02-s7-moe-grouped-gemm-h200.json): the wide gate/up GEMM is fastest with pointer
    # loads and 128x256 tiles, 4 stages (503 / 487 TFLOP/s; the best TMA tiles 462 / 490); the down GEMM (K=14336)
    # with TMA loads and 128x128 tiles, 4 warps (464 / 501; the best pointer tiles 400 / 480). The grouped tile order
    # on an H100 (s9-moe-grouped-gemm-h100.json, 2,048 / 4,096 rows): gate/up 461 / 494 -> 484 / 516 TFLOP/s with
    # groups of 8 m-blocks, down 406 / 464 -> 419 / 493 with groups of 16.
    if n >= 16384:
        return GemmConfig(128, 256, 64, num_warps=8, num_stages=4, tma=False, group_m=8)
    return GemmConfig(128, 128, 64, num_warps=4, num_stages=4, group_m=16)


def max_m_tiles(m: int, num_experts: int, block_m: int) -> int:
    """Upper bound of ``sum_e cdiv(count_e, block_m)`` over all splits of ``m`` rows into ``num_experts`` groups."""
    return min(m, triton.cdiv(m, block_m) + num_experts - 1)


@triton.jit
def _tile_expert(offsets_ptr, tile, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """``(expert, row_start, row_end)`` of m-block ``tile``; expert -1 past the last block.

    Blocks are numbered expert by expert, ``cdiv(count, BLOCK_M)`` each.
    """
    expert = -1
    row_start = 0
    row_end = 0
    first_block = 0
    for e in range(NUM_EXPERTS):
        lo = tl.load(offsets_ptr + e)
        hi = tl.load(offsets_ptr + e + 1)
        blocks = tl.cdiv(hi - lo, BLOCK_M)
        mine = (tile >= first_block) & (tile < first_block + blocks)
        expert = tl.where(mine, e, expert)
        row_start = tl.where(mine, lo + (tile - first_block) * BLOCK_M, row_start)
        row_end = tl.where(mine, hi, row_end)
        first_block += blocks
    return expert, row_start, row_end


@triton.jit
def _tile_ids(NUM_M, NUM_N, GROUP_M: tl.constexpr):
    """``(m-block, n-block)`` of this program: the 2-D grid's ids, or with GROUP_M the grouped order over a 1-D grid
    of ``NUM_M * NUM_N`` programs (``NUM_M``: the static bound on m-blocks)."""
    if GROUP_M == 0:
        return tl.program_id(0), tl.program_id(1)
    pid = tl.program_id(0)
    per_group = GROUP_M * NUM_N
    first_m = (pid // per_group) * GROUP_M
    size = tl.minimum(NUM_M - first_m, GROUP_M)
    return first_m + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, y_ptr, offsets_ptr, scale_ptr,
    N, K,
    stride_xm, stride_xk,
    stride_we, stride_wn, stride_wk,
    stride_ym, stride_yn,
    NUM_M, NUM_N,
    NUM_EXPERTS: tl.constexpr, HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    tile, pid_n = _tile_ids(NUM_M, NUM_N, GROUP_M)
    expert, row_start, row_end = _tile_expert(offsets_ptr, tile, NUM_EXPERTS, BLOCK_M)
    if expert < 0:
        return

    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_valid = offs_m < row_end
    n_valid = offs_n < N
    # int64 addressing: an expert stack (E * N * K) exceeds 2**31 elements for the largest models.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            a = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_valid[:, None], other=0.0)
            b = tl.load(w_cols + kk[:, None] * stride_wk, mask=n_valid[None, :], other=0.0)
        else:
            k_valid = kk < K
            a = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_valid[:, None] & k_valid[None, :], other=0.0)
            b = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        acc += tile_dot(a, b, PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_m, mask=m_valid, other=0.0)[:, None]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


@triton.jit
def _grouped_gemm_tma_kernel(
    x_desc, w_desc, y_ptr, offsets_ptr, scale_ptr,
    N, K,
    stride_ym, stride_yn,
    NUM_M, NUM_N,
    NUM_EXPERTS: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """The same tiles as ``_grouped_gemm_kernel``, loaded by TMA (Hopper's bulk tensor copies) instead of pointers.

    ``x_desc`` views X as ``[M, K]``, ``w_desc`` the expert stack as ``[E * N, K]``. A block may read rows past its
    expert (the next expert's rows of X, or of W when ``N % BLOCK_N``); those rows only feed outputs that the masked
    store drops. Reads past the tensor's end come back as zeros, so no load needs a mask.
    """
    tile, pid_n = _tile_ids(NUM_M, NUM_N, GROUP_M)
    expert, row_start, row_end = _tile_expert(offsets_ptr, tile, NUM_EXPERTS, BLOCK_M)
    if expert < 0:
        return
    w_row = expert * N + pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, warp_specialize=WARP_SPECIALIZE):
        a = x_desc.load([row_start, k0])
        b = w_desc.load([w_row, k0])
        acc += tile_dot(a, b.T, PRECISION)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid = offs_m < row_end
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_m, mask=m_valid, other=0.0)[:, None]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_valid[:, None] & (offs_n < N)[None, :])


def _check(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
           row_scale: torch.Tensor | None) -> None:
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise GroupedGemmError(f"grouped_gemm needs x [M, K] and w [E, N, K] with the same K; got x "
                               f"{tuple(x.shape)} and w {tuple(w.shape)}")
    m, e, n = x.shape[0], w.shape[0], w.shape[1]
    if x.dtype not in SUPPORTED_DTYPES or w.dtype != x.dtype or out.dtype != x.dtype:
        raise GroupedGemmError(f"x, w and out must share one of {[str(d) for d in SUPPORTED_DTYPES]}; got "
                               f"{x.dtype}, {w.dtype}, {out.dtype}")
    if tuple(out.shape) != (m, n):
        raise GroupedGemmError(f"out must be [M, N] = [{m}, {n}]; got {tuple(out.shape)}")
    if offsets.dtype != torch.int32 or tuple(offsets.shape) != (e + 1,):
        raise GroupedGemmError(f"offsets must be int32 [E+1] = [{e + 1}]; got {offsets.dtype} "
                               f"{tuple(offsets.shape)}")
    tensors = {"x": x, "w": w, "out": out, "offsets": offsets}
    if row_scale is not None:
        if row_scale.dtype != torch.float32 or tuple(row_scale.shape) != (m,) or row_scale.stride(0) != 1:
            raise GroupedGemmError(f"row_scale must be contiguous float32 [M] = [{m}]; got {row_scale.dtype} "
                                   f"{tuple(row_scale.shape)} stride {row_scale.stride()}")
        tensors["row_scale"] = row_scale
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise GroupedGemmError(f"all tensors must be on one device; got {devices}")
    # Unit stride along K (and N for out) keeps loads and stores coalesced; every other stride is free.
    bad = [name for name, t in (("x", x), ("w", w), ("out", out)) if t.shape[-1] > 1 and t.stride(-1) != 1]
    if bad or (offsets.stride(0) != 1):
        raise GroupedGemmError(f"{', '.join(bad) or 'offsets'} must have unit stride along the last dim "
                               "(call .contiguous())")


def grouped_gemm(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
                 row_scale: torch.Tensor | None = None, config: GemmConfig | None = None) -> torch.Tensor:
    """``out[offsets[e]:offsets[e+1]] = (x[...] @ w[e].T) * row_scale[...]`` for every expert ``e``.

    Args:
        x: ``[M, K]`` rows sorted by expert; ``M`` may exceed ``offsets[E]`` (those rows are neither read nor
            written).
        offsets: int32 ``[E+1]`` on the device, non-decreasing, ``offsets[0] == 0``, ``offsets[E] <= M``.
        w: ``[E, N, K]``, same dtype as ``x`` (fp32, bf16 or fp16).
        out: ``[M, N]`` in ``x.dtype``; allocated when ``None``.
        row_scale: optional contiguous fp32 ``[M]``, applied to the fp32 accumulator before the cast.
        config: tiles and launch options; ``None`` picks :func:`default_config` (from static sizes only).
    Returns ``out``.
    """
    if out is None:
        out = torch.empty(x.shape[0], w.shape[1] if w.dim() == 3 else 0, dtype=x.dtype, device=x.device)
    _check(x, offsets, w, out, row_scale)
    m, k = x.shape
    e, n = w.shape[0], w.shape[1]
    if m == 0 or n == 0 or e == 0:
        return out
    cfg = config or default_config(m, n, k, e, x.device)
    if cfg.group_m < 0:
        raise GroupedGemmError(f"group_m must be >= 0 (0: the 2-D grid), got {cfg.group_m}")
    num_m, num_n = max_m_tiles(m, e, cfg.block_m), triton.cdiv(n, cfg.block_n)
    grid = (num_m * num_n,) if cfg.group_m else (num_m, num_n)
    common = dict(NUM_EXPERTS=e, HAS_SCALE=row_scale is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k, PRECISION=dot_precision(x.dtype, x.device), GROUP_M=cfg.group_m,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if _use_tma(x, w, cfg):
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [cfg.block_m, cfg.block_k])
        w_desc = TensorDescriptor(w, [e * n, k], [w.stride(1), 1], [cfg.block_n, cfg.block_k])
        _grouped_gemm_tma_kernel[grid](
            x_desc, w_desc, out, offsets, row_scale if row_scale is not None else x,
            n, k, out.stride(0), out.stride(1), num_m, num_n, WARP_SPECIALIZE=cfg.warp_specialize, **common,
        )
        return out
    _grouped_gemm_kernel[grid](
        x, w, out, offsets, row_scale if row_scale is not None else x,
        n, k,
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        num_m, num_n,
        EVEN_K=k % cfg.block_k == 0, **common,
    )
    return out


def tma_blocker(x: torch.Tensor, w: torch.Tensor, cfg: GemmConfig) -> str | None:
    """Why TMA descriptors cannot describe ``x [M, K]`` and ``w [E, N, K]`` with ``cfg``'s tiles; None when they can.

    A descriptor needs a 16-byte aligned base, 16-byte multiples for every stride but the last, and a tile row of at
    least 16 bytes; ``w`` must also be one ``[E * N, K]`` matrix (``stride(0) == N * stride(1)``).
    """
    size = x.element_size()
    if x.data_ptr() % 16 or w.data_ptr() % 16:
        return "x or w does not start on a 16-byte boundary"
    if (x.stride(0) * size) % 16 or (w.stride(1) * size) % 16:
        return f"row strides of {x.stride(0)} (x) and {w.stride(1)} (w) elements must be multiples of 16 bytes"
    if w.stride(0) != w.shape[1] * w.stride(1):
        return "w's experts must follow one another with no gap (stride(0) == N * stride(1))"
    if cfg.block_k * size < 16:
        return f"block_k={cfg.block_k} gives tile rows under 16 bytes"
    return None


def _use_tma(x: torch.Tensor, w: torch.Tensor, cfg: GemmConfig) -> bool:
    """Explicit ``cfg.tma=True`` must be possible (else an error says why); ``None`` means on sm_90+ if possible."""
    if cfg.warp_specialize and (cfg.tma is False or cfg.num_warps < 4):
        raise GroupedGemmError(f"warp_specialize needs the TMA path and num_warps >= 4; got tma={cfg.tma}, "
                               f"num_warps={cfg.num_warps}")
    if cfg.tma is False:
        return False
    blocker = tma_blocker(x, w, cfg)
    if cfg.tma:
        if blocker:
            raise GroupedGemmError(f"tma=True but {blocker}; pass tma=None (or False) to use pointer loads")
        return True
    return blocker is None and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
