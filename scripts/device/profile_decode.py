"""One decode-attention call (LLaMA-3-8B heads, 640 rows x 1,280 tokens, shuffled pages of 16) for a kernel profiler.

    ncu --kernel-name regex:_decode_split_kernel --launch-skip 3 --launch-count 1 --section ... \\
        python3 scripts/device/profile_decode.py fp8     # or bf16; any decode_attention keyword as KEY=INT after it

Runs the call four times (three warm-ups that compile and settle, then the one a profiler should pick) and prints the
time of a fifth, unprofiled run when not under a profiler.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from nanoflow.ops.attention import decode_attention, decode_workspace  # noqa: E402
from nanoflow.ops.kv_store import FP8  # noqa: E402


def main() -> None:
    kv = sys.argv[1] if len(sys.argv) > 1 else "fp8"
    kw = {k: int(v) for k, v in (a.split("=") for a in sys.argv[2:])}
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, length, page, hq, hkv, d = 640, 1280, 16, 32, 8, 128
    per_row = length // page
    blocks = 1 + rows * per_row
    k = torch.randn((blocks, page, hkv, d), generator=gen, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if kv == "fp8":
        k, v = k.to(FP8), v.to(FP8)
    table = (torch.randperm(blocks - 1, generator=gen, device=dev) + 1).view(rows, per_row).to(torch.int32)
    q = torch.randn(rows, hq, d, generator=gen, device=dev, dtype=torch.bfloat16)
    lens = torch.full((rows,), length, dtype=torch.int32, device=dev)
    ws = decode_workspace(rows, hq, d, 16, dev)
    out = torch.empty_like(q)
    for _ in range(4):
        decode_attention(q, k, v, table, lens, out, d**-0.5, workspace=ws, **kw)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    decode_attention(q, k, v, table, lens, out, d**-0.5, workspace=ws, **kw)
    end.record()
    end.synchronize()
    moved = rows * length * 2 * hkv * d * k.element_size()
    ms = start.elapsed_time(end)
    print(f"{kv} {kw}: {ms:.3f} ms, {moved / ms / 1e9:.2f} TB/s")


if __name__ == "__main__":
    main()
