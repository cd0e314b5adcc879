#!/usr/bin/env bash
# README command 2: run the test suite (CPU; GPU tests are marked `gpu` and run through scripts/device/).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
