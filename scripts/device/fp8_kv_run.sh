#!/usr/bin/env bash
# On one H200: the float8 KV cache end to end. Sweep the decode kernel's tiles on bf16 and float8 caches
# (tune_decode_kv.py), then bench llama-3-8b (1,536 requests) and mixtral-8x7b (MIXTRAL_REQS, default 768) with a
# float8 cache, decode tiles set to the sweep's best float8 config. Env: LLAMA_MODES (default non-overlap),
# MIXTRAL_MODES (default non-overlap), MIXTRAL_REQS=0 skips Mixtral. Results under $OUT.
source scripts/device/setup.sh
export NANOFLOW_CACHE=/tmp/nfc
mkdir -p "$OUT/b"
timeout "${TUNE_S:-150}" python3 scripts/device/tune_decode_kv.py --out "$OUT" > "$OUT/tune.log" 2>&1
echo "tune rc $?"
grep -E "^N=|^\{|bounded|widened|failures" "$OUT/tune.log" | cut -c1-400
OPTS=$(python3 -c 'import json, sys
from nanoflow.config import DECODE_OPTION_KEYS
best = json.load(open(sys.argv[1]))["cases"][0]["fp8_best"]
print(",".join(f"{k}={int(best[k])}" for k in DECODE_OPTION_KEYS if best.get(k) is not None))' \
  "$OUT/decode_kv_tune.json" 2>/dev/null)
echo "float8 decode options: ${OPTS:-kernel defaults}"
DO=()
[ -n "$OPTS" ] && DO=(--decode-options "$OPTS")
timeout "${LLAMA_S:-150}" python3 -m nanoflow.cli bench --model llama-3-8b --kv-cache-dtype fp8 "${DO[@]}" \
  --num-requests 1536 --kv-fraction 0.85 --modes ${LLAMA_MODES:-non-overlap} --profile --output "$OUT/b/llama_fp8" > "$OUT/llama.log" 2>&1
echo "llama rc $?"
grep -E "tok/s|FAILED" "$OUT/llama.log" | cut -c1-300
[ "${MIXTRAL_REQS:-768}" = 0 ] && exit 0
timeout "${MIXTRAL_S:-250}" python3 -m nanoflow.cli bench --model mixtral-8x7b --kv-cache-dtype fp8 "${DO[@]}" \
  --num-requests "${MIXTRAL_REQS:-768}" --kv-fraction 0.8 --modes ${MIXTRAL_MODES:-non-overlap} --profile --output "$OUT/b/mixtral_fp8" \
  > "$OUT/mixtral.log" 2>&1
echo "mixtral rc $?"
grep -E "tok/s|FAILED" "$OUT/mixtral.log" | cut -c1-300
