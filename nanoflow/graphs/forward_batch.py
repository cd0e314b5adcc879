"""``BatchPlan`` -> ``ForwardBatch``: the device-side facts of one iteration.

Token layout of the dense batch: decode tokens first (one row per decode request, in plan order), then the prefill
chunks, then padding up to the batch's token capacity. Padding rows write their KV into the reserved null block 0
and belong to no attention segment.

Attention metadata is built per token range (the whole batch, or each nano-batch of the pipeline): a request whose
chunk straddles a nano-batch boundary becomes two segments, the second one seeing the first one's tokens as
context (they were stored into the pages by the first nano-batch's ``rope_kv``, which the executor orders before).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the CPU: pinned staging (PyTorch's caching host allocator) + async copy.

    A copy from pageable memory would wait for all earlier GPU work, defeating asynchronous scheduling.
    """
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class DecodeMeta:
    rows: int  # decode rows at the start of the range (the kernel's grid; rows past the real ones have seq_len 0)
    block_tables: torch.Tensor  # [rows, max_blocks] int32
    seq_lens: torch.Tensor  # [rows] int32, KV length including the current token
    host_seq_lens: list[int] | None = None  # for the eager torch backend
    host_block_tables: list[list[int]] | None = None
    num_splits: int | None = None
    workspace: Any = None
    max_programs: int | None = None  # persistent grid (resource knob); None = one program per (row, head, split)


@dataclass
class PrefillMeta:
    num_segments: int
    q_start: torch.Tensor  # [S] int32, row offsets relative to the range start
    q_len: torch.Tensor  # [S] int32
    ctx_len: torch.Tensor  # [S] int32, tokens of the request already in the cache before this segment
    block_tables: torch.Tensor  # [S, max_blocks] int32
    max_q_len: int  # static bound on q_len (the range width in graph mode)
    host: list[tuple[int, int, int, list[int]]] | None = None  # (q_start, q_len, ctx_len, blocks)


@dataclass
class RangeMeta:
    decode: DecodeMeta | None
    prefill: PrefillMeta | None


@dataclass
class ForwardBatch:
    num_tokens: int  # rows computed (>= real tokens; the rest is padding)
    num_real_tokens: int
    input_ids: torch.Tensor  # [T] int64; -1 = the request's token sampled last iteration (resolved on device)
    prev_index: torch.Tensor | None  # [T] int64 row into the previous iteration's samples for -1 entries
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    sample_rows: torch.Tensor  # [n] int64: row of the last token of each sampling sequence
    sample_request_ids: list[str]
    ranges: dict[tuple[int, int], RangeMeta] = field(default_factory=dict)
    staging_slot: int = 0  # which of the runner's two KV staging buffers kv_offload writes (KV offload only)

    def attn_meta(self, lo: int, hi: int) -> RangeMeta:
        meta = self.ranges.get((lo, hi))
        if meta is None:
            raise KeyError(f"no attention metadata for token range [{lo}, {hi}); built: {sorted(self.ranges)}")
        return meta


@dataclass
class HostSeq:
    """One sequence of the plan in host form (what the metadata builder needs)."""

    row: int  # first row in the dense batch
    start: int  # position of its first token
    num_tokens: int
    blocks: list[int]


def _table(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), max(width, 1)), dtype=np.int32)
    for i, blocks in enumerate(rows):
        out[i, : len(blocks)] = blocks
    return out


def build_range_meta(decode: list[HostSeq], prefill: list[HostSeq], lo: int, hi: int,
                     device: torch.device, keep_host: bool) -> RangeMeta:
    """Attention metadata of rows ``[lo, hi)``; ``decode`` seqs occupy rows 0..len(decode)-1 in order."""
    dec = decode[lo:hi]
    dmeta = None
    if dec:
        lens = [s.start + 1 for s in dec]
        tables = [s.blocks for s in dec]
        width = max(len(t) for t in tables)
        dmeta = DecodeMeta(
            rows=len(dec),
            block_tables=to_device(torch.from_numpy(_table(tables, width)), device),
            seq_lens=to_device(torch.tensor(lens, dtype=torch.int32), device),
            host_seq_lens=lens if keep_host else None,
            host_block_tables=tables if keep_host else None,
        )
    segs: list[tuple[int, int, int, list[int]]] = []
    for s in prefill:
        a, b = max(s.row, lo), min(s.row + s.num_tokens, hi)
        if a < b:
            segs.append((a - lo, b - a, s.start + (a - s.row), s.blocks))
    pmeta = None
    if segs:
        width = max(len(g[3]) for g in segs)
        pmeta = PrefillMeta(
            num_segments=len(segs),
            q_start=to_device(torch.tensor([g[0] for g in segs], dtype=torch.int32), device),
            q_len=to_device(torch.tensor([g[1] for g in segs], dtype=torch.int32), device),
            ctx_len=to_device(torch.tensor([g[2] for g in segs], dtype=torch.int32), device),
            block_tables=to_device(torch.from_numpy(_table([g[3] for g in segs], width)), device),
            max_q_len=max(g[1] for g in segs),
            host=segs if keep_host else None,
        )
    return RangeMeta(dmeta, pmeta)


def token_arrays(decode: list[HostSeq], prefill: list[HostSeq], block_size: int,
                 num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and KV slots of every row; padding rows get position 0 and slot 0 (the null block)."""
    positions = np.zeros(num_tokens, dtype=np.int64)
    slots = np.zeros(num_tokens, dtype=np.int64)
    for s in decode:
        positions[s.row] = s.start
        slots[s.row] = s.blocks[s.start // block_size] * block_size + s.start % block_size
    for s in prefill:
        pos = np.arange(s.start, s.start + s.num_tokens, dtype=np.int64)
        blocks = np.asarray(s.blocks, dtype=np.int64)
        positions[s.row:s.row + s.num_tokens] = pos
        slots[s.row:s.row + s.num_tokens] = blocks[pos // block_size] * block_size + pos % block_size
    return positions, slots
