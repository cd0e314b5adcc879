#!/usr/bin/env bash
# On one GPU, in one call (~6 minutes): the packed decode variant against the split kernel.
#   1. green_decode.py: every decode config alone on the whole GPU and inside green contexts, then the pairs;
#   2. if the best packed float8 config beats the split default by >= 5% on the whole GPU: llama-3-8b float8 KV,
#      REQS requests (default 1,024), non-overlap with the split default, then non-overlap (and, when packed decode
#      keeps >= 1.5x the split kernel's bandwidth on 32 SMs, overlap-preset-green) with the packed variant.
# Results under $OUT.
source scripts/device/setup.sh
export NANOFLOW_CACHE=/tmp/nfc
(cd scripts/device && timeout "${GREEN_S:-150}" python3 green_decode.py > "$OUT/green.log" 2>&1)
echo "green_decode rc $?"; grep -E "default|packed|^pair" "$OUT/green.log" | cut -c1-160
read -r GO OPTS MODES < <(python3 - "$OUT/green_decode.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ok = [c for c in d["configs"] if "full" in c and c["rel_err"] < 3e-2 and c["kv"] == "fp8"]
split = next(c for c in ok if c["config"] == "fp8-default")
packed = [c for c in ok if c.get("variant") == "packed"]
best = min(packed, key=lambda c: c["full"]["ms"]) if packed else None
if best is None or best["full"]["ms"] > 0.95 * split["full"]["ms"]:
    print("0 - -")
else:
    opts = ",".join(f"{k}={best[k]}" for k in ("head_group", "block_n", "num_warps", "num_stages"))
    per_sm = best.get("sms32", {}).get("TBps", 0) / max(split.get("sms32", {}).get("TBps", 1e-9), 1e-9)
    print("1", opts, "non-overlap,overlap-preset-green" if per_sm >= 1.5 else "non-overlap")
PY
)
echo "packed e2e: $GO $OPTS $MODES"
if [ "$GO" = 1 ]; then
  for variant in split packed; do
    extra=(); modes=non-overlap
    if [ "$variant" = packed ]; then extra=(--decode-variant packed --decode-options "$OPTS"); modes=$MODES; fi
    timeout "${LLAMA_S:-200}" python3 -m nanoflow.cli bench --model llama-3-8b --kv-cache-dtype fp8 \
      --num-requests "${REQS:-1024}" --kv-fraction 0.85 --modes "$modes" "${extra[@]}" \
      --output "$OUT/llama-$variant" > "$OUT/llama-$variant.log" 2>&1
    echo "llama $variant rc $?"; grep -E "tok/s|FAILED|Error" "$OUT/llama-$variant.log" | cut -c1-300
  done
fi
