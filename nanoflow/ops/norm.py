"""RMSNorm, alone and fused with the residual add (the ``attn_norm`` / ``ffn_norm`` ops)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` computed in fp32, returned in ``x.dtype`` (as Hugging Face LLaMA does)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rms_norm(residual + hidden), residual + hidden)``; the sum is the new residual stream."""
    new_residual = residual + hidden
    return rms_norm(new_residual, weight, eps), new_residual


def add_rms_norm_into(hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                      out: torch.Tensor, op: Callable = add_rms_norm) -> None:
    """``op`` (:func:`add_rms_norm`) written in place: ``out`` gets the normalised sum, ``residual`` the sum.

    Compiled (``graphs.glue``), the stores land in the callers' buffers from the fused kernel itself, where copying a
    returned tensor would add a device-to-device copy per output.
    """
    x, new_residual = op(hidden, residual, weight, eps)
    out.copy_(x)
    residual.copy_(new_residual)
