"""Head-packed paged decode attention (``decode_attention(variant="packed")``).

The split kernel serves one kv head per program: its GQA group (4 query heads for LLaMA-3-8B) is padded to the 16
rows a ``tl.dot`` needs, so three quarters of every score row, softmax step and accumulator row is padding. Inside a
green context its bandwidth is proportional to its SMs whatever the tiles (~27 G K/V elements per second per SM,
float8 and bf16 alike: benchmarks/results/2026-12-06-s9-green-decode-h100.json), i.e. it is bound by per-element
work on each SM, not by HBM.

Here a program serves ``head_group`` consecutive kv heads of a row at once, packed so that every dot row is a real
query head: q becomes block-diagonal, ``[head_group * GROUP, head_group * head_dim]`` with query head ``h`` of kv
head ``j`` in columns ``[j * head_dim, (j + 1) * head_dim)`` and zeros elsewhere, and a K/V tile is
``[block_n, head_group * head_dim]``: the ``head_group`` heads' vectors of each token, one contiguous run in the
page. Then ``q @ K^T`` gives each query head's scores against its own kv head only (the zeros remove the others),
every row of the ``[rows, block_n]`` scores and of the softmax is real, and ``P @ V`` gives an accumulator whose
diagonal blocks are the outputs (the off-diagonal blocks are computed and dropped at the store). The dots do
``head_group`` x the useful FLOPs, the same as the split kernel's padding for ``GROUP * head_group == 16``; the
softmax, its cross-warp reductions and the page lookups are shared by ``head_group`` kv heads.

Grid ``(N, num_kv_heads // head_group, num_splits)``; splits, the workspace and the reduce kernel are the split
kernel's, as are its CUDA-graph invariants.

Measured on an H100 (640 rows x 1,280 tokens, LLaMA-3-8B heads; benchmarks/results/2026-12-06-s9-green-decode-packed-
h100.json): slower, not faster. Float8: best 0.74 ms (4 kv heads, 32-token tiles, 4 warps, 3 stages) against 0.63 ms
for the split kernel, and 0.61 against 0.90 TB/s on 32 SMs; bf16: 1.12 ms, a tie on the whole GPU, 1.49 against 1.66
TB/s on 32 SMs. So the padded softmax rows are not what bounds the split kernel's per-SM rate; the wider tiles and the
``[rows, head_group * head_dim]`` accumulator cost more than they save. Kept as a measured option (``--decode-variant
packed``; it runs in the engine under CUDA graphs: s9-bench-packed-decode-h100-llama3-8b.json), not the default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoflow.ops.attention.online_softmax import LOG2E, attend_tile, dot_rows
from nanoflow.ops.attention.reference import AttentionInputError
from nanoflow.ops.attention.split_kv import (
    DecodeWorkspace,
    check_block_n,
    check_splits,
    default_num_splits,
    reduce_splits,
    split_outputs,
    split_range,
)
from nanoflow.ops.tile_dot import dot_precision


@triton.jit
def _decode_packed_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, plse_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pot, stride_poh, stride_pos,
    stride_plt, stride_plh,
    GROUP: tl.constexpr, HG: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr, EVICT: tl.constexpr,
    TILE: tl.constexpr,
):
    row = tl.program_id(0)
    hg = tl.program_id(1)
    split = tl.program_id(2)
    seq_len, tile_lo, tile_hi = split_range(lens_ptr, row, split, tl.num_programs(2), BLOCK_N)
    if tile_lo >= tile_hi:
        return

    WIDTH: tl.constexpr = HG * HEAD_DIM
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, WIDTH)
    offs_n = tl.arange(0, BLOCK_N)
    m_valid = offs_m < HG * GROUP
    heads = hg * HG * GROUP + offs_m  # the query head of each dot row
    col_head = offs_c // HEAD_DIM  # the kv head (within the group of HG) of each column
    col_dim = offs_c % HEAD_DIM
    diag = ((offs_m // GROUP)[:, None] == col_head[None, :]) & m_valid[:, None]  # [BLOCK_M, WIDTH]
    row64 = row.to(tl.int64)
    q = tl.load(q_ptr + row64 * stride_qt + heads[:, None] * stride_qh + col_dim[None, :], mask=diag,
                other=0.0).to(TILE)  # block-diagonal
    # Column offsets inside one token's slot: the HG kv heads' vectors (one contiguous run when stride_kh == D).
    k_col = (hg * HG + col_head) * stride_kh + col_dim
    v_col = (hg * HG + col_head) * stride_vh + col_dim
    bt_row = bt_ptr + row64 * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, WIDTH], tl.float32)
    for tile in range(tile_lo, tile_hi):
        tok = tile * BLOCK_N + offs_n
        valid = tok < seq_len
        page = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
        slot = tok % PAGE
        k = tl.load(k_ptr + (page * stride_kb + slot * stride_kt)[:, None] + k_col[None, :], mask=valid[:, None],
                    other=0.0, eviction_policy=EVICT)
        v = tl.load(v_ptr + (page * stride_vb + slot * stride_vt)[:, None] + v_col[None, :], mask=valid[:, None],
                    other=0.0, eviction_policy=EVICT)
        # Scores [BLOCK_M, BLOCK_N]: every tile holds >= 1 valid token; padding rows (q = 0) score 0, stay finite.
        m_i, l_i, acc = attend_tile(q, tl.trans(k.to(q.dtype)), v.to(q.dtype), valid[None, :], m_i, l_i, acc,
                                    scale_log2, PRECISION)
    acc = acc / l_i[:, None]
    if DIRECT:
        tl.store(out_ptr + row64 * stride_ot + heads[:, None] * stride_oh + col_dim[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=diag)
    else:
        tl.store(po_ptr + row64 * stride_pot + heads[:, None] * stride_poh + split * stride_pos + col_dim[None, :],
                 acc, mask=diag)
        tl.store(plse_ptr + row64 * stride_plt + heads * stride_plh + split, m_i + tl.log2(l_i), mask=m_valid)


def default_head_group(kv_heads: int, group: int) -> int:
    """kv heads per program when the caller gives none: enough query heads for 16 dot rows, at most all."""
    head_group = 1
    while head_group * 2 * group <= 16 and kv_heads % (head_group * 2) == 0:
        head_group *= 2
    return head_group


def decode_packed(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, out: torch.Tensor, scale: float, num_splits: int | None,
    workspace: DecodeWorkspace | None, block_n: int | None, num_warps: int, num_stages: int, kv_evict: str,
    page: int, group: int, head_group: int | None, tile: tl.dtype, strides: tuple[int, ...],
) -> torch.Tensor:
    """``decode_attention(variant="packed")``; inputs are already checked. ``head_group``: kv heads per program (a
    power of two dividing ``num_kv_heads``); ``None`` packs enough for 16 dot rows (``16 // GROUP``, at most all)."""
    rows, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if head_group is None:
        head_group = default_head_group(kv_heads, group)
    if head_group < 1 or head_group & (head_group - 1) or kv_heads % head_group:
        raise AttentionInputError(f"head_group must be a power of two dividing num_kv_heads ({kv_heads}), got "
                                  f"{head_group}")
    if block_n is None:
        block_n = 32 if q.device.type == "cuda" else 16
    check_block_n(block_n)
    programs = kv_heads // head_group
    num_splits = check_splits(default_num_splits(rows, programs, q.device) if num_splits is None else num_splits)
    direct, po, plse, partial_strides = split_outputs(out, workspace, num_splits)
    _decode_packed_kernel[(rows, programs, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, po, plse, scale * LOG2E, *strides, *partial_strides,
        GROUP=group, HG=head_group, BLOCK_M=dot_rows(group * head_group), HEAD_DIM=head_dim, PAGE=page,
        BLOCK_N=block_n, DIRECT=direct, PRECISION=dot_precision(q.dtype, q.device), EVICT=kv_evict, TILE=tile,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not direct:
        reduce_splits(seq_lens, out, po, plse, partial_strides, num_splits, block_n)
    return out
