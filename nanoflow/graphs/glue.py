"""torch.compile'd versions of the small element-wise ops (norm + residual, SiLU*mul, RoPE + KV store).

Used only inside CUDA-graph capture, where every shape is fixed, so each (op, shape) compiles once during warm-up.
``--no-compile`` runs the same functions uncompiled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from nanoflow.models.layers import rope_qkv
from nanoflow.ops.activation import silu_and_mul
from nanoflow.ops.norm import add_rms_norm


def compiled_glue(dynamic: bool = False) -> dict[str, Callable[..., Any]]:
    """The glue ops compiled per shape (``dynamic=False``, the engine's CUDA graphs) or once for every row count
    (``dynamic=True``: the profiler, which times each op at many sizes and must not compile each of them)."""
    opts = {"dynamic": dynamic, "fullgraph": False}
    return {
        "add_rms_norm": torch.compile(add_rms_norm, **opts),
        "silu_and_mul": torch.compile(silu_and_mul, **opts),
        "rope_qkv": torch.compile(rope_qkv, **opts),
    }


class CompileTimer:
    """Wall time spent in warm-up runs (dominated by torch.compile on the first shapes)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> CompileTimer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._t0
