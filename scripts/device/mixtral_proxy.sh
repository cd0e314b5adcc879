#!/usr/bin/env bash
# On one H100: Mixtral-8x7B's config with 16 of its 32 layers (fits 80 GB) under the KV capacity of the full model on
# one H200 (--kv-cache-tokens, default 752,676 float8 tokens as measured in s8), so the scheduler sees the memory
# pressure of #8's run and each step costs about half of the full model's. Env: PROXY_REQS (default 1536),
# PROXY_KV (default 752676), PROXY_MODES (default non-overlap,overlap-preset), PROXY_S (time limit, default 500),
# PROXY_DENSE (the dense batch, or several: "2048 1920"; default the bench's 2,048), PROXY_SPEC (a spec or preset for the overlap-searched*
# modes, e.g. PROXY_MODES=non-overlap,overlap-searched-grid PROXY_SPEC=mixtral-decode-split), PROXY_TEST=1 runs the
# fused RoPE + KV GPU test and the gpu_memory_utilization GPU test first.
# Results under $OUT.
source scripts/device/setup.sh
export NANOFLOW_CACHE=/tmp/nfc
if [ "${PROXY_TEST:-0}" != 0 ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_rope_kv_gpu.py > "$OUT/test_rope_kv_gpu.log" 2>&1
  echo "test_rope_kv_gpu rc $?"; tail -3 "$OUT/test_rope_kv_gpu.log"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_memory_profile_gpu.py \
    > "$OUT/test_memory_profile_gpu.log" 2>&1
  echo "test_memory_profile_gpu rc $?"; tail -3 "$OUT/test_memory_profile_gpu.log"
fi
python3 - <<'PY'
import json, os
cfg = json.load(open("nanoflow/configs/mixtral-8x7b.json"))
cfg["num_hidden_layers"] = 16
os.makedirs("/tmp/mixtral-8x7b-16l", exist_ok=True)
json.dump(cfg, open("/tmp/mixtral-8x7b-16l/config.json", "w"), indent=1)
PY
# PROXY_DENSE may list several dense batches ("2048 1920"): one bench each (PROXY_S seconds each), into
# $OUT/mixtral16l-dN; their charts are dropped then ($OUT keeps at most 8 files).
DENSES=(${PROXY_DENSE:-})
for DENSE in "${DENSES[@]:-}"; do
  NAME=mixtral16l${DENSE:+-d$DENSE}
  [ "${#DENSES[@]}" -le 1 ] && NAME=mixtral16l
  timeout "${PROXY_S:-500}" python3 -m nanoflow.cli bench --model /tmp/mixtral-8x7b-16l --kv-cache-dtype fp8 \
    --num-requests "${PROXY_REQS:-1536}" --kv-cache-tokens "${PROXY_KV:-752676}" \
    --modes "${PROXY_MODES:-non-overlap,overlap-preset}" --overlap-preset mixtral-overlap --moe-backend auto \
    ${DENSE:+--dense-batch-size "$DENSE"} ${PROXY_SPEC:+--searched-spec "$PROXY_SPEC"} \
    --profile --output "$OUT/$NAME" > "$OUT/$NAME.log" 2>&1
  echo "$NAME rc $?"
  grep -E "tok/s|FAILED|Error|WARNING" "$OUT/$NAME.log" | cut -c1-400
  python3 scripts/device/bench_summary.py "$OUT/$NAME.json"
done
[ "${#DENSES[@]}" -gt 1 ] && rm -f "$OUT"/*.png
exit 0
