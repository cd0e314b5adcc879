"""The paper's analytical cost model (§3): hardware table, per-operation costs, T_R and optimal throughput.

Pure arithmetic on a :class:`~nanoflow.config.ModelSpec` and a :class:`GPUSpec`; imports no other nanoflow
package (no torch), so it runs anywhere. ``cli`` holds the ``nanoflow analyze`` subcommand.
"""

from __future__ import annotations

from nanoflow.analysis.cost_model import (
    OP_NAMES,
    TABLE2_WORKLOAD,
    WORKLOADS,
    AnalysisError,
    Bottleneck,
    CostReport,
    MemoryPlan,
    OpCost,
    Workload,
    analyze,
    kv_bytes_per_token,
    memory_plan,
    op_costs,
    optimal_throughput,
    parse_workload,
)
from nanoflow.analysis.hardware import GPUS, GPUSpec, UnknownGPUError, get_gpu, known_gpu_names

__all__ = [
    "GPUS",
    "OP_NAMES",
    "TABLE2_WORKLOAD",
    "WORKLOADS",
    "AnalysisError",
    "Bottleneck",
    "CostReport",
    "GPUSpec",
    "MemoryPlan",
    "OpCost",
    "UnknownGPUError",
    "Workload",
    "analyze",
    "get_gpu",
    "known_gpu_names",
    "kv_bytes_per_token",
    "memory_plan",
    "op_costs",
    "optimal_throughput",
    "parse_workload",
]
