"""Sample a GPU's clocks, power and clock-event reasons while a workload runs (NVML through ``nvidia-ml-py``).

Why a pair of overlapped kernels runs slower than its parts says whether overlap can ever pay on a GPU: if the SM
clock drops or the power cap engages when a GEMM and decode attention run together, the chip is power-bound and no
partition of SMs helps; if the clocks hold, the loss is contention for HBM / L2 and a partition or a kernel that
needs fewer SMs for the same bandwidth can help. :class:`GpuMonitor` answers that for any stretch of work::

    with GpuMonitor(device_index=0) as mon:
        ...  # sustained work
    mon.summary()  # median SM / memory clock (MHz), power (W), the clock-event reasons seen

The reading function is injectable (``read=``) so the sampling and summarising logic is tested without a GPU.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple


class Sample(NamedTuple):
    t: float  # seconds since the monitor started
    sm_mhz: float
    mem_mhz: float
    power_w: float
    reasons: int  # NVML clock-event (throttle) reason bits
    temp_c: float = float("nan")  # GPU core temperature (a reader may leave it out)


# NVML's clock-event reason bits (nvml.h, nvmlClocksEventReason*), named for the report.
REASON_NAMES = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}


def reason_names(bits: int) -> list[str]:
    """The names of the set reason bits (unknown bits as hex)."""
    names = [name for bit, name in REASON_NAMES.items() if bits & bit]
    rest = bits & ~sum(REASON_NAMES)
    return names + ([hex(rest)] if rest else [])


Reading = tuple[float, float, float, int] | tuple[float, float, float, int, float]


def nvml_reader(device_index: int) -> Callable[[], Reading]:
    """A reading function for :class:`GpuMonitor` over NVML. Raises RuntimeError naming what to install when
    NVML is not available (the ``nvidia-ml-py`` package, imported as ``pynvml``)."""
    try:
        import pynvml
    except ImportError as e:
        raise RuntimeError("GPU clock monitoring needs NVML's Python binding: pip install nvidia-ml-py") from e
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
    reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        pynvml.nvmlDeviceGetCurrentClocksThrottleReasons

    def read() -> Reading:
        return (float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
                pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, int(reasons(handle)),
                float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)))

    return read


class GpuMonitor:
    """Samples ``read()`` every ``interval_s`` on a background thread between ``start()`` and ``stop()`` (or as a
    context manager). ``read`` returns ``(sm_mhz, mem_mhz, power_w, reason_bits[, temp_c])``; default: NVML of
    ``device_index``."""

    def __init__(self, device_index: int = 0, interval_s: float = 0.005,
                 read: Callable[[], Reading] | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._read = read if read is not None else nvml_reader(device_index)
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def start(self) -> GpuMonitor:
        if self._thread is not None:
            raise RuntimeError("GpuMonitor already started")
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="nanoflow-gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> GpuMonitor:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _loop(self) -> None:
        while True:
            self.samples.append(Sample(time.perf_counter() - self._t0, *self._read()))
            if self._stop.wait(self.interval_s):
                return

    def summary(self) -> dict[str, Any]:
        """Medians and ranges of the samples, and every clock-event reason seen with the share of samples it was
        set in (e.g. ``{"sw_power_cap": 0.93}``: the power cap held the clocks down 93% of the time). With
        temperatures read, also ``temp_c``; and ``sm_mhz_by_tenth`` / ``temp_c_by_tenth``: the medians over each
        tenth of the samples, to show a clock or temperature drifting through a long run."""
        s = self.samples
        if not s:
            return {"samples": 0}

        def stats(values: list[float]) -> dict[str, float]:
            return {"median": statistics.median(values), "min": min(values), "max": max(values)}

        seen: dict[str, int] = {}
        for sample in s:
            for name in reason_names(sample.reasons):
                seen[name] = seen.get(name, 0) + 1
        out: dict[str, Any] = {
            "samples": len(s), "seconds": s[-1].t - s[0].t, "sm_mhz": stats([x.sm_mhz for x in s]),
            "mem_mhz": stats([x.mem_mhz for x in s]), "power_w": stats([x.power_w for x in s]),
            "reasons": {name: count / len(s) for name, count in sorted(seen.items())},
            "sm_mhz_by_tenth": by_tenth([x.sm_mhz for x in s])}
        temps = [x.temp_c for x in s if not math.isnan(x.temp_c)]
        if len(temps) == len(s):
            out["temp_c"] = stats(temps)
            out["temp_c_by_tenth"] = by_tenth(temps)
        return out


def by_tenth(values: list[float]) -> list[float]:
    """Medians of ``values`` cut into ten consecutive, nearly equal parts (fewer parts when there are fewer than ten
    values)."""
    n = len(values)
    parts = min(10, n)
    return [statistics.median(values[i * n // parts:(i + 1) * n // parts]) for i in range(parts)]
