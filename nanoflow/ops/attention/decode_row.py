"""Row-wise paged decode attention (``decode_attention(variant="row" | "row_flat")``).

Grid ``(N * num_splits,)`` or a persistent ``(max_programs,)``: a program owns a whole row (all kv heads) and a range
of its tiles, so each K/V tile ``[block_n, num_kv_heads, head_dim]`` is whole pages, each a contiguous
``page * num_kv_heads * head_dim`` run (32 KB for 16 x 8 x 128 bf16): num_kv_heads x the bytes per load of the split
kernel at the same ``block_n``, in contiguous runs instead of 256 B rows strided by ``num_kv_heads * head_dim``; meant
to reach HBM bandwidth on a few SMs beside a concurrent GEMM.

* ``row``: scores and P @ V are batched 3-D ``tl.dot`` (batch = kv head; Triton 3.x supports 3-D operands, the first
  dimension being the batch, compiled and in the interpreter); the GQA group is padded to >= 16 rows, so the fp32
  accumulator is ``num_kv_heads * 16 * head_dim`` (64 KB for 8 kv heads of 128): register pressure grows with kv
  heads, hence it suits GQA with few kv heads per GPU.
* ``row_flat``: the same work split and tiles, with the heads flattened into 2-D dots (q ``[num_heads, D]`` x K
  ``[block_n * kv_heads, D]``, other heads' columns masked): kv_heads x the useful FLOPs, an accumulator of only
  ``num_heads * head_dim``.

Splits, the workspace and the reduce kernel are the split kernel's (:mod:`nanoflow.ops.attention.decode`), as are
its CUDA-graph invariants. Measured on an H200 (benchmarks/results/2026-12-02-s5-decode-kv-tune-h200.json): slower than
the split kernel at their default grids (row 0.9-1.6 TB/s, row_flat 2.1-2.3, split 4.4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoflow.ops.attention.decode import decode_strides
from nanoflow.ops.attention.online_softmax import LOG2E, attend_tile, dot_rows, store_result
from nanoflow.ops.attention.reference import AttentionInputError
from nanoflow.ops.attention.split_kv import (
    DecodeWorkspace,
    check_block_n,
    check_programs,
    check_splits,
    default_num_splits,
    reduce_splits,
    split_outputs,
    split_range,
)
from nanoflow.ops.tile_dot import dot_precision


@triton.jit
def _item_tiles(lens_ptr, item, num_splits, BLOCK_N: tl.constexpr):
    """``(row, split, seq_len, tile_lo, tile_hi)`` of work item ``item`` (split ``item % num_splits`` of row
    ``item // num_splits``): the KV tiles it owns (``cdiv(tiles, splits)`` each; ``tile_lo >= tile_hi`` when the row
    is too short to reach this split)."""
    row = item // num_splits
    split = item % num_splits
    seq_len, tile_lo, tile_hi = split_range(lens_ptr, row, split, num_splits, BLOCK_N)
    return row, split, seq_len, tile_lo, tile_hi


@triton.jit
def _tile_token_offsets(bt_row, tile, tok, valid, seq_len, stride_kb, stride_kt, stride_vb, stride_vt,
                        PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets of the ``BLOCK_N`` token slots of ``tile`` in the K and V caches (kv head 0, dim 0).

    Whole pages (``BLOCK_N >= PAGE``): one block-table entry per page, each page a contiguous ``[PAGE, KVH, D]`` run.
    A tile inside one page: one page lookup per token."""
    if BLOCK_N >= PAGE:
        NUM_PAGES: tl.constexpr = BLOCK_N // PAGE
        pidx = tile * NUM_PAGES + tl.arange(0, NUM_PAGES)
        page = tl.load(bt_row + pidx, mask=pidx * PAGE < seq_len, other=0).to(tl.int64)
        slot = tl.arange(0, PAGE)
        k_tok = tl.reshape(page[:, None] * stride_kb + (slot * stride_kt)[None, :], [BLOCK_N])
        v_tok = tl.reshape(page[:, None] * stride_vb + (slot * stride_vt)[None, :], [BLOCK_N])
    else:
        page = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
        k_tok = page * stride_kb + (tok % PAGE) * stride_kt
        v_tok = page * stride_vb + (tok % PAGE) * stride_vt
    return k_tok, v_tok


