"""Accelerator specifications: the paper's Table 1, addressable by short name.

Every row is one accelerator as the paper lists it (§3.3, Table 1). The columns are per device:

- ``mem_gb``: memory capacity in GB (10^9 bytes);
- ``mem_bw_gbps``: memory bandwidth in GB/s;
- ``net_bw_gbps``: interconnect bandwidth in GB/s *as the vendor quotes it*, i.e. both directions together
  (NVLink 3 on an A100: 600 GB/s = 300 GB/s each way). The cost model uses :attr:`GPUSpec.net_bw_one_way_gbps`,
  half of it, as the paper's footnote 4 says it does for T_net;
- ``fp16_gflops``: dense FP16 tensor-core throughput in GFLOP/s.

The derived ratios (:attr:`GPUSpec.mem_size_over_bw_s`, :attr:`GPUSpec.compute_over_mem_bw`,
:attr:`GPUSpec.net_over_mem_bw`) are the last three columns of Table 1. The paper's printed ratios agree with the
raw columns except MemSize/MemBW of the H200 (prints 0.020; 141/4800 = 0.029), B100 and B200 (print 0.015;
192/8000 = 0.024): we compute the ratios from the raw columns and do not copy those three values.

Short names are matched case-insensitively with spaces, ``-`` and ``_`` ignored and an optional vendor prefix
dropped, so ``"A100-80GB"``, ``"a100_80gb"`` and ``"nvidia a100 80gb"`` name the same row. ``"a100"`` alone means
the 80 GB part, the one the paper evaluates on (§6.1) and whose bandwidth reproduces Table 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType


class UnknownGPUError(ValueError):
    """A GPU short name not in the table; the message lists the names that are."""


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator (one row of Table 1). All quantities are per device and positive."""

    name: str
    vendor: str
    model: str
    year: int
    mem_gb: float
    mem_bw_gbps: float
    net_bw_gbps: float
    fp16_gflops: float

    def __post_init__(self) -> None:
        for field_name in ("mem_gb", "mem_bw_gbps", "net_bw_gbps", "fp16_gflops"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"GPUSpec {self.name!r}: {field_name} must be positive")

    @property
    def net_bw_one_way_gbps(self) -> float:
        """Bandwidth in one direction: half the quoted (bidirectional) figure; what T_net uses (paper footnote 4)."""
        return self.net_bw_gbps / 2

    @property
    def mem_size_over_bw_s(self) -> float:
        """MemSize / MemBW in seconds: the time to read the whole memory once, i.e. eq. (1)'s T_mem."""
        return self.mem_gb / self.mem_bw_gbps

    @property
    def compute_over_mem_bw(self) -> float:
        """Compute / MemBW in FLOP per byte: the arithmetic intensity at which a kernel stops being memory-bound."""
        return self.fp16_gflops / self.mem_bw_gbps

    @property
    def net_over_mem_bw(self) -> float:
        """NetBW / MemBW (quoted, bidirectional network bandwidth, as Table 1 divides it)."""
        return self.net_bw_gbps / self.mem_bw_gbps


# Table 1 of the paper, in its order. Names are the canonical short names the CLI accepts.
_TABLE1: tuple[GPUSpec, ...] = (
    GPUSpec("v100", "NVIDIA", "V100", 2017, 16, 900, 300, 125_000),
    GPUSpec("a100-40gb", "NVIDIA", "A100 40GB", 2020, 40, 1_555, 600, 312_000),
    GPUSpec("a100-80gb", "NVIDIA", "A100 80GB", 2021, 80, 2_000, 600, 312_000),
    GPUSpec("h100", "NVIDIA", "H100", 2023, 80, 3_352, 900, 989_000),
    GPUSpec("h200", "NVIDIA", "H200", 2024, 141, 4_800, 900, 989_000),
    GPUSpec("b100", "NVIDIA", "B100", 2024, 192, 8_000, 1_800, 1_800_000),
    GPUSpec("b200", "NVIDIA", "B200", 2024, 192, 8_000, 1_800, 2_250_000),
    GPUSpec("mi250", "AMD", "MI250", 2021, 128, 3_352, 800, 362_000),
    GPUSpec("mi300", "AMD", "MI300", 2023, 192, 5_300, 1_024, 1_307_000),
    GPUSpec("mi325x", "AMD", "MI325X", 2024, 256, 6_000, 1_024, 1_307_000),
    GPUSpec("gaudi2", "Intel", "Gaudi 2", 2022, 96, 2_400, 600, 1_000_000),
    GPUSpec("gaudi3", "Intel", "Gaudi 3", 2024, 128, 3_700, 1_200, 1_800_000),
    GPUSpec("ada6000", "NVIDIA", "Ada 6000", 2022, 48, 960, 64, 182_000),
)

_ALIASES = {"a100": "a100-80gb", "a10040g": "a100-40gb", "a10080g": "a100-80gb", "mi300x": "mi300"}
_VENDOR_PREFIXES = ("nvidia", "amd", "intel", "habana")


def _key(name: str) -> str:
    key = re.sub(r"[\s_\-]", "", name.lower())
    for prefix in _VENDOR_PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            key = key[len(prefix) :]
    return key


GPUS: MappingProxyType[str, GPUSpec] = MappingProxyType({g.name: g for g in _TABLE1})
"""Canonical short name -> spec, in Table 1 order (read-only)."""

_BY_KEY = MappingProxyType(
    {**{_key(g.name): g for g in _TABLE1}, **{_key(a): GPUS[target] for a, target in _ALIASES.items()}}
)


def known_gpu_names() -> list[str]:
    """Canonical short names, in Table 1 order."""
    return list(GPUS)


def get_gpu(name: str) -> GPUSpec:
    """The Table 1 row named ``name`` (case-insensitive; spaces, ``-``, ``_`` and a vendor prefix ignored).

    Raises:
        UnknownGPUError: no row matches; the message lists the known names.
    """
    spec = _BY_KEY.get(_key(name))
    if spec is None:
        raise UnknownGPUError(
            f"unknown GPU {name!r}; known GPUs (paper Table 1): {', '.join(known_gpu_names())} "
            "(\"a100\" means a100-80gb)"
        )
    return spec
