#!/usr/bin/env bash
# On one GPU, in one call (~6 minutes): the hand-written CUDA decode kernel (decode variant "cuda").
#   1. its registers and spills (nvcc -Xptxas -v) and its GPU tests (tests/test_decode_cuda.py);
#   2. green_decode.py --only=cuda: alone on the whole GPU and in green contexts of n SMs beside the Triton
#      defaults, then the best config at each n paired with the gate/up GEMM on the other SMs;
#   3. if the tests pass: llama-3-8b, float8 KV, REQS requests (default 1,024; 0 skips it), mode non-overlap with
#      the Triton default, then CUDA_MODES (default non-overlap) with --decode-variant cuda (LLAMA_S seconds a mode).
# PAIR: green_decode.py --pair configs; RUNS (default "split cuda"): which of the two benches run.
# Results under $OUT (JSON and the tests' log; bench logs are summarised on stdout).
source scripts/device/setup.sh
export NANOFLOW_CACHE=/tmp/nfc
nvcc -O3 -std=c++17 -gencode=arch=compute_90,code=sm_90 -Xptxas -v -c -o /tmp/decode_fp8.o \
  nanoflow/ops/attention/csrc/decode_fp8.cu 2>&1 | grep -E "registers|spill|error"
timeout "${TEST_S:-180}" python3 -m pytest -q -p no:cacheprovider tests/test_decode_cuda.py > "$OUT/pytest.log" 2>&1
TESTS=$?
echo "pytest rc $TESTS"; tail -5 "$OUT/pytest.log" | cut -c1-300
(cd scripts/device && timeout "${GREEN_S:-150}" python3 green_decode.py --only=cuda ${PAIR:+--pair "$PAIR"} > /tmp/green.log 2>&1)
echo "green_decode rc $?"; grep -E "default|cuda|^pair|Error" /tmp/green.log | cut -c1-200
if [ "$TESTS" = 0 ] && [ "${REQS:-1024}" != 0 ]; then
  for run in ${RUNS:-split cuda}; do
    extra=(--modes non-overlap)
    if [ "$run" = cuda ]; then extra=(--modes "${CUDA_MODES:-non-overlap}" --decode-variant cuda); fi
    modes=$(echo "${extra[1]}" | tr ',' ' ' | wc -w)
    timeout $(( ${LLAMA_S:-130} * modes )) python3 -m nanoflow.cli bench --model llama-3-8b --kv-cache-dtype fp8 \
      --num-requests "${REQS:-1024}" --kv-fraction 0.85 "${extra[@]}" --output "$OUT/llama-$run" > "/tmp/llama-$run.log" 2>&1
    echo "llama $run rc $?"; grep -E "tok/s|FAILED|Error|error" "/tmp/llama-$run.log" | cut -c1-300 | tail -8
  done
fi
