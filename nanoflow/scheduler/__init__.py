"""CPU-side scheduling: requests, the paged KV block manager and dense-batch formation (no torch, no kernels).

``Request`` (CPU state) -> ``Scheduler.schedule()`` -> ``BatchPlan`` (tokens per request, decode first) -> the
runner's ``ForwardBatch`` -> sampled ids -> ``Scheduler.update()``.
"""

from __future__ import annotations

from nanoflow.scheduler.batcher import BatchPlan, ScheduledSeq, Scheduler
from nanoflow.scheduler.kv_cache import NULL_BLOCK, BlockAllocationError, BlockManager, blocks_for_tokens
from nanoflow.scheduler.memory import DenseBatchPlan, dense_batch_from_memory
from nanoflow.scheduler.request import Request, RequestStatus, SamplingParams

__all__ = [
    "NULL_BLOCK",
    "BatchPlan",
    "BlockAllocationError",
    "BlockManager",
    "DenseBatchPlan",
    "Request",
    "RequestStatus",
    "SamplingParams",
    "ScheduledSeq",
    "Scheduler",
    "blocks_for_tokens",
    "dense_batch_from_memory",
]
