"""torch.compile'd versions of the small element-wise ops (norm + residual, SiLU*mul, RoPE, the MoE combine).

Each writes its results into the caller's buffers (the ``*_into`` functions), so the fused kernel stores them
itself: returning tensors and copying them into the buffers cost six device-to-device copies per layer
(``memcpy128`` in the profiles: 3.2 ms of a 2,048-token Mixtral step on an H200, s7-bench-fp8kv-tma-h200-mixtral).

Used inside CUDA-graph capture: compiled during each graph's warm-up, the kernels are then replayed.
``--no-compile`` runs the same functions uncompiled.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from nanoflow.models.layers import rope_qkv, rope_qkv_into
from nanoflow.ops.activation import silu_and_mul, silu_and_mul_into
from nanoflow.ops.moe import combine_into, combine_weighted_into
from nanoflow.ops.norm import add_rms_norm, add_rms_norm_into

log = logging.getLogger("nanoflow")


def compiled_glue(dynamic: bool | None = None) -> dict[str, Callable[..., Any]]:
    """The glue ops compiled for the engine's CUDA graphs (``dynamic=None``) or once for every row count
    (``dynamic=True``: the profiler, which times each op at many sizes and must not compile each of them).

    ``None`` is torch.compile's automatic dynamic shapes: the first shape an op meets (the first bucket captured)
    gets a kernel specialised to it, and the second a kernel whose row count is symbolic, which then serves every
    other bucket and nano-batch size; the hidden sizes stay static. Until session 15 the engine compiled each shape
    statically (``dynamic=False``). Dynamo keeps at most ``recompile_limit`` (8) compiled versions per function, for
    every ``torch.compile`` wrapper of it in the process together, and runs the function *eagerly* for each further
    shape: with 12 token buckets, and more shapes with nano-batches, the later buckets ran eager glue, and an engine
    built after another in the same process (``nanoflow bench``'s second mode) ran eager glue at every shape the first
    had not compiled. On an H100 that took the sequential pipeline's full step from 67.0 to 79.3 ms when it ran
    after the overlap preset (s15-bench-*). The dicts are built once per process and per ``dynamic``, so engines
    share their compiled ops.

    Should inductor fail to compile an in-place form (its C++ backend does on ``add_rms_norm_into``, torch 2.13),
    that op falls back to the compiled out-of-place form plus copies (the MoE combine: to the eager op), with a
    warning, instead of failing the engine.
    """
    return dict(_compiled_glue(dynamic))


@functools.cache
def _compiled_glue(dynamic: bool | None) -> dict[str, Callable[..., Any]]:
    opts = {"dynamic": dynamic, "fullgraph": False}
    glue = {name: _or_fallback(torch.compile(fn, **opts), fn, name, "the eager op")
            for name, fn in (("moe_combine_into", combine_into), ("moe_combine_weighted_into", combine_weighted_into))}
    for into, op in ((add_rms_norm_into, add_rms_norm), (silu_and_mul_into, silu_and_mul), (rope_qkv_into, rope_qkv)):
        # Fallback: the same *_into function run eagerly around the compiled out-of-place op (its copies separate).
        fallback = partial(into, op=torch.compile(op, **opts))
        glue[into.__name__] = _or_fallback(torch.compile(into, **opts), fallback, into.__name__)
    return glue


def recompile_limit_hits() -> int:
    """How often dynamo has reported, in this process, giving up on compiling a function at ``recompile_limit``
    (from then on it runs eagerly at every shape it has no compiled version for); 0 when the glue compiled for
    every shape it met."""
    from torch._dynamo.utils import counters

    return sum(n for reason, n in counters["unimplemented"].items() if "recompile limit" in reason.lower())


def profiling_glue(runner: Any) -> dict[str, Callable[..., Any]]:
    """The glue a forward outside the engine's CUDA graphs runs (the search's profiler and its verify step): the
    ops compiled once for every row count on a GPU (eager on a CPU), under the runner's own (the fused RoPE + KV
    write), so each op is timed as the engine's graphs run it."""
    return {**(compiled_glue(dynamic=True) if runner.device.type == "cuda" else {}), **runner.glue}


def _or_fallback(first: Callable[..., Any], fallback: Callable[..., Any], name: str,
                 fallback_is: str = "the compiled out-of-place form plus copies") -> Callable[..., Any]:
    """``first``, switching to ``fallback`` for good when compiling ``first`` fails (before it ran anything)."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    current = [first]

    def call(*args: Any) -> Any:
        try:
            return current[0](*args)
        except (InductorError, BackendCompilerFailed) as exc:
            if current[0] is fallback:
                raise
            log.warning("torch.compile of %s failed (%s); using %s", name, str(exc).splitlines()[0][:200],
                        fallback_is)
            current[0] = fallback
            return fallback(*args)

    return call


class CompileTimer:
    """Wall time spent in warm-up runs (dominated by torch.compile on the first shapes)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> CompileTimer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._t0
