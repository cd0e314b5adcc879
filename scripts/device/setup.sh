#!/usr/bin/env bash
# Source on the lent GPU machine: installs carried wheels (.whl/) into /tmp/site and puts the repo on the path.
# No `set -e` here: it would stay on in the sourcing shell and kill background jobs started there on a first error.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; return 1 2>/dev/null || exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# The device tool returns at most 8 files from $OUT: on exit, if there are more, the PNGs go into one pngs.tar
# (extract it where the files come back: tar xf pngs.tar).
_nf_pack_pngs() {
  if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
    (cd "$OUT" && find . -name '*.png' -print0 | tar cf pngs.tar --null -T - --remove-files)
  fi
}
trap _nf_pack_pngs EXIT
