#!/usr/bin/env bash
# Startup wall times of an older commit (a git worktree, argument 1) and this tree: `nanoflow --help`, and
# `run-offline` of one request and one token on the embedded SmolLM2 (cold = empty NANOFLOW_CACHE, then warm).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
BEFORE=${1:?usage: bench_startup.sh <worktree of the older commit>}
for tree in before after; do
  dir=$BEFORE; [ $tree = after ] && dir=$ROOT
  for i in 1 2; do
    s=$(date +%s.%N); (cd $dir && PYTHONPATH=$dir $PY -m nanoflow.cli --help >/dev/null); e=$(date +%s.%N)
    echo "$tree help $i $(echo "$e - $s" | bc)"
  done
  rm -rf ${TMPDIR:-/tmp}/nanoflow-startup-cache-$tree
  for i in cold warm warm; do
    s=$(date +%s.%N); (cd $dir && NANOFLOW_CACHE=${TMPDIR:-/tmp}/nanoflow-startup-cache-$tree PYTHONPATH=$dir $PY -m nanoflow.cli run-offline --num-requests 1 --max-tokens 1 --output ${TMPDIR:-/tmp}/nanoflow-startup.jsonl >/dev/null 2>&1); e=$(date +%s.%N)
    echo "$tree run1 $i $(echo "$e - $s" | bc)"
  done
done
