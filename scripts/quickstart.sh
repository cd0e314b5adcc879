#!/usr/bin/env bash
# README command 1: set up a fresh machine and run the main job on the embedded default
# (SmolLM2-135M-Instruct on the bundled sample prompts; GPU if present, else CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/nanoflow run-offline --output outputs.jsonl "$@"
