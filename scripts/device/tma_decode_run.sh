#!/usr/bin/env bash
# On one H200: float8 decode attention with TMA page copies. First the kernel alone (tune_decode_kv.py with
# TUNE_TMA=1, TUNE_QUICK=1: pages of 16 and of 64 tokens), then llama-3-8b end to end with a float8 cache, the
# default pointer-loaded tiles (pages of 16) against TMA tiles of one 64-token page with the tune's best warps and
# stages. Env: REQS (default 1536), E2E (the end-to-end runs, default "pointer16 tma64"), SKIP_E2E=1 stops
# after the kernel sweep. Results under $OUT.
source scripts/device/setup.sh
export NANOFLOW_CACHE=/tmp/nfc
for page in 16 64; do
  mkdir -p "$OUT/tune$page"
  TUNE_TMA=1 TUNE_QUICK=1 TUNE_PAGE=$page timeout "${TUNE_S:-120}" python3 scripts/device/tune_decode_kv.py \
    --out "$OUT/tune$page" > "$OUT/tune$page.log" 2>&1
  echo "tune page $page rc $?"
  grep -E "^N=|failures|Error" "$OUT/tune$page.log" | cut -c1-300
  rm -f "$OUT/tune$page.log"  # the device tool returns 8 files: keep the JSON records and the bench logs
done
[ "${SKIP_E2E:-0}" = 1 ] && exit 0
# The best TMA config of the 64-token pages (warps, stages), from the float8 sweep of the first case.
OPTS=$(python3 -c 'import json, sys
case = json.load(open(sys.argv[1]))["cases"][0]
tma = [r for r in case["fp8"] if r.get("tma") and "ms" in r and "max_programs" not in r]
best = min(tma, key=lambda r: r["ms"])
print("tma=%d,num_warps=%d,num_stages=%d" % (best["tma"], best["num_warps"], best["num_stages"]))' "$OUT/tune64/decode_kv_tune.json" 2>/dev/null)
echo "TMA decode options: ${OPTS:-none (sweep failed)}"
[ -z "$OPTS" ] && exit 1
# E2E: which end-to-end runs, in order (default "pointer16 tma64"): the pointer-loaded default against TMA tiles.
for run in ${E2E:-pointer16 tma64}; do
  extra=()
  [ "$run" = tma64 ] && extra=(--block-size 64 --decode-options "$OPTS")
  timeout "${BENCH_S:-200}" python3 -m nanoflow.cli bench --model llama-3-8b --kv-cache-dtype fp8 \
    --num-requests "${REQS:-1536}" --kv-fraction 0.85 --modes non-overlap --profile "${extra[@]}" --output "$OUT/$run" \
    > "$OUT/$run.log" 2>&1
  echo "$run rc $?"; grep -E "tok/s|FAILED|Error" "$OUT/$run.log" | cut -c1-300
done
