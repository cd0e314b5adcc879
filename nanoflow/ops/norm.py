"""RMSNorm, alone and fused with the residual add (the ``attn_norm`` / ``ffn_norm`` ops)."""

from __future__ import annotations

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
