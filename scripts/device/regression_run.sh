#!/usr/bin/env bash
# On one H200, in one call (~9 minutes; run it with the device tool's full 600 s limit): what changed since the last
# measured run, end to end.
#   1. check_vs_hf.py: llama-3-8b-shaped dummy weights against transformers (correctness of the engine's forward;
#      CHECK=0 skips it);
#   2. bench_moe.py: the grouped GEMM and its tile sweep (BENCH_MOE=0 skips it);
#   3. llama-3-8b, float8 KV, REQS requests (default 1,536; 0 skips it), LLAMA_MODES (default non-overlap) with a
#      per-kernel profile;
#   4. mixtral-8x7b, float8 KV, MIXTRAL_REQS requests (default 1,536; 0 skips it), non-overlap with a profile.
# DECODE_VARIANT (e.g. cuda) picks the decode-attention kernel of both benches (default: the Triton split kernel).
# Results under $OUT; each step has its own time limit, so one failing step leaves the others' results.
source scripts/device/setup.sh
export NANOFLOW_CACHE=/tmp/nfc
if [ "${CHECK:-1}" != 0 ]; then
  timeout "${CHECK_S:-90}" python3 scripts/device/check_vs_hf.py > "$OUT/check.log" 2>&1
  echo "check_vs_hf rc $?"; grep -E "^len|argmax" "$OUT/check.log" | cut -c1-200
fi
if [ "${BENCH_MOE:-1}" != 0 ]; then
  timeout "${MOE_BENCH_S:-120}" python3 scripts/device/bench_moe.py --out "$OUT" > "$OUT/moe_bench.log" 2>&1
  echo "bench_moe rc $?"; grep -E "^tune|failures" "$OUT/moe_bench.log" | cut -c1-300
fi
if [ "${REQS:-1536}" != 0 ]; then
  timeout "${LLAMA_S:-200}" python3 -m nanoflow.cli bench --model llama-3-8b --kv-cache-dtype fp8 \
    --num-requests "${REQS:-1536}" --kv-fraction 0.85 --modes "${LLAMA_MODES:-non-overlap}" --profile \
    ${DECODE_VARIANT:+--decode-variant "$DECODE_VARIANT"} \
    --output "$OUT/llama" > "$OUT/llama.log" 2>&1
  echo "llama rc $?"; grep -E "tok/s|FAILED|Error" "$OUT/llama.log" | cut -c1-300
fi
if [ "${MIXTRAL_REQS:-1536}" != 0 ]; then
  timeout "${MIXTRAL_S:-330}" python3 -m nanoflow.cli bench --model mixtral-8x7b --kv-cache-dtype fp8 \
    --num-requests "${MIXTRAL_REQS:-1536}" --kv-fraction 0.88 --modes non-overlap --profile \
    ${DECODE_VARIANT:+--decode-variant "$DECODE_VARIANT"} \
    --output "$OUT/mixtral" > "$OUT/mixtral.log" 2>&1
  echo "mixtral rc $?"; grep -E "tok/s|FAILED|Error" "$OUT/mixtral.log" | cut -c1-300
fi
for f in "$OUT"/llama.json "$OUT"/mixtral.json; do
  [ -f "$f" ] && python3 - "$f" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    p, it = r.get("profile") or {}, r.get("iterations_timed") or {}
    print(r.get("model"), r.get("mode"), "per-class ms:", {k: round(v, 2) for k, v in (p.get("per_class_ms") or {}).items()},
          "full step ms:", round(it.get("full_step_ms_median", 0), 1), "idle s:", round(it.get("gpu_idle_s", 0), 2))
PY
done
