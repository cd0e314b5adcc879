#!/usr/bin/env bash
# Tensor parallelism on the 2-GPU H200 machine (kind nvidia-h200-x2): correctness, then throughput.
#
#   bash scripts/device/tp_bench.sh check|bench|channels      (one stage per device call: each takes minutes)
#
# check    : TP=2 vs TP=1 greedy tokens + last-token logits on a small LLaMA-3-70B-shaped model (float32 must match
#            token for token; bfloat16 and the nano-batched TP pipeline preset are reported) -> $OUT/tp_check.json
# bench    : LLaMA-3-70B (dummy bf16 weights) at TP=2 over bench modes -> $OUT/bench_tp2.json/.png
# channels : the network resource knob: non-overlap and overlap-preset at NCCL channel counts $CHANNELS
#            -> $OUT/bench_tp2_ch<N>.json/.png (at most 8 files come back from $OUT: keep CHANNELS to 4 values)
# Environment overrides: MODEL, MODES, WORKLOAD, NUM_REQUESTS, DENSE, KV_FRACTION, KV_DTYPE (auto|fp8), PRESET, CHANNELS,
# NPROC, TAG. Collective timeout:
# NANOFLOW_TP_TIMEOUT_S (default 600 s).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/setup.sh
STAGE=${1:-check}
NPROC=${NPROC:-2}
MODEL=${MODEL:-llama-3-70b}
MODES=${MODES:-non-overlap,non-overlap-sync,overlap-preset}
WORKLOAD=${WORKLOAD:-constant:1024:512}
NUM_REQUESTS=${NUM_REQUESTS:-256}
DENSE=${DENSE:-2048}
KV_FRACTION=${KV_FRACTION:-0.85}
PRESET=${PRESET:-llama-70b-tp-overlap}
TAG=${TAG:-}
KV_DTYPE=${KV_DTYPE:-auto}
CHANNELS=${CHANNELS:-"8 32"}
RUN="torchrun --standalone --nproc-per-node $NPROC"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
echo "NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"

check() {
  local d=/tmp/tp_check
  rm -rf "$d"
  python3 scripts/device/tp_check.py prepare --dir "$d"
  for dtype in float32 bfloat16; do
    python3 scripts/device/tp_check.py run --dir "$d" --dtype $dtype --out "$d/tp1_$dtype.pt"
    $RUN scripts/device/tp_check.py run --dir "$d" --dtype $dtype --out "$d/tp${NPROC}_$dtype.pt"
  done
  # NETWORK nano-ops split over nano-batches on their own stream (the TP preset), and the eager path.
  $RUN scripts/device/tp_check.py run --dir "$d" --dtype float32 --pipeline llama-70b-tp-overlap \
    --out "$d/tp${NPROC}_overlap_float32.pt"
  $RUN scripts/device/tp_check.py run --dir "$d" --dtype float32 --no-cuda-graphs --out "$d/tp${NPROC}_eager_float32.pt"
  python3 scripts/device/tp_check.py compare --dir "$d" --json "$OUT/tp_check.json"
}

bench() {
  $RUN -m nanoflow.bench.tp --tp "$NPROC" --model "$MODEL" --modes "$MODES" --workload "$WORKLOAD" \
    --num-requests "$NUM_REQUESTS" --dense-batch-size "$DENSE" --kv-fraction "$KV_FRACTION" \
    --kv-cache-dtype "$KV_DTYPE" --overlap-preset "$PRESET" --output "$OUT/bench_tp$NPROC$TAG" 2>&1 \
    | tee "$OUT/bench_tp$NPROC$TAG.log"
}

channels() {
  for ch in $CHANNELS; do
    NANOFLOW_NCCL_CHANNELS=$ch $RUN -m nanoflow.bench.tp --tp "$NPROC" --model "$MODEL" \
      --modes non-overlap,overlap-preset --workload "$WORKLOAD" --num-requests $((NUM_REQUESTS / 2)) \
      --dense-batch-size "$DENSE" --output "$OUT/bench_tp${NPROC}_ch$ch"
  done
}

case "$STAGE" in
  check) check ;;
  bench) bench ;;
  channels) channels ;;
  *) echo "unknown stage $STAGE; use check, bench or channels" >&2; exit 2 ;;
esac
