"""Helpers shared by the device benchmark scripts (run as ``python scripts/device/<name>.py``: this folder is on
``sys.path`` then)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
import triton

from nanoflow.bench import git_commit

DRY_RUN_DEVICE = "cpu (TRITON_INTERPRET dry run)"


def report_header(device: str | None = None) -> dict:
    """The fields a device script's JSON report starts with (benchmarks/results/README.md; result tooling reads them):
    ``device`` (default: the current CUDA device's name), the torch and triton versions, the ``commit`` of this
    checkout and the ``command`` line."""
    return {"device": torch.cuda.get_device_name() if device is None else device, "torch": torch.__version__,
            "triton": triton.__version__, "commit": git_commit(), "command": " ".join(sys.argv)}


def bench_ms(fn: Callable[[], object], dry_run: bool, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds (CUDA events via ``triton.testing.do_bench``); a dry run times one call on the host."""
    if dry_run:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())
