#!/usr/bin/env bash
# On one GPU: the fused RoPE + KV-write kernel's tests at LLaMA-3-8B shapes (tests/test_rope_kv_gpu.py), then
# `nanoflow bench` on llama-3-8b (dummy bf16 weights, float8 KV, constant 1,024 / 512) with the fused kernel (the
# default, with --profile) and with --no-fused-rope-kv, one after the other on the same requests, then
# scripts/device/check_vs_hf.py (the engine against transformers). Env: RK_REQS (default 2048), RK_MODES (default
# non-overlap), RK_S (seconds per bench, default 230), CHECK_S (default 90; 0 skips it). Results under $OUT.
source scripts/device/setup.sh
export NANOFLOW_CACHE=/tmp/nfc
timeout "${TEST_S:-120}" python3 -m pytest -q -p no:cacheprovider -m gpu -rA -s tests/test_rope_kv_gpu.py \
  > "$OUT/test_rope_kv_gpu.log" 2>&1
echo "gpu tests rc $?"; grep -E "passed|failed|us_per_call|at 2048|Error|assert" "$OUT/test_rope_kv_gpu.log" | cut -c1-300 | tail -12
COMMON=(--model llama-3-8b --kv-cache-dtype fp8 --num-requests "${RK_REQS:-2048}" --kv-fraction 0.85
        --modes "${RK_MODES:-non-overlap}")
timeout "${RK_S:-230}" python3 -m nanoflow.cli bench "${COMMON[@]}" --profile --output "$OUT/fused" > "$OUT/fused.log" 2>&1
echo "bench fused rc $?"
timeout "${RK_S:-230}" python3 -m nanoflow.cli bench "${COMMON[@]}" --no-fused-rope-kv --output "$OUT/unfused" \
  > "$OUT/unfused.log" 2>&1
echo "bench unfused rc $?"
if [ "${CHECK_S:-90}" -gt 0 ]; then
  timeout "${CHECK_S:-90}" python3 scripts/device/check_vs_hf.py > "$OUT/check.log" 2>&1
  echo "check_vs_hf rc $?"; grep -E "^len|argmax" "$OUT/check.log" | cut -c1-200
fi
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for name in ("fused", "unfused"):
    path = pathlib.Path(sys.argv[1]) / f"{name}.json"
    if not path.exists():
        print(name, "no record"); continue
    for r in json.load(open(path)):
        if "error" in r:
            print(name, r.get("mode"), "ERROR", r["error"][:300]); continue
        it = r.get("iterations_timed") or {}
        prof = r.get("profile") or {}
        print(name, r["mode"], f"{r['throughput_tok_s']:.0f} tok/s", f"{r['pct_optimal']:.1f}%",
              f"peak {r['peak_tflops']:.0f}", "full steps", it.get("full_steps"), "of", r.get("iterations"),
              f"at {it.get('full_step_ms_median', 0):.1f} ms", "decode/full", it.get("full_step_decode_tokens_median"),
              "classes", {k: round(v, 2) for k, v in (prof.get("per_class_ms") or {}).items()},
              "layer planned/measured", r.get("planned_layer_ms"), r.get("measured_layer_ms"))
PY
for f in fused unfused; do grep -E "Traceback|Error" "$OUT/$f.log" | head -5; done
