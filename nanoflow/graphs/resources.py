"""Resource knobs that turn a nano-op's share R into something the GPU obeys.

- ``grid``: the decode-attention kernel runs a persistent grid of ``programs(R)`` programs, so it occupies about
  R of the SMs and a concurrent GEMM of another nano-batch gets the rest. GEMMs keep cuBLAS's own grid.
- ``partition``: both sides bounded. Decode attention as in ``grid``; a COMPUTE nano-op with share R < 1 is launched
  with cuBLASLt's SM-count target set to R of the SMs (torch's SM carve-out, read when the GEMM is launched, so a
  captured graph keeps it). cuBLAS's Hopper GEMMs are persistent: without a target they start one CTA per SM and the
  SMs held by attention delay whole waves (measured with ``grid``); with it the two kernels split the SMs.
- ``green``: every stream of the pipeline is created inside a CUDA green context holding about R_max of the SMs
  (``torch.cuda.green_contexts``), a hard partition; kernels captured from those streams keep it in the graph.
  Measured on an H100 (LLaMA-3-8B, 1,024 requests): 0.85x the non-overlapped engine, since decode attention's
  speed is proportional to its SMs (benchmarks/results/2026-12-06-s9-green-decode-h100.json).
- ``none``: plain streams (the GPU's block scheduler decides; measured on an H200: a GEMM launched first takes every
  SM, so "overlap" degenerates to back-to-back execution).
Stream priorities: the memory/network streams are created with high priority so their blocks are dispatched first
when both are ready.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("nanoflow")

KNOBS = ("grid", "partition", "green", "none")


@dataclass(frozen=True)
class ResourceConfig:
    knob: str = "grid"
    ctas_per_sm: int = 2  # decode programs per SM of its share (the kernel fits several CTAs per SM)
    min_programs: int = 8
    min_gemm_sms: int = 16

    def __post_init__(self) -> None:
        if self.knob not in KNOBS:
            raise ValueError(f"resource knob {self.knob!r} is unknown; use one of {', '.join(KNOBS)}")


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_programs(share: float, device: torch.device, cfg: ResourceConfig) -> int | None:
    """Persistent-grid size for a decode nano-op holding ``share`` of the GPU; None = the full default grid."""
    if cfg.knob not in ("grid", "partition") or share >= 1.0 or device.type != "cuda":
        return None
    return max(cfg.min_programs, round(share * sm_count(device) * cfg.ctas_per_sm))


def gemm_carveout(share: float, device: torch.device, cfg: ResourceConfig) -> int | None:
    """SMs a COMPUTE nano-op holding ``share`` leaves to others (the ``partition`` knob); None = no target."""
    if cfg.knob != "partition" or share >= 1.0 or device.type != "cuda":
        return None
    total = sm_count(device)
    return total - min(total, max(cfg.min_gemm_sms, round(share * total)))


class sm_target:
    """Context manager: GEMMs launched inside target ``sm_count - carveout`` SMs (cuBLASLt ``SM_COUNT_TARGET``).

    Torch applies the carve-out on its cuBLASLt path, so the preferred BLAS backend is switched to cuBLASLt for the
    duration as well; both settings are restored on exit. ``carveout=None`` does nothing.
    """

    def __init__(self, carveout: int | None):
        self.carveout = carveout

    def __enter__(self) -> sm_target:
        if self.carveout is not None:
            self._prev = (torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library())
            torch.backends.cuda.preferred_blas_library("cublaslt")
            torch._C._set_sm_carveout_experimental(self.carveout)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.carveout is not None:
            torch._C._set_sm_carveout_experimental(self._prev[0])
            torch.backends.cuda.preferred_blas_library(self._prev[1])


def make_streams(spec: Any, device: torch.device, cfg: ResourceConfig) -> list[torch.cuda.Stream]:
    """One stream per pipeline stream; green-context streams when ``cfg.knob == "green"`` and supported."""
    n = spec.num_streams
    shares = [max((nop.share for nop in spec.nano_ops if nop.stream == s), default=1.0) for s in range(n)]
    if cfg.knob == "green":
        streams = _green_streams(shares, device)
        if streams is not None:
            return streams
        log.warning("green contexts unavailable in this torch build; falling back to plain streams")
    # Stream 0 carries the GEMMs; the others (memory, network) get high priority so their few blocks start first.
    return [torch.cuda.Stream(device=device, priority=0 if s == 0 else -1) for s in range(n)]


def _green_streams(shares: list[float], device: torch.device) -> list[torch.cuda.Stream] | None:
    try:
        from torch.cuda.green_contexts import GreenContext
    except ImportError:
        return None
    total = sm_count(device)
    streams = []
    contexts = []
    for share in shares:
        # SM partitions come in granules (8 on Hopper); round to one and keep at least one granule.
        sms = max(8, min(total, int(round(share * total / 8)) * 8))
        try:
            ctx = GreenContext.create(num_sms=sms, device_id=device.index or 0)
        except TypeError:
            ctx = GreenContext.create(sms, device.index or 0)
        except RuntimeError as exc:
            log.warning("green context with %d SMs failed: %s", sms, exc)
            return None
        contexts.append(ctx)
        streams.append(ctx.Stream())
    # A stream does not keep its green context alive: hold the contexts as long as the streams live.
    for stream, ctx in zip(streams, contexts):
        stream.green_context = ctx  # type: ignore[attr-defined]
    return streams
