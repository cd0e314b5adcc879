#!/usr/bin/env bash
# On one GPU, in one call (~5 minutes): a decode-attention candidate against the split kernel's defaults.
#   1. green_decode.py (its --only ONLY configs, default all): each config alone on the whole GPU and inside green
#      contexts, then the pairs with the GEMM;
#   2. if the best float8 config whose name contains CANDIDATE (default "packed"; "-r" = the register caps) beats
#      the float8 default by >= 3% on the whole GPU: llama-3-8b float8 KV, REQS requests (default 768), non-overlap
#      with the defaults, then with the candidate's options.
# Results under $OUT.
source scripts/device/setup.sh
export NANOFLOW_CACHE=/tmp/nfc
(cd scripts/device && timeout "${GREEN_S:-150}" python3 green_decode.py --only="${ONLY:-}" > "$OUT/green.log" 2>&1)
echo "green_decode rc $?"; grep -E "default|${CANDIDATE:-packed}|^pair" "$OUT/green.log" | cut -c1-160
read -r GO VARIANT OPTS < <(python3 - "$OUT/green_decode.json" "${CANDIDATE:-packed}" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
ok = [c for c in d["configs"] if "full" in c and c["rel_err"] < 3e-2 and c["kv"] == "fp8"]
base = next(c for c in ok if c["config"] == "fp8-default")
cands = [c for c in ok if sys.argv[2] in c["config"]]
best = min(cands, key=lambda c: c["full"]["ms"]) if cands else None
if best is None or best["full"]["ms"] > 0.97 * base["full"]["ms"]:
    print("0 - -")
else:
    keys = ("head_group", "block_n", "num_warps", "num_stages", "maxnreg")
    print("1", best.get("variant", "split"), ",".join(f"{k}={best[k]}" for k in keys if k in best))
PY
)
echo "e2e: $GO $VARIANT $OPTS"
if [ "$GO" = 1 ]; then
  for run in default candidate; do
    extra=()
    if [ "$run" = candidate ]; then extra=(--decode-variant "$VARIANT" --decode-options "$OPTS"); fi
    timeout "${LLAMA_S:-150}" python3 -m nanoflow.cli bench --model llama-3-8b --kv-cache-dtype fp8 \
      --num-requests "${REQS:-768}" --kv-fraction 0.85 --modes non-overlap "${extra[@]}" \
      --output "$OUT/llama-$run" > "$OUT/llama-$run.log" 2>&1
    echo "llama $run rc $?"; grep -E "tok/s|FAILED|Error" "$OUT/llama-$run.log" | cut -c1-300
  done
fi