@triton.jit
def _decode_row_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, plse_ptr,
    num_items, num_splits,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pot, stride_poh, stride_pos,
    stride_plt, stride_plh,
    KVH: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr, EVICT: tl.constexpr,
    TILE: tl.constexpr,
):
    """Row-wise decode: one work item is (row, split) with ALL kv heads of the row, so a K (or V) tile is
    ``[BLOCK_N, KVH, HEAD_DIM]`` -- whole pages, each one contiguous run of ``PAGE * KVH * HEAD_DIM`` elements.

    Items are dealt round-robin (item = pid, pid + P, ...): the full grid has one program per item, the persistent
    grid (``max_programs``) fewer. Scores and P @ V are batched 3-D ``tl.dot`` over the kv heads:
    ``[KVH, BLOCK_G, D] x [KVH, D, BLOCK_N] -> [KVH, BLOCK_G, BLOCK_N]``; softmax state is per (kv head, q head).
    """
    offs_h = tl.arange(0, KVH)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_valid = (offs_g < GROUP)[None, :]  # [1, BLOCK_G]
    heads = offs_h[:, None] * GROUP + offs_g[None, :]  # [KVH, BLOCK_G] query heads
    # [KVH, HEAD_DIM] offsets of each kv head's row inside one token's slot.
    k_hd = offs_h[:, None] * stride_kh + offs_d[None, :]
    v_hd = offs_h[:, None] * stride_vh + offs_d[None, :]
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        row, split, seq_len, tile_lo, tile_hi = _item_tiles(lens_ptr, item, num_splits, BLOCK_N)
        # seq_len <= 0: no store at all (out row untouched); a split past the row's end writes nothing either.
        if (seq_len > 0) & (tile_lo < tile_hi):
            row64 = row.to(tl.int64)
            q = tl.load(q_ptr + row64 * stride_qt + heads[:, :, None] * stride_qh + offs_d[None, None, :],
                        mask=g_valid[:, :, None], other=0.0).to(TILE)  # [KVH, BLOCK_G, D]
            bt_row = bt_ptr + row64 * stride_bt
            m_i = tl.full([KVH, BLOCK_G], float("-inf"), tl.float32)
            l_i = tl.zeros([KVH, BLOCK_G], tl.float32)
            acc = tl.zeros([KVH, BLOCK_G, HEAD_DIM], tl.float32)
            for tile in range(tile_lo, tile_hi):
                tok = tile * BLOCK_N + offs_n
                valid = tok < seq_len
                k_tok, v_tok = _tile_token_offsets(bt_row, tile, tok, valid, seq_len, stride_kb, stride_kt, stride_vb,
                                                   stride_vt, PAGE, BLOCK_N)
                k = tl.load(k_ptr + k_tok[:, None, None] + k_hd[None, :, :], mask=valid[:, None, None], other=0.0,
                            eviction_policy=EVICT).to(q.dtype)  # [BLOCK_N, KVH, D], memory order; float8 widened
                v = tl.load(v_ptr + v_tok[:, None, None] + v_hd[None, :, :], mask=valid[:, None, None], other=0.0,
                            eviction_policy=EVICT).to(q.dtype)
                # Scores [KVH, BLOCK_G, BLOCK_N]; every tile holds >= 1 valid token.
                m_i, l_i, acc = attend_tile(q, tl.permute(k, (1, 2, 0)), tl.permute(v, (1, 0, 2)),
                                            valid[None, None, :], m_i, l_i, acc, scale_log2, PRECISION)
            store_result(out_ptr, po_ptr, plse_ptr, row64, split, heads, g_valid, m_i, l_i, acc, stride_ot, stride_oh,
                         stride_pot, stride_poh, stride_pos, stride_plt, stride_plh, HEAD_DIM, DIRECT)


