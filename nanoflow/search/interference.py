"""Interference profiling (paper §4.1.1, Table 3): a GEMM and decode attention run at the same time.

For each way of sharing the GPU — the decode kernel's persistent grid (``programs``) or green-context SM partitions —
the pair is launched on two streams and each kernel's time is read from events on its own stream. The performance
of a kernel is ``P = t_alone / t_concurrent`` and its resource share ``R`` is the fraction of the GPU it held; the
GEMM's R is ``1 - R_decode`` (by definition, Table 3). Keeping the non-dominated pairs gives the R -> P table the
stage-II MILP consumes, plus the pair's speedup over running the two back to back.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def _events_time(fns: list[tuple[torch.cuda.Stream, Any]], repeat: int = 10) -> tuple[list[float], float]:
    """Launch each fn on its stream at the same time; median per-stream ms and the pair's total ms."""
    origin = torch.cuda.current_stream()
    per: list[list[float]] = [[] for _ in fns]
    totals: list[float] = []
    for it in range(repeat + 2):
        start = torch.cuda.Event(enable_timing=True)
        start.record(origin)
        ends = []
        for stream, fn in fns:
            stream.wait_event(start)
            with torch.cuda.stream(stream):
                fn()
                e = torch.cuda.Event(enable_timing=True)
                e.record(stream)
            ends.append(e)
        for e in ends:
            origin.wait_event(e)
        done = torch.cuda.Event(enable_timing=True)
        done.record(origin)
        done.synchronize()
        if it >= 2:
            for i, e in enumerate(ends):
                per[i].append(start.elapsed_time(e))
            totals.append(start.elapsed_time(done))
    return [statistics.median(p) for p in per], statistics.median(totals)


