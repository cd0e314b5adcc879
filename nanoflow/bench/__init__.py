"""Benchmarks: throughput (non-overlap / nano-batch / overlap / peer), GEMM peak, per-op profile."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The short HEAD commit of the checkout this package runs from, for result records; ``$NANOFLOW_COMMIT`` when
    set (a lent GPU machine's copy of the working tree may carry a stale ``.git``: pass the hash along with the
    command), "unknown" outside git."""
    if os.environ.get("NANOFLOW_COMMIT"):
        return os.environ["NANOFLOW_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
