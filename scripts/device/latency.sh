#!/usr/bin/env bash
# Online latency on one GPU (issue #10, paper Fig. 8): `nanoflow serve` with dummy weights, then Poisson arrivals
# at several rates from scripts/bench_latency.py over HTTP -> $OUT/latency.json/.png and $OUT/serve.log.
#
#   bash scripts/device/latency.sh          # env overrides: MODEL, RATES, DURATION, DATASET, PORT
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/setup.sh
MODEL=${MODEL:-llama-3-8b}
RATES=${RATES:-4,8,12,16,20}
DURATION=${DURATION:-30}
DATASET=${DATASET:-splitwise}
PORT=${PORT:-8011}
if ! python3 -c "import nanoflow.serve.cli" 2> "$OUT/serve_import.log"; then
  # The HTTP stack did not import here (see serve_import.log): measure the same AsyncEngine in-process instead.
  tail -n 3 "$OUT/serve_import.log"
  exec python3 scripts/bench_latency.py --in-process --model "$MODEL" --device cuda --dtype bfloat16 \
    --rates "$RATES" --duration "$DURATION" --dataset "$DATASET" --warmup 4 --out "$OUT/latency"
fi
python3 -m nanoflow.cli serve --model "$MODEL" --device cuda --dtype bfloat16 --port "$PORT" \
  --max-concurrency 4096 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do  # weights, CUDA-graph capture and compilation take a few minutes
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -20 "$OUT/serve.log"; exit 1; }
  sleep 1
done
python3 scripts/bench_latency.py --url "http://127.0.0.1:$PORT" --rates "$RATES" --duration "$DURATION" \
  --dataset "$DATASET" --warmup 4 --out "$OUT/latency"