def _pair_inputs(tokens: int, hidden: int, inter: int, decode_rows: int, ctx: int, heads: int, kv_heads: int,
                 head_dim: int, device: torch.device, block_size: int) -> tuple[torch.Tensor, ...]:
    """bf16 operands of one pair: the gate/up GEMM's ``x, w, y`` and paged decode attention's ``q``, caches, a
    shuffled block table, lengths and ``out`` (every row ``ctx`` tokens long)."""
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dt, generator=g)
    w = torch.randn(2 * inter, hidden, device=device, dtype=dt, generator=g) * 0.02
    y = torch.empty(tokens, 2 * inter, device=device, dtype=dt)
    pages = -(-ctx // block_size)
    nblocks = decode_rows * pages + 1
    kc = torch.randn(nblocks, block_size, kv_heads, head_dim, device=device, dtype=dt, generator=g)
    vc = torch.randn_like(kc)
    table = (torch.randperm(nblocks - 1, device=device)[: decode_rows * pages] + 1).view(decode_rows, pages).int()
    lens = torch.full((decode_rows,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(decode_rows, heads, head_dim, device=device, dtype=dt, generator=g)
    return x, w, y, q, kc, vc, table, lens, torch.empty_like(q)


def gemm_decode_pairs(tokens: int, hidden: int, inter: int, decode_rows: int, ctx: int, heads: int, kv_heads: int,
                      head_dim: int, programs: list[int], green_sms: list[int], device: torch.device,
                      block_size: int = 16, decode_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure GEMM (``tokens x hidden -> 2*inter``, the gate/up projection) beside paged decode attention.

    ``decode_cfg``: extra keyword arguments of ``decode_attention`` (e.g. ``{"variant": "row"}``)."""
    decode_cfg = dict(decode_cfg or {})
    from nanoflow.ops.attention.decode import decode_attention

    x, w, y, q, kc, vc, table, lens, out = _pair_inputs(tokens, hidden, inter, decode_rows, ctx, heads, kv_heads,
                                                        head_dim, device, block_size)
    sms = torch.cuda.get_device_properties(device).multi_processor_count

    def gemm() -> None:
        torch.mm(x, w.t(), out=y)

    def dec(p: int | None) -> Any:
        return lambda: decode_attention(q, kc, vc, table, lens, out, head_dim**-0.5, num_splits=1, max_programs=p,
                                        **decode_cfg)

    s_hi = torch.cuda.Stream(device=device, priority=-1)
    s_lo = torch.cuda.Stream(device=device, priority=0)
    (t_gemm,), _ = _events_time([(s_lo, gemm)])
    (t_dec_full,), _ = _events_time([(s_hi, dec(None))])
    rows = []
    for p in programs:
        (t_dec_alone,), _ = _events_time([(s_hi, dec(p))])
        (t_d, t_g), total = _events_time([(s_hi, dec(p)), (s_lo, gemm)])
        r_dec = min(1.0, p / (2 * sms))
        rows.append({"knob": "grid", "programs": p, "R_decode": r_dec, "t_decode_alone_ms": t_dec_alone,
                     "t_decode_ms": t_d, "t_gemm_ms": t_g, "t_pair_ms": total,
                     "P_decode": t_dec_full / t_d, "P_gemm": t_gemm / t_g,
                     "speedup_vs_serial": (t_gemm + t_dec_full) / total})
    for n in green_sms:
        try:
            from torch.cuda.green_contexts import GreenContext

            gd = GreenContext.create(num_sms=n, device_id=device.index or 0)
            gg = GreenContext.create(num_sms=sms - n, device_id=device.index or 0)
            sd, sg = gd.Stream(), gg.Stream()
            (t_d, t_g), total = _events_time([(sd, dec(None)), (sg, gemm)])
            (t_ga,), _ = _events_time([(sg, gemm)])
            (t_da,), _ = _events_time([(sd, dec(None))])
            rows.append({"knob": "green", "decode_sms": n, "R_decode": n / sms, "t_decode_ms": t_d, "t_gemm_ms": t_g,
                         "t_pair_ms": total, "t_gemm_partition_alone_ms": t_ga, "t_decode_partition_alone_ms": t_da,
                         "P_decode": t_dec_full / t_d, "P_gemm": t_gemm / t_g,
                         "speedup_vs_serial": (t_gemm + t_dec_full) / total})
        except Exception as exc:  # green contexts are beta: record why, keep the rest
            rows.append({"knob": "green", "decode_sms": n, "error": repr(exc)})
    return {"gemm_shape": [tokens, hidden, 2 * inter], "decode": {"rows": decode_rows, "ctx": ctx, "heads": heads,
            "kv_heads": kv_heads, "head_dim": head_dim, "config": decode_cfg}, "sms": sms, "t_gemm_alone_ms": t_gemm,
            "t_decode_alone_ms": t_dec_full, "serial_ms": t_gemm + t_dec_full, "pairs": rows}


def partition_pairs(tokens: int, hidden: int, inter: int, decode_rows: int, ctx: int, heads: int, kv_heads: int,
                    head_dim: int, decode_sms: list[int], ctas_per_sm: list[int], configs: list[dict[str, Any]],
                    device: torch.device, block_size: int = 16) -> dict[str, Any]:
    """The ``partition`` knob: the GEMM targets ``sms - k`` SMs (cuBLASLt carve-out), decode attention runs a
    persistent grid of ``c * k`` programs, for every k in ``decode_sms`` and c in ``ctas_per_sm``.

    ``configs`` are decode-kernel settings (``block_n``, ``num_stages``, ``num_warps``, ``kv_evict``, ``variant``:
    any keyword of ``decode_attention``, passed through unchanged) tried alone at every grid; the pair uses the best
    one for that grid. Also records the GEMM alone per carve-out and backend, so
    the GEMM's R -> P curve and the decode kernel's are both visible.
    """
    from nanoflow.graphs.resources import sm_target
    from nanoflow.ops.attention.decode import decode_attention

    x, w, y, q, kc, vc, table, lens, out = _pair_inputs(tokens, hidden, inter, decode_rows, ctx, heads, kv_heads,
                                                        head_dim, device, block_size)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    kv_bytes = 2 * decode_rows * ctx * kv_heads * head_dim * kc.element_size()
    s_hi = torch.cuda.Stream(device=device, priority=-1)
    s_lo = torch.cuda.Stream(device=device, priority=0)

    def gemm(carveout: int | None) -> Any:
        def fn() -> None:
            with sm_target(carveout):
                torch.mm(x, w.t(), out=y)
        return fn

    def dec(programs: int | None, cfg: dict[str, Any]) -> Any:
        return lambda: decode_attention(q, kc, vc, table, lens, out, head_dim**-0.5, max_programs=programs, **cfg)

    def alone(fn: Any, stream: torch.cuda.Stream) -> float:
        return _events_time([(stream, fn)])[0][0]

    t_gemm = alone(gemm(None), s_lo)
    t_dec = alone(dec(None, {}), s_hi)
    gemm_rows = [{"backend": "default", "gemm_sms": sms, "t_ms": t_gemm},
                 {"backend": "cublaslt", "gemm_sms": sms, "t_ms": alone(gemm(0), s_lo)}]
    gemm_alone = {}
    for k in decode_sms:
        gemm_alone[k] = alone(gemm(k), s_lo)
        gemm_rows.append({"backend": "cublaslt", "gemm_sms": sms - k, "t_ms": gemm_alone[k],
                          "P": t_gemm / gemm_alone[k]})
    decode_rows_out = [{"programs": None, "config": "split-default", "t_ms": t_dec, "tb_s": kv_bytes / t_dec / 1e9}]
    for cfg in configs:
        try:
            t = alone(dec(None, cfg), s_hi)
            decode_rows_out.append({"programs": None, "config": cfg, "t_ms": t, "tb_s": kv_bytes / t / 1e9})
        except Exception as exc:  # a config the device cannot run (shared memory): record it, keep the rest
            decode_rows_out.append({"programs": None, "config": cfg, "error": repr(exc)[:200]})
    pairs = []
    for k in decode_sms:
        for c in ctas_per_sm:
            p = c * k
            best: tuple[float, dict[str, Any]] | None = None
            for cfg in configs:
                try:
                    t = alone(dec(p, cfg), s_hi)
                except Exception as exc:
                    decode_rows_out.append({"programs": p, "config": cfg, "error": repr(exc)[:200]})
                    continue
                decode_rows_out.append({"programs": p, "config": cfg, "t_ms": t, "tb_s": kv_bytes / t / 1e9})
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best is None:
                continue
            (t_d, t_g), total = _events_time([(s_hi, dec(p, best[1])), (s_lo, gemm(k))])
            pairs.append({"knob": "partition", "decode_sms": k, "programs": p, "config": best[1], "R_decode": k / sms,
                          "t_decode_alone_ms": best[0], "t_gemm_alone_ms": gemm_alone[k], "t_decode_ms": t_d,
                          "t_gemm_ms": t_g, "t_pair_ms": total, "P_decode": t_dec / t_d, "P_gemm": t_gemm / t_g,
                          "speedup_vs_serial": (t_gemm + t_dec) / total})
    return {"gemm_shape": [tokens, hidden, 2 * inter], "decode": {"rows": decode_rows, "ctx": ctx, "heads": heads,
            "kv_heads": kv_heads, "head_dim": head_dim, "kv_bytes": kv_bytes}, "sms": sms,
            "t_gemm_alone_ms": t_gemm, "t_decode_alone_ms": t_dec, "serial_ms": t_gemm + t_dec,
            "gemm_alone": gemm_rows, "decode_alone": decode_rows_out, "pairs": pairs}


def sustained_clocks(tokens: int, hidden: int, inter: int, decode_rows: int, ctx: int, heads: int, kv_heads: int,
                     head_dim: int, programs: int | None, device: torch.device, seconds: float = 2.0,
                     block_size: int = 16, read: Any = None) -> dict[str, Any]:
    """GEMM alone, decode attention alone (on the persistent grid of ``programs`` the pair uses, and on the full
    grid) and the pair, each run back to back for ``seconds`` while :class:`~nanoflow.bench.gpu_monitor.GpuMonitor`
    samples the SM / memory clocks, power and clock-event reasons: whether the pair's slowdown comes with lower clocks
    (power-bound) or not (HBM / L2 contention). ``read``: the monitor's reading function (default NVML)."""
    from nanoflow.bench.gpu_monitor import GpuMonitor
    from nanoflow.ops.attention.decode import decode_attention

    x, w, y, q, kc, vc, table, lens, out = _pair_inputs(tokens, hidden, inter, decode_rows, ctx, heads, kv_heads,
                                                        head_dim, device, block_size)
    s_hi = torch.cuda.Stream(device=device, priority=-1)
    s_lo = torch.cuda.Stream(device=device, priority=0)

    def gemm() -> None:
        torch.mm(x, w.t(), out=y)

    def dec(p: int | None) -> Any:
        return lambda: decode_attention(q, kc, vc, table, lens, out, head_dim**-0.5, num_splits=1, max_programs=p)

    # "decode" runs on the pair's grid, so pair_vs_serial compares the same work; "decode_full" on the full grid.
    phases = {"gemm": [(s_lo, gemm)], "decode": [(s_hi, dec(programs))], "decode_full": [(s_hi, dec(None))],
              "pair": [(s_hi, dec(programs)), (s_lo, gemm)]}
    origin = torch.cuda.current_stream(device)

    def launch(fns: list[tuple[torch.cuda.Stream, Any]], iters: int) -> float:
        """``iters`` iterations of the phase (its kernels start together each time); ms per iteration."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(origin)
        for _ in range(iters):
            ready = torch.cuda.Event()
            ready.record(origin)
            for stream, fn in fns:
                stream.wait_event(ready)
                with torch.cuda.stream(stream):
                    fn()
                done = torch.cuda.Event()
                done.record(stream)
                origin.wait_event(done)
        end.record(origin)
        end.synchronize()
        return start.elapsed_time(end) / iters

    report: dict[str, Any] = {"gemm_shape": [tokens, hidden, 2 * inter], "decode": {"rows": decode_rows, "ctx": ctx,
                              "programs": programs}, "seconds": seconds}
    monitor_args = {"device_index": device.index or 0} if read is None else {"read": read}
    with GpuMonitor(**monitor_args) as idle:
        time.sleep(min(0.5, seconds))
    report["idle"] = idle.summary()
    for name, fns in phases.items():
        per_iter = launch(fns, 3)  # warm-up, and the size of a batch of about 50 ms
        batch = max(1, int(50.0 / max(per_iter, 1e-3)))
        times = []
        with GpuMonitor(**monitor_args) as mon:
            began = time.perf_counter()
            while time.perf_counter() - began < seconds:
                times.append(launch(fns, batch))
        report[name] = {"ms_per_iter": statistics.median(times), "iters": batch * len(times), **mon.summary()}
    report["pair_vs_serial"] = (report["gemm"]["ms_per_iter"] + report["decode"]["ms_per_iter"]) / \
        report["pair"]["ms_per_iter"]
    return report


def rp_table(pairs: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Best decode performance reachable at each decode share (non-dominated points, sorted by R)."""
    pts = sorted((1.0 - p["P_gemm"], p["P_decode"]) for p in pairs if "P_gemm" in p)
    table: list[tuple[float, float]] = [(0.0, 0.0)]
    for r, perf in pts:
        r = max(0.0, min(1.0, r))
        if perf > table[-1][1]:
            table.append((r, min(1.0, perf)))
    if table[-1][0] < 1.0:
        table.append((1.0, 1.0))
    return table
