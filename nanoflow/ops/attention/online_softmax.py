"""The online-softmax step and result store every decode-attention kernel (split, persistent, row, row_flat) runs on
its K/V tiles, and the padding of query-head groups to ``tl.dot`` operand rows."""

from __future__ import annotations

import triton
import triton.language as tl

from nanoflow.ops.tile_dot import tile_dot

LOG2E = 1.4426950408889634


def dot_rows(n: int) -> int:
    """Rows of a ``tl.dot`` operand holding ``n`` query heads: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def attend_tile(q, kt, v, keep, m_i, l_i, acc, scale_log2, PRECISION: tl.constexpr):
    """One online-softmax step over a K/V tile: ``q [..., M, D]``, ``kt [..., D, N]`` (K transposed),
    ``v [..., N, D]``, where ``...`` are optional batch dims (the row kernel's kv heads); ``keep`` (broadcast to
    ``[..., M, N]``) says which scores count. Returns the new ``(m_i, l_i, acc)``: ``[..., M]``, ``[..., M]``,
    ``[..., M, D]``. Every row must keep >= 1 score of the tile, so the new maximum is finite and exp2 never sees
    (-inf) - (-inf)."""
    s = tile_dot(q, kt, PRECISION) * scale_log2
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, -1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - tl.expand_dims(m_new, -1))
    l_i = l_i * alpha + tl.sum(p, -1)
    acc = acc * tl.expand_dims(alpha, -1) + tile_dot(p.to(v.dtype), v, PRECISION)
    return m_new, l_i, acc


@triton.jit
def store_result(
    out_ptr, po_ptr, plse_ptr, row64, split, heads, mask, m_i, l_i, acc,
    stride_ot, stride_oh,
    stride_pot, stride_poh, stride_pos,
    stride_plt, stride_plh,
    HEAD_DIM: tl.constexpr, DIRECT: tl.constexpr,
):
    """Store a work item's result for query ``heads`` of row ``row64`` (``heads`` and ``mask``, which of them are real
    rather than padding, of any shape ``S``; ``m_i, l_i`` of ``S`` and ``acc`` of ``S + [HEAD_DIM]`` as
    :func:`attend_tile` leaves them): with DIRECT the normalised output into ``out``, otherwise split ``split``'s
    normalised partial output and its log-sum-exp into the workspace."""
    offs_d = tl.arange(0, HEAD_DIM)
    acc = acc / tl.expand_dims(l_i, -1)
    if DIRECT:
        tl.store(out_ptr + row64 * stride_ot + tl.expand_dims(heads, -1) * stride_oh + offs_d,
                 acc.to(out_ptr.dtype.element_ty), mask=tl.expand_dims(mask, -1))
    else:
        po = po_ptr + row64 * stride_pot + tl.expand_dims(heads, -1) * stride_poh + split * stride_pos + offs_d
        tl.store(po, acc, mask=tl.expand_dims(mask, -1))
        tl.store(plse_ptr + row64 * stride_plt + heads * stride_plh + split, m_i + tl.log2(l_i), mask=mask)
