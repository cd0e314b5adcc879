"""SwiGLU activation on the fused gate/up projection (the ``act`` op)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up = [gate | up]`` along the last dimension."""
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


def silu_and_mul_into(gate_up: torch.Tensor, out: torch.Tensor, op: Callable = silu_and_mul) -> None:
    """``op`` (:func:`silu_and_mul`) written into ``out`` (compiled, by the fused kernel itself: no extra copy)."""
    out.copy_(op(gate_up))
