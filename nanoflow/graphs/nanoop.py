"""Operations and nano-operations: the unit the executor, the pipeline spec and the auto-search share.

A decoder layer is declared by its model file as a :class:`LayerGraph`: a topologically ordered list of
:class:`Op`. Each op names the buffers it reads and writes and the resource it is bound by; its ``run`` callable
computes rows ``[lo, hi)`` of its outputs from rows ``[lo, hi)`` of its inputs (token-local ops) and writes into
preallocated buffers, so that nano-operations of one op over disjoint token ranges never touch the same memory and
can run on different CUDA streams inside one CUDA graph.

Dependency rule (paper §4.1.2): nano-op (A, [a0, a1)) precedes nano-op (B, [b0, b1)) iff B reads a buffer A writes
and the two token ranges intersect. An input marked *cross-token* (the paged KV cache read by attention) is read
for every earlier token of the same requests, so B then depends on every nano-op of A whose range starts before b1.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class ResourceKind(enum.Enum):
    """What bounds an op's speed; ops of different kinds are the ones worth overlapping."""

    COMPUTE = "compute"
    MEMORY = "memory"
    NETWORK = "network"
    OTHER = "other"
    COPY = "copy"
    """Device <-> host traffic on the copy engines (PCIe/NVLink-C2C), not SMs: such nano-ops are left out of the
    pipeline's share budget (see ``PipelineSpec``), and a spec that lacks them gets them on a copy stream."""


RunFn = Callable[[Any, int, int], None]
"""``run(ctx, lo, hi)``: compute token rows ``[lo, hi)``; ``ctx`` is the executor's per-layer context."""


@dataclass(frozen=True)
class Op:
    name: str
    kind: ResourceKind
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    run: RunFn | None = field(default=None, compare=False, repr=False)
    cross_token_reads: tuple[str, ...] = ()
    """Subset of ``reads`` that are read for all earlier tokens of a request, not only the op's own rows."""


@dataclass(frozen=True)
class LayerGraph:
    """One decoder layer as ops in a valid sequential order.

    ``layer_input`` is the buffer the first op reads that the previous layer's last writer produced (the wrap from
    layer l into layer l+1).
    """

    ops: tuple[Op, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for op in self.ops:
            if op.name in seen:
                raise ValueError(f"op name {op.name!r} appears twice in the layer graph")
            seen.add(op.name)
            bad = set(op.cross_token_reads) - set(op.reads)
            if bad:
                raise ValueError(f"op {op.name!r}: cross_token_reads {sorted(bad)} are not among its reads")

    def op(self, name: str) -> Op:
        for op in self.ops:
            if op.name == name:
                return op
        raise KeyError(f"no op named {name!r}; ops: {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [op.name for op in self.ops]

    def producers(self, consumer: Op) -> list[Op]:
        """Ops earlier in this layer that write a buffer ``consumer`` reads.

        Several ops may write disjoint rows of one buffer (decode and prefill attention both write ``attn``), so
        every earlier writer counts, not only the last.
        """
        idx = self.ops.index(consumer)
        return [prev for prev in self.ops[:idx] if set(prev.writes) & set(consumer.reads)]

    def edges(self) -> list[tuple[str, str]]:
        """Op-level dependency edges (producer, consumer) inside one layer."""
        return [(p.name, op.name) for op in self.ops for p in self.producers(op)]

    def with_ops(self, ops: Sequence[Op]) -> LayerGraph:
        return LayerGraph(tuple(ops))


def ranges_intersect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def nano_depends(producer: Op, p_range: tuple[int, int], consumer: Op, c_range: tuple[int, int]) -> bool:
    """The paper's rule, extended for cross-token reads (see module docstring)."""
    shared = set(producer.writes) & set(consumer.reads)
    if not shared:
        return False
    if shared & set(consumer.cross_token_reads):
        return p_range[0] < c_range[1]
    return ranges_intersect(p_range, c_range)
