#!/usr/bin/env bash
# On one GPU: the batch-invariant kernels' tests at LLaMA-3-8B shapes, then `nanoflow bench --batch-invariant` on
# llama-3-8b (dummy bf16 weights, constant 1,024 / 512) in modes non-overlap, nano-batch and overlap-preset, whose
# tokens_vs_reference / tokens_vs_modes say whether any output differs. Env: BI_REQS (default 256), BI_MODES,
# BI_S (seconds for that bench, default 330), BASE_S (> 0: then the default kernels' non-overlap on the same requests
# for the cost of invariance, that many seconds). Results under $OUT.
source scripts/device/setup.sh
export NANOFLOW_CACHE=/tmp/nfc
timeout "${TEST_S:-150}" python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_batch_invariant_gpu.py \
  > "$OUT/test_batch_invariant_gpu.log" 2>&1
echo "gpu tests rc $?"; grep -E "passed|failed|cuBLAS|Error" "$OUT/test_batch_invariant_gpu.log" | cut -c1-300 | tail -20
timeout "${BI_S:-330}" python3 -m nanoflow.cli bench --model llama-3-8b --batch-invariant \
  --num-requests "${BI_REQS:-256}" --modes "${BI_MODES:-non-overlap,nano-batch,overlap-preset}" \
  --output "$OUT/bi" > "$OUT/bi.log" 2>&1
echo "bench --batch-invariant rc $?"
if [ "${BASE_S:-0}" -gt 0 ]; then
  timeout "$BASE_S" python3 -m nanoflow.cli bench --model llama-3-8b --num-requests "${BI_REQS:-256}" \
    --modes non-overlap --output "$OUT/base" > "$OUT/base.log" 2>&1
  echo "bench default kernels rc $?"
fi
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for name in ("bi", "base"):
    path = pathlib.Path(sys.argv[1]) / f"{name}.json"
    if not path.exists():
        continue
    for r in json.load(open(path)):
        if "error" in r:
            print(name, r.get("mode"), "ERROR", r["error"][:300]); continue
        print(name, r["mode"], f"{r['throughput_tok_s']:.0f} tok/s", f"{r['pct_optimal']:.1f}%",
              "vs_ref:", json.dumps(r.get("tokens_vs_reference"))[:300], "vs_modes:", json.dumps(r.get("tokens_vs_modes"))[:300])
PY