@triton.jit
def _decode_row_flat_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, plse_ptr,
    num_items, num_splits,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pot, stride_poh, stride_pos,
    stride_plt, stride_plh,
    KVH: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr, EVICT: tl.constexpr,
    TILE: tl.constexpr,
):
    """``variant="row_flat"``: the row kernel's work items and whole-page tiles, but 2-D dots over flattened heads.

    q is ``[BLOCK_M, D]`` (all query heads of the row, padded to >= 16), a K/V tile is ``[BLOCK_N * KVH, D]`` (the
    pages' memory order: column ``c`` is token ``c // KVH``, kv head ``c % KVH``), and scores of a query head against
    another kv head's columns are masked out. The dots do KVH x the useful FLOPs (vs 16 / GROUP for the batched form),
    but the accumulator is ``[BLOCK_M, D]`` instead of ``[KVH, 16, D]``: far fewer registers for many kv heads.
    """
    BLOCK_C: tl.constexpr = BLOCK_N * KVH
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, KVH)
    m_valid = offs_m < KVH * GROUP
    # Padding rows (q = 0) ride along with the last kv head, so they see valid columns and stay finite.
    row_head = tl.minimum(offs_m // GROUP, KVH - 1)
    col_head = tl.reshape(tl.broadcast_to(offs_h[None, :], [BLOCK_N, KVH]), [BLOCK_C])
    same_head = row_head[:, None] == col_head[None, :]  # [BLOCK_M, BLOCK_C]
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        row, split, seq_len, tile_lo, tile_hi = _item_tiles(lens_ptr, item, num_splits, BLOCK_N)
        if (seq_len > 0) & (tile_lo < tile_hi):
            row64 = row.to(tl.int64)
            q = tl.load(q_ptr + row64 * stride_qt + offs_m[:, None] * stride_qh + offs_d[None, :],
                        mask=m_valid[:, None], other=0.0).to(TILE)
            bt_row = bt_ptr + row64 * stride_bt
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            for tile in range(tile_lo, tile_hi):
                tok = tile * BLOCK_N + offs_n
                valid = tok < seq_len
                k_tok, v_tok = _tile_token_offsets(bt_row, tile, tok, valid, seq_len, stride_kb, stride_kt, stride_vb,
                                                   stride_vt, PAGE, BLOCK_N)
                k_col = tl.reshape(k_tok[:, None] + (offs_h * stride_kh)[None, :], [BLOCK_C])
                v_col = tl.reshape(v_tok[:, None] + (offs_h * stride_vh)[None, :], [BLOCK_C])
                c_valid = tl.reshape(tl.broadcast_to(valid[:, None], [BLOCK_N, KVH]), [BLOCK_C])
                k = tl.load(k_ptr + k_col[:, None] + offs_d[None, :], mask=c_valid[:, None], other=0.0,
                            eviction_policy=EVICT).to(q.dtype)  # [BLOCK_C, D]; float8 widened
                v = tl.load(v_ptr + v_col[:, None] + offs_d[None, :], mask=c_valid[:, None], other=0.0,
                            eviction_policy=EVICT).to(q.dtype)
                # Scores [BLOCK_M, BLOCK_C]; every tile holds >= 1 valid token of every kv head.
                m_i, l_i, acc = attend_tile(q, tl.trans(k), v, same_head & c_valid[None, :], m_i, l_i, acc,
                                            scale_log2, PRECISION)
            store_result(out_ptr, po_ptr, plse_ptr, row64, split, offs_m, m_valid, m_i, l_i, acc, stride_ot, stride_oh,
                         stride_pot, stride_poh, stride_pos, stride_plt, stride_plh, HEAD_DIM, DIRECT)


def decode_row(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, out: torch.Tensor, scale: float, num_splits: int | None,
    workspace: DecodeWorkspace | None, block_n: int | None, num_warps: int, num_stages: int,
    max_programs: int | None, kv_evict: str, page: int, group: int, flat: bool, tile: tl.dtype,
) -> torch.Tensor:
    """``decode_attention(variant="row"|"row_flat")``: see :func:`_decode_row_kernel` and
    :func:`_decode_row_flat_kernel`; ``tile`` is the TILE constexpr (:func:`~nanoflow.ops.tile_dot.tile_dtype`).
    Inputs are already checked."""
    rows, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if kv_heads & (kv_heads - 1):
        raise AttentionInputError(
            f'variant="row" needs a power-of-two num_kv_heads (one tile spans all kv heads), got {kv_heads}; '
            f'use variant="split"'
        )
    if block_n is None:
        # One page per iteration on a GPU (e.g. 16 x 8 x 128 bf16 = 32 KB of K and 32 KB of V); the interpreter uses
        # 16 tokens so small test shapes still cross tiles.
        block_n = max(16, page) if q.device.type == "cuda" else 16
    check_block_n(block_n)
    if max_programs is not None:
        num_splits, grid = 1, min(check_programs(max_programs), rows)  # persistent: rows round-robin, one split each
    else:
        num_splits = check_splits(default_num_splits(rows, 1, q.device) if num_splits is None else num_splits)
        grid = rows * num_splits
    direct, po, plse, partial_strides = split_outputs(out, workspace, num_splits)
    if flat:
        kernel, tiling = _decode_row_flat_kernel, {"BLOCK_M": dot_rows(num_heads)}
    else:
        kernel, tiling = _decode_row_kernel, {"BLOCK_G": dot_rows(group)}
    kernel[(grid,)](
        q, k_cache, v_cache, block_tables, seq_lens, out, po, plse, rows * num_splits, num_splits, scale * LOG2E,
        *decode_strides(q, k_cache, v_cache, block_tables, out), *partial_strides,
        KVH=kv_heads, GROUP=group, HEAD_DIM=head_dim, PAGE=page, **tiling,
        BLOCK_N=block_n, DIRECT=direct, PRECISION=dot_precision(q.dtype, q.device), EVICT=kv_evict,
        TILE=tile, num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:  # same split arithmetic (per-row tiles of block_n tokens): the split kernel's reduce applies
        reduce_splits(seq_lens, out, po, plse, partial_strides, num_splits, block_n)
    return out
