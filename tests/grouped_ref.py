"""Independent references for the grouped GEMM tests: per-expert float64 products over the routed rows."""

from __future__ import annotations

import torch


def offsets_of(counts: list[int], device: str = "cpu") -> torch.Tensor:
    """``[0, c0, c0 + c1, ...]`` int32: the ``[E+1]`` offsets of row counts per expert."""
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device)


def reference(x: torch.Tensor, counts: list[int], w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """float64 per-expert products over the routed rows only (``sum(counts)`` rows)."""
    outs, lo = [], 0
    for e, c in enumerate(counts):
        y = x[lo:lo + c].double() @ w[e].double().t()
        outs.append(y if scale is None else y * scale[lo:lo + c, None].double())
        lo += c
    return torch.cat(outs)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-30))
