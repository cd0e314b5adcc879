"""Attention backends behind one interface (``decode`` / ``prefill`` over a token range's metadata).

- ``triton``: our paged Triton kernels; graph-capturable (reads only device tensors). The GPU default.
- ``torch``: plain torch over gathered pages, using host-side copies of the metadata; eager only. The CPU default
  (Triton runs on a CPU only through its slow interpreter).

A flash-attn backend would slot in here with the same two methods; flash-attn has no wheels for the lent GPUs'
torch, so none ships (see README).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from nanoflow.config import DECODE_OPTION_KEYS, DECODE_VARIANTS

log = logging.getLogger(__name__)


class TorchAttention:
    """Reference-speed attention for CPUs: batched decode over padded gathered pages, per-segment prefill."""

    name = "torch"

    def __init__(self, scale: float, block_size: int):
        self.scale = scale
        self.block_size = block_size

    def _slots(self, meta: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Built once per range and iteration, then reused by every layer.
        cached = getattr(meta, "_torch_slots", None)
        if cached is not None:
            return cached
        lens = meta.host_seq_lens
        width = max(lens)
        idx = torch.zeros(len(lens), width, dtype=torch.int64)
        for i, (n, blocks) in enumerate(zip(lens, meta.host_block_tables)):
            pos = torch.arange(n)
            idx[i, :n] = torch.tensor(blocks, dtype=torch.int64)[pos // self.block_size] * self.block_size \
                + pos % self.block_size
        mask = torch.arange(width)[None, :] < torch.tensor(lens)[:, None]
        meta._torch_slots = (idx.to(device), mask.to(device))
        return meta._torch_slots

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any,
               out: torch.Tensor) -> None:
        idx, mask = self._slots(meta, q.device)
        n, heads, dim = q.shape
        kv_heads = k_cache.shape[-2]
        k = k_cache.view(-1, kv_heads, dim)[idx].to(q.dtype).transpose(1, 2)  # [n, kvh, L, d]; float8 widened
        v = v_cache.view(-1, kv_heads, dim)[idx].to(q.dtype).transpose(1, 2)
        # One query per row; SDPA's fused CPU kernel (GQA heads share their kv head) beats einsum + softmax by ~25%.
        res = F.scaled_dot_product_attention(q.view(n, heads, 1, dim), k, v, attn_mask=mask[:, None, None, :],
                                             scale=self.scale, enable_gqa=heads != kv_heads)
        out.copy_(res.view(n, heads, dim))

    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any,
                out: torch.Tensor, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> None:
        """``k_new``/``v_new`` ``[T, KV, D]`` (both or neither): the new tokens' K/V rows, used for them instead of
        the pages (as the Triton kernel does; see ``prefill_attention``)."""
        kv_heads, dim = k_cache.shape[-2], k_cache.shape[-1]
        heads = q.shape[1]
        kf, vf = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
        for q_start, q_len, ctx_len, blocks in meta.host:
            total = ctx_len + q_len
            pos = torch.arange(ctx_len if k_new is not None else total)
            slots = torch.tensor(blocks, dtype=torch.int64)[pos // self.block_size] * self.block_size \
                + pos % self.block_size
            slots = slots.to(q.device)
            k = kf[slots].to(q.dtype)  # [L, kvh, d]; float8 widened
            v = vf[slots].to(q.dtype)
            if k_new is not None:
                k = torch.cat([k, k_new[q_start:q_start + q_len]])
                v = torch.cat([v, v_new[q_start:q_start + q_len]])
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # [kvh, L, d]
            qs = q[q_start:q_start + q_len].transpose(0, 1)  # [h, q, d]
            allowed = torch.arange(total, device=q.device)[None, :] <= (
                ctx_len + torch.arange(q_len, device=q.device)[:, None])
            res = F.scaled_dot_product_attention(qs, k, v, attn_mask=allowed, scale=self.scale,
                                                 enable_gqa=heads != kv_heads)
            out[q_start:q_start + q_len].copy_(res.transpose(0, 1))


class TritonAttention:
    """The paged Triton kernels of ``nanoflow.ops.attention``; reads only device tensors (graph-capturable).

    ``decode_variant`` picks the decode kernel (``"split"``: one program per (row, kv head); ``"row"``: one program per
    row over all kv heads, whole-page tiles; ``"row_flat"``: the same with 2-D dots over flattened heads;
    ``"packed"``: one per (row, group of kv heads), their query heads as the rows of block-diagonal dots;
    ``"cuda"``: the hand-written CUDA kernel for float8 caches, ``decode_cuda.py``; see ``decode.py``).
    ``decode_options`` are extra keyword arguments of :func:`~nanoflow.ops.attention.decode.decode_attention`
    (``block_n``, ``num_warps``, ``num_stages``, ``kv_evict``), e.g. the best config of
    ``scripts/device/interference.py``.

    ``batch_invariant``: each row's result independent of the batch it runs in (``ops.batch_invariant``): decode on
    the split kernel with one split per row and one tile config (:func:`invariant_decode_options`), so rows computed
    by the split and by the persistent (grid-bounded) kernel agree; prefill with fixed tiles over the pages
    (``prefill_attention(batch_invariant=True)``).
    """

    name = "triton"

    def __init__(self, scale: float, block_size: int, num_splits: int | None = None, decode_variant: str = "split",
                 decode_options: dict[str, Any] | None = None, batch_invariant: bool = False):
        if batch_invariant:
            if decode_variant != "split" or decode_options or num_splits not in (None, 1):
                raise ValueError("batch_invariant fixes the decode kernel (the split variant, one split, fixed "
                                 f"tiles); got decode_variant {decode_variant!r}, decode_options {decode_options}, "
                                 f"num_splits {num_splits}")
            num_splits = 1
        self.batch_invariant = batch_invariant
        if decode_variant not in DECODE_VARIANTS:
            raise ValueError(f"decode_variant must be one of {DECODE_VARIANTS}, got {decode_variant!r}")
        allowed = {*DECODE_OPTION_KEYS, "kv_evict"}
        unknown = set(decode_options or {}) - allowed
        if unknown:
            raise ValueError(f"decode_options may set {sorted(allowed)}, got {sorted(unknown)}")
        self.scale = scale
        self.block_size = block_size
        self.num_splits = num_splits
        self.decode_variant = decode_variant
        self.decode_options = dict(decode_options or {})

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any,
               out: torch.Tensor) -> None:
        from nanoflow.ops.attention.decode import decode_attention

        options = invariant_decode_options(q.device) if self.batch_invariant else self.decode_options
        decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, out, self.scale,
                         num_splits=self.num_splits if self.batch_invariant else meta.num_splits or self.num_splits,
                         workspace=meta.workspace, max_programs=meta.max_programs, variant=self.decode_variant,
                         **options)

    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any,
                out: torch.Tensor, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> None:
        from nanoflow.ops.attention.prefill import prefill_attention

        if self.batch_invariant:  # the new tokens from the pages (stored by rope_kv), tiles at absolute positions
            k_new = v_new = None
        prefill_attention(q, k_cache, v_cache, out, meta.q_start, meta.q_len, meta.ctx_len, meta.block_tables,
                          self.scale, meta.max_q_len, k_new=k_new, v_new=v_new, batch_invariant=self.batch_invariant)


def invariant_decode_options(device: torch.device) -> dict[str, int]:
    """The decode tiles of batch-invariant mode, the same for every batch (the kernel's defaults depend on whether
    the grid is bounded); float8 and 16-bit caches alike. The interpreter gets small tiles for tiny tests."""
    if device.type != "cuda":
        return {"block_n": 16, "num_warps": 4}
    return {"block_n": 64, "num_warps": 4, "num_stages": 2}


def resolve_decode_variant(variant: str, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                           page: int, options: dict[str, Any] | None = None,
                           q_dtype: torch.dtype = torch.bfloat16) -> str:
    """``variant``, or for ``"auto"``: ``"cuda"`` (the hand-written kernel, +3.7% end to end over the Triton one on an
    H100 with a float8 cache) where it can serve this cache and a ``q_dtype`` query and build, else ``"split"``
    (also when ``options`` set Triton tiles). The reason is logged."""
    if variant != "auto":
        return variant
    if k_cache.device.type != "cuda" or set(options or {}) - {"num_stages", "kv_evict"}:
        return "split"
    from nanoflow.ops.attention.decode_cuda import unavailable_reason

    why = unavailable_reason(k_cache, v_cache, num_heads, page, q_dtype, (options or {}).get("num_stages"))
    if why is None:
        log.info("decode attention: the CUDA kernel (decode_variant auto)")
        return "cuda"
    log.info("decode attention: the Triton split kernel (decode_variant auto; the CUDA kernel does not apply: %s)",
             why.split("; use a Triton")[0])
    return "split"


def make_backend(name: str, scale: float, block_size: int, decode_variant: str = "split",
                 decode_options: dict[str, Any] | None = None,
                 batch_invariant: bool = False) -> TorchAttention | TritonAttention:
    """``decode_variant``/``decode_options`` configure the Triton decode kernel; the torch backend ignores them.
    ``batch_invariant`` needs the Triton backend."""
    if name == "torch":
        if batch_invariant:
            raise ValueError("batch-invariant attention runs the Triton kernels: use the triton backend (on a CPU "
                             "only under TRITON_INTERPRET=1, for tests)")
        return TorchAttention(scale, block_size)
    if name == "triton":
        return TritonAttention(scale, block_size, decode_variant=decode_variant, decode_options=decode_options,
                               batch_invariant=batch_invariant)
    raise ValueError(f"unknown attention backend {name!r}; use 'triton' or 'torch'")
