"""GpuMonitor's sampling and summary, driven by a scripted reading function (no GPU)."""

from __future__ import annotations

import time

import pytest

from nanoflow.bench.gpu_monitor import GpuMonitor, nvml_reader, reason_names


def test_summary_of_scripted_samples() -> None:
    readings = iter([(1980.0, 3201.0, 350.0, 0x0), (1755.0, 3201.0, 699.0, 0x4), (1600.0, 3201.0, 700.0, 0x4 | 0x8),
                     (1800.0, 3201.0, 650.0, 0x4)])
    last = (1800.0, 3201.0, 650.0, 0x4)
    with GpuMonitor(interval_s=0.001, read=lambda: next(readings, last)) as mon:
        deadline = time.monotonic() + 5
        while len(mon.samples) < 6 and time.monotonic() < deadline:
            time.sleep(0.002)
    s = mon.summary()
    n = s["samples"]
    assert n >= 6 and len(mon.samples) == n
    assert s["sm_mhz"]["max"] == 1980.0 and s["sm_mhz"]["min"] == 1600.0 and s["sm_mhz"]["median"] == 1800.0
    assert s["power_w"]["max"] == 700.0 and s["mem_mhz"] == {"median": 3201.0, "min": 3201.0, "max": 3201.0}
    # the power cap was set in every sample but the first; hw_slowdown in exactly one
    assert s["reasons"] == {"hw_slowdown": pytest.approx(1 / n), "sw_power_cap": pytest.approx((n - 1) / n)}
    assert [x.t for x in mon.samples] == sorted(x.t for x in mon.samples)
    assert "temp_c" not in s  # the scripted reader gives no temperature
    assert len(s["sm_mhz_by_tenth"]) == min(10, n) and s["sm_mhz_by_tenth"][-1] == 1800.0


def test_temperature_and_drift_by_tenth() -> None:
    """A clock falling and a temperature rising through the run show in the per-tenth medians."""
    from nanoflow.bench.gpu_monitor import Sample, by_tenth

    assert by_tenth([float(i) for i in range(20)]) == [0.5 + 2 * i for i in range(10)]
    assert by_tenth([3.0, 1.0]) == [3.0, 1.0]
    mon = GpuMonitor(read=lambda: (0.0, 0.0, 0.0, 0))
    mon.samples = [Sample(i * 0.1, 1980.0 - 10 * i, 2619.0, 600.0, 0, 50.0 + i) for i in range(30)]
    s = mon.summary()
    assert s["temp_c"] == {"median": 64.5, "min": 50.0, "max": 79.0}
    assert s["temp_c_by_tenth"] == [51.0 + 3 * i for i in range(10)]
    assert s["sm_mhz_by_tenth"] == [1970.0 - 30 * i for i in range(10)]


def test_reason_names_and_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    assert reason_names(0) == []
    assert reason_names(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert reason_names(0x1000 | 0x1) == ["gpu_idle", "0x1000"]
    with pytest.raises(ValueError, match="interval_s"):
        GpuMonitor(interval_s=0, read=lambda: (0.0, 0.0, 0.0, 0))
    assert GpuMonitor(read=lambda: (0.0, 0.0, 0.0, 0)).summary() == {"samples": 0}
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(RuntimeError, match="pip install nvidia-ml-py"):
        nvml_reader(0)


def test_bench_records_and_prints_each_modes_clocks(monkeypatch: pytest.MonkeyPatch, capsys, caplog) -> None:
    """`nanoflow bench` samples the clocks over each mode's timed run; without NVML (or a GPU) it warns and goes on."""
    from nanoflow.bench import throughput
    from nanoflow.bench.cli import _print_row

    monkeypatch.setattr(throughput.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr("nanoflow.bench.gpu_monitor.nvml_reader",
                        lambda i: (_ for _ in ()).throw(RuntimeError("pip install nvidia-ml-py")))
    assert throughput.clock_monitor() is None
    assert "nvidia-ml-py" in caplog.text
    mon = GpuMonitor(interval_s=0.001, read=lambda: (1545.0, 2619.0, 690.0, 0x4, 71.0))
    with mon:
        time.sleep(0.01)
    rec = {"mode": "overlap-searched", "throughput_tok_s": 25000.0, "pct_optimal": 53.8, "optimal_tok_s": 46606.0,
           "gpu_clocks": mon.summary()}
    _print_row(rec)
    assert "SM clock 1545 MHz, 690 W, 71 C" in capsys.readouterr().out
