"""Per-nano-op timing with CUDA events (a profiling pass, run eagerly — events cannot be read inside a graph).

``Executor(timeline=Timeline())`` records an event pair around every nano-op launch on the stream it runs on. After
a synchronize, :meth:`Timeline.records` gives ``(stream, layer, op, lo, hi, start_ms, end_ms)`` relative to the
first event, from which the benchmark sums time per op class and draws the measured Gantt chart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OpRecord:
    stream: str
    layer: int
    op: str
    lo: int
    hi: int
    start_ms: float
    end_ms: float

    @property
    def ms(self) -> float:
        return self.end_ms - self.start_ms


class Timeline:
    def __init__(self) -> None:
        self._open: list[tuple[str, int, str, int, int, torch.cuda.Event, torch.cuda.Event]] = []
        self._current: tuple | None = None
        self._origin: torch.cuda.Event | None = None

    def mark_origin(self) -> None:
        self._origin = torch.cuda.Event(enable_timing=True)
        self._origin.record()

    def begin(self, layer: int, op: str, lo: int, hi: int, stream: str) -> None:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        self._current = (stream, layer, op, lo, hi, start)

    def end(self) -> None:
        assert self._current is not None
        stop = torch.cuda.Event(enable_timing=True)
        stop.record()
        self._open.append((*self._current, stop))
        self._current = None

    def records(self) -> list[OpRecord]:
        torch.cuda.synchronize()
        if not self._open:
            return []
        origin = self._origin or self._open[0][5]
        return [OpRecord(s, layer, op, lo, hi, origin.elapsed_time(a), origin.elapsed_time(b))
                for s, layer, op, lo, hi, a, b in self._open]

    def clear(self) -> None:
        self._open.clear()
        self._origin = None
