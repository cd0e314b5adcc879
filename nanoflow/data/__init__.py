"""Request datasets for the offline runner and benchmarks: files (JSONL, ShareGPT, LMSYS-Chat-1M, Splitwise trace),
synthetic length distributions (paper Table 4), multi-round conversations and a bundled prompt sample."""

from __future__ import annotations

from nanoflow.data.datasets import (
    ACCEPTED_SPECS,
    DEFAULT_SYNTHETIC_REQUESTS,
    TABLE4_DISTRIBUTIONS,
    DatasetError,
    DatasetItem,
    DatasetResult,
    LengthDistribution,
    SkippedRow,
    load_dataset,
    summarize_lengths,
)
from nanoflow.data.synthetic import sample_lengths

__all__ = [
    "ACCEPTED_SPECS",
    "DEFAULT_SYNTHETIC_REQUESTS",
    "TABLE4_DISTRIBUTIONS",
    "DatasetError",
    "DatasetItem",
    "DatasetResult",
    "LengthDistribution",
    "SkippedRow",
    "load_dataset",
    "sample_lengths",
    "summarize_lengths",
]
