"""Helpers shared by the device benchmark scripts (run as ``python scripts/device/<name>.py``: this folder is on
``sys.path`` then)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import triton


def bench_ms(fn: Callable[[], object], dry_run: bool, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds (CUDA events via ``triton.testing.do_bench``); a dry run times one call on the host."""
    if dry_run:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())
