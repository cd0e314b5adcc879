#!/usr/bin/env bash
# lm-eval (EleutherAI's harness) through `nanoflow serve`, against lm-eval's own transformers backend on the same
# weights: the embedded SmolLM2-135M-Instruct on the CPU, the local multiple-choice task in benchmarks/lm_eval
# (24 capitals, 96 loglikelihood requests: completions with echo + logprobs, batched token-id prompts, and the
# server's /tokenize endpoints as lm-eval's remote tokenizer).
#
#   LM_EVAL_PY=/path/to/venv/bin/python bash scripts/lm_eval_check.sh
#
# lm-eval is not a NanoFlow dependency: install it in a venv of its own (`pip install "lm-eval[api]" torch
# transformers gguf`) and point LM_EVAL_PY at that venv's python. PORT (default 8123) and OUT (default
# /tmp/nanoflow_lm_eval) are optional. Prints both accuracies and the largest difference between the two backends'
# loglikelihoods.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${LM_EVAL_PY:?set LM_EVAL_PY to the python of a venv with lm-eval installed}"
PORT="${PORT:-8123}"
OUT="${OUT:-/tmp/nanoflow_lm_eval}"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
rm -rf "$OUT" && mkdir -p "$OUT"
.venv/bin/python -m nanoflow.cli serve --device cpu --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "localhost:$PORT/health" > /dev/null && break; sleep 1; done
MODEL=$(curl -sf "localhost:$PORT/v1/models" | "$PY" -c "import json, sys; print(json.load(sys.stdin)['data'][0]['id'])")
"$PY" -m lm_eval --model local-completions --tasks nf_capitals --include_path benchmarks/lm_eval --log_samples \
  --model_args "model=$MODEL,base_url=http://127.0.0.1:$PORT/v1/completions,num_concurrent=1,tokenized_requests=True,tokenizer_backend=remote" \
  --output_path "$OUT/nanoflow" > "$OUT/nanoflow.log" 2>&1
GGUF=$(.venv/bin/python -c "from nanoflow.models.gguf_loader import default_gguf_path as d; print(d())")
"$PY" -m lm_eval --model hf --device cpu --batch_size 8 --tasks nf_capitals --include_path benchmarks/lm_eval \
  --model_args "pretrained=$(dirname "$GGUF"),gguf_file=$(basename "$GGUF"),dtype=float32" --log_samples \
  --output_path "$OUT/hf" > "$OUT/hf.log" 2>&1
"$PY" - "$OUT" <<'PY'
import glob, json, sys
out = sys.argv[1]
def samples(name):
    path = glob.glob(f"{out}/{name}/**/samples_*.jsonl", recursive=True)[0]
    return {r["doc_id"]: r for r in map(json.loads, open(path))}
def acc(name):
    path = glob.glob(f"{out}/{name}/**/results_*.json", recursive=True)[0]
    return json.load(open(path))["results"]["nf_capitals"]["acc,none"]
a, b = samples("nanoflow"), samples("hf")
pairs = [(float(x[0][0]), float(y[0][0]), x[0][1] == y[0][1]) for k in a for x, y in zip(a[k]["resps"], b[k]["resps"])]
print(json.dumps({"acc_nanoflow": acc("nanoflow"), "acc_hf": acc("hf"), "loglikelihoods": len(pairs),
                  "max_abs_diff": max(abs(x - y) for x, y, _ in pairs),
                  "is_greedy_equal": sum(g for _, _, g in pairs)}))
PY
