#!/usr/bin/env bash
# On one H200: the MoE kernels (bench_moe.py: grouped GEMM with TMA and pointer loads, the expert sort, a tile sweep),
# then mixtral-8x7b end to end with a float8 KV cache. Env: MOE_REQS (default 512; 0 skips the end-to-end run),
# MOE_MODES (default non-overlap,overlap-preset), MOE_TUNE=0 skips the tile sweep, MOE_BENCH=0 skips bench_moe.py,
# MOE_KV_FRACTION (default 0.88 of the memory free after the weights, as every H200 run since s8), MOE_GPU_UTIL
# (e.g. 0.97: size the KV cache by a probe run instead, --gpu-memory-utilization; overrides MOE_KV_FRACTION), MOE_BACKENDS
# (the grouped GEMM backends to run every mode with, default auto; e.g. triton,auto), DECODE_VARIANT (e.g. cuda),
# MOE_TEST=1 runs tests/test_moe_backends.py first (the backends against float64 and in a CUDA graph), MOE_DENSE
# (the dense batch, default the bench's 2,048 tokens). Results under $OUT.
source scripts/device/setup.sh
export NANOFLOW_CACHE=/tmp/nfc
TUNE=()
if [ "${MOE_TEST:-0}" != 0 ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_moe_backends.py > "$OUT/test_moe_backends.log" 2>&1
  echo "test_moe_backends rc $?"; tail -3 "$OUT/test_moe_backends.log"
fi
[ "${MOE_TUNE:-1}" = 0 ] && TUNE=(--no-tune)
if [ "${MOE_BENCH:-1}" != 0 ]; then
  timeout "${MOE_BENCH_S:-240}" python3 scripts/device/bench_moe.py "${TUNE[@]}" --out "$OUT" > "$OUT/moe_bench.log" 2>&1
  echo "bench_moe rc $?"
  sed -n '/^NVIDIA/,$p' "$OUT/moe_bench.log" | cut -c1-300
fi
[ "${MOE_REQS:-512}" = 0 ] && exit 0
KV_SIZE="--kv-fraction ${MOE_KV_FRACTION:-0.88}"
[ -n "${MOE_GPU_UTIL:-}" ] && KV_SIZE="--gpu-memory-utilization $MOE_GPU_UTIL"
timeout "${MIXTRAL_S:-330}" python3 -m nanoflow.cli bench --model mixtral-8x7b --kv-cache-dtype fp8 \
  --num-requests "${MOE_REQS:-512}" $KV_SIZE --modes "${MOE_MODES:-non-overlap,overlap-preset}" \
  --overlap-preset mixtral-overlap --moe-backend "${MOE_BACKENDS:-auto}" ${DECODE_VARIANT:+--decode-variant "$DECODE_VARIANT"} \
  ${MOE_DENSE:+--dense-batch-size "$MOE_DENSE"} ${MOE_SPEC:+--searched-spec "$MOE_SPEC"} \
  --profile --output "$OUT/mixtral" > "$OUT/mixtral.log" 2>&1
echo "mixtral rc $?"
grep -E "tok/s|FAILED|Error" "$OUT/mixtral.log" | cut -c1-300
python3 scripts/device/bench_summary.py "$OUT/mixtral.json" --choices
