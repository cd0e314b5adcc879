"""Benchmarks: throughput (non-overlap / nano-batch / overlap / peer), GEMM peak, per-op profile."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    """The short HEAD commit of the checkout this package runs from, for result records; "unknown" outside git
    (e.g. the copy of the working tree on a lent GPU machine)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
