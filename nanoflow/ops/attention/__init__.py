"""Paged attention over the KV cache: split-KV decode and chunked-prefill (extend) kernels in Triton.

Layout contract and float64 oracles: :mod:`nanoflow.ops.attention.reference`.
"""

from __future__ import annotations

from nanoflow.ops.attention.decode import decode_attention
from nanoflow.ops.attention.prefill import prefill_attention
from nanoflow.ops.attention.reference import AttentionInputError, decode_attention_ref, prefill_attention_ref
from nanoflow.ops.attention.split_kv import DecodeWorkspace, decode_workspace, default_num_splits

__all__ = [
    "AttentionInputError",
    "DecodeWorkspace",
    "decode_attention",
    "decode_attention_ref",
    "decode_workspace",
    "default_num_splits",
    "prefill_attention",
    "prefill_attention_ref",
]
