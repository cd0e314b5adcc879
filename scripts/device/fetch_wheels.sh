#!/usr/bin/env bash
# On the dev machine, before the first GPU run of a session: download the wheels the lent GPU machine lacks into
# .whl/ (git-ignored; the device tool carries it with `carry: [".whl"]`), for its Python 3.12 / x86_64.
# The GPU machine has torch, triton, transformers and accelerate, and reaches no package index.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  gguf "pulp==3.3.2" fastapi starlette pydantic pydantic_core uvicorn annotated-types typing-inspection typing_extensions \
  opentelemetry-api anyio sniffio h11 idna click prometheus-client httpx httpcore certifi nvidia-ml-py
ls .whl
