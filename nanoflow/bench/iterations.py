"""Where a timed run's wall time goes, iteration by iteration: GPU time of each step and GPU idle time between steps.

A profile of one dense batch says how long a full step takes; the run's throughput also depends on how full the
batches are over the run (ramp-up, the decode-only tail), on whether the CPU keeps the GPU fed, and on whether the
GPU keeps its clocks through a long run. :class:`IterationTimer` wraps ``runner.execute`` with two CUDA events per
step (recorded on the stream, so they cost no synchronisation):

* ``step_ms[i]``: from the moment the GPU reaches step i's start event to its end event (inputs, layers, sampling);
* ``gap_ms[i]``: from step i-1's end event to step i's start event. The start event is recorded when the CPU enqueues
  step i; if the GPU was still busy with step i-1 it completes right after it (gap ~0), otherwise the GPU sat idle
  waiting for the CPU for ``gap_ms[i]``.

:func:`summarize` turns the per-step lists into the record's figures; it is pure, so it is tested on the CPU.
"""

from __future__ import annotations

from statistics import median
from typing import Any

TRACE_DECIMALS = 2


class IterationTimer:
    """Install on an engine's runner for the timed run; ``summary()`` after the run has finished."""

    def __init__(self, runner: Any) -> None:
        import torch

        self._torch = torch
        self._runner = runner
        self._execute = runner.execute
        self._own_attr = "execute" in vars(runner)  # set on the instance before us (else it is the class's method)
        self._steps: list[tuple[int, int, Any, Any]] = []

    def __enter__(self) -> IterationTimer:
        self._runner.execute = self._timed
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._own_attr:
            self._runner.execute = self._execute
        else:
            del self._runner.execute

    def _timed(self, plan: Any, sampling: Any, *args: Any, **kwargs: Any) -> Any:
        start = self._torch.cuda.Event(enable_timing=True)
        start.record()
        result = self._execute(plan, sampling, *args, **kwargs)
        end = self._torch.cuda.Event(enable_timing=True)
        end.record()
        self._steps.append((plan.num_tokens, plan.num_decode_tokens, start, end))
        return result

    def summary(self, dense_batch: int) -> dict[str, Any]:
        """Synchronises, then :func:`summarize` over every step timed so far."""
        self._torch.cuda.synchronize()
        steps = self._steps
        step_ms = [s.elapsed_time(e) for _, _, s, e in steps]
        gap_ms = [0.0] + [max(0.0, steps[i - 1][3].elapsed_time(steps[i][2])) for i in range(1, len(steps))]
        return summarize([t for t, *_ in steps], [d for _, d, *_ in steps], step_ms, gap_ms, dense_batch)


def summarize(tokens: list[int], decode: list[int], step_ms: list[float], gap_ms: list[float],
              dense_batch: int) -> dict[str, Any]:
    """The run's GPU busy and idle seconds, full-batch step times (and their drift from the first to the last
    quarter of the run), the throughput the run would have at full batches only, and the per-step trace."""
    n = len(tokens)
    if not (n == len(decode) == len(step_ms) == len(gap_ms)):
        raise ValueError(f"per-step lists differ in length: {n}, {len(decode)}, {len(step_ms)}, {len(gap_ms)}")
    out: dict[str, Any] = {"steps": n, "gpu_busy_s": sum(step_ms) / 1e3, "gpu_idle_s": sum(gap_ms) / 1e3}
    full = [i for i in range(n) if tokens[i] == dense_batch]
    out["full_steps"] = len(full)
    out["tokens_in_full_steps"] = dense_batch * len(full)
    out["tokens_in_partial_steps"] = sum(tokens) - dense_batch * len(full)
    out["partial_steps_s"] = sum(step_ms[i] + gap_ms[i] for i in range(n) if tokens[i] != dense_batch) / 1e3
    if full:
        full_ms = [step_ms[i] for i in full]
        out["full_step_ms_median"] = median(full_ms)
        out["full_step_tok_s"] = dense_batch / median(full_ms) * 1e3
        q = max(1, len(full) // 4)
        out["full_step_ms_first_quarter"] = median(full_ms[:q])
        out["full_step_ms_last_quarter"] = median(full_ms[-q:])
        out["full_step_decode_tokens_median"] = median(decode[i] for i in full)
    r = TRACE_DECIMALS
    out["trace"] = {"tokens": list(tokens), "decode_tokens": list(decode),
                    "step_ms": [round(x, r) for x in step_ms], "gap_ms": [round(x, r) for x in gap_ms]}
    return out


def plot_iterations(records: list[dict[str, Any]], path: Any) -> None:
    """Per mode: each step's GPU ms (dots, coloured by its decode share) and the idle ms before it, over the run."""
    runs = [r for r in records if (r.get("iterations_timed") or {}).get("trace")]
    if not runs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 3.2 * len(runs)), squeeze=False)
    for ax, rec in zip(axes[:, 0], runs):
        it = rec["iterations_timed"]
        tr = it["trace"]
        x = range(len(tr["step_ms"]))
        share = [d / t if t else 0.0 for d, t in zip(tr["decode_tokens"], tr["tokens"])]
        sc = ax.scatter(x, tr["step_ms"], c=share, s=4, cmap="viridis", vmin=0, vmax=1, label="GPU ms of the step")
        ax.plot(x, tr["gap_ms"], color="crimson", lw=0.8, label="GPU idle ms before the step")
        ax.set_ylabel("ms")
        ax.set_title(f"{rec.get('label', rec['mode'])}: {rec['throughput_tok_s']:,.0f} tok/s; GPU busy "
                     f"{it['gpu_busy_s']:.1f} s, idle {it['gpu_idle_s']:.1f} s of {rec['wall_s']:.1f} s", fontsize=10)
        ax.legend(fontsize=8, loc="upper right")
        fig.colorbar(sc, ax=ax, label="decode share of the batch")
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
