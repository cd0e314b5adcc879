#!/usr/bin/env bash
# On one H200: profile llama-3-8b's ops, run the two-stage search with the measured interference table (which then
# times the sequential and the stage II pipeline's whole forward on the profiled batch: predicted vs measured layer
# time), then one bench run comparing non-overlap, the hand preset and the searched pipeline. Results under $OUT.
#   SEARCH_S (MILP seconds, default 90)  STEP (profiled batch step, default 128)  REQS (bench requests, default 512)
#   MODES (bench modes, default non-overlap,overlap-preset-nogrid + overlap-searched)
#   KV_DTYPE (auto|fp8, default auto)  DECODE_OPTIONS (e.g. block_n=128,prefetch=1: profile and bench alike)
#   PROFILE=1 (CUPTI profile of one step per mode: per-class and top kernels)  BENCH_S (bench time limit, default 480)
#   SPEC (a spec an earlier search wrote, e.g. benchmarks/results/2026-12-07-s14-searched-spec-fp8kv-h100-llama3-8b.json:
#   no search, bench it)  SEARCHED_FIRST=1 (run overlap-searched before the other modes; each record's gpu_clocks
#   and recompile_limit_hits show whether a later mode ran on a slower GPU or with eager glue)
#   PASSES=2 (bench --passes: A B B A, means printed)
source scripts/device/setup.sh
export NANOFLOW_CACHE=$OUT/cache
EXTRA=(--kv-cache-dtype "${KV_DTYPE:-auto}")
[ -n "${DECODE_OPTIONS:-}" ] && EXTRA+=(--decode-options "$DECODE_OPTIONS")
if [ -n "${SPEC:-}" ]; then
  cp "$SPEC" "$OUT/searched.json"
else
  python3 -m nanoflow.cli search --model llama-3-8b --dense-batch 2048 --workload constant:1024:512 \
    --rp-table benchmarks/results/2026-11-22-interference-h200.json --time-limit "${SEARCH_S:-90}" --step "${STEP:-128}" \
    "${EXTRA[@]}" --output "$OUT/searched.json" 2>&1 | grep -v Warn | tail -40
  cp "$OUT"/cache/profiles/*.json "$OUT/" 2>/dev/null
fi
MODES=${MODES:-non-overlap,overlap-preset-nogrid}
if [ -f "$OUT/searched.json" ]; then
  if [ "${SEARCHED_FIRST:-0}" = 1 ]; then MODES=overlap-searched,$MODES; else MODES=$MODES,overlap-searched; fi
fi
PROF=()
[ "${PROFILE:-0}" = 1 ] && PROF=(--profile)
timeout "${BENCH_S:-480}" python3 -m nanoflow.cli bench --model llama-3-8b --num-requests "${REQS:-512}" --kv-fraction 0.85 \
  --modes "$MODES" "${EXTRA[@]}" "${PROF[@]}" ${PASSES:+--passes "$PASSES"} --searched-spec "$OUT/searched.json" \
  --output "$OUT/bench6" 2>&1 | grep -E "tok/s|FAILED|Error|wrote|torch.compile of" | tail -12
rm -rf "$OUT/cache"
# With PROFILE=1: the costliest kernels of each mode's profiled step, by name.
python3 - "$OUT/bench6.json" <<'PY' 2>/dev/null
import json, sys
for r in json.load(open(sys.argv[1])):
    p = r.get("profile") or {}
    print(r.get("mode"), {k: round(v, 2) for k, v in (p.get("per_class_ms") or {}).items()},
          "decode/prefill tokens", p.get("decode_tokens"), p.get("prefill_tokens"), "wall", p.get("forward_wall_ms"))
    for k in p.get("top_kernels", [])[:12]:
        print(f"  {k['class']:12s} {k['ms']:8.3f} ms {k['launches']:5d}x {k['name'][:90]}")
PY
