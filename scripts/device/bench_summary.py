"""Print a ``nanoflow bench`` results file's profile lines (the device scripts call it after a run):

    python3 scripts/device/bench_summary.py OUT/mixtral.json [--choices]

Per record: label, dense batch, the profiled step's per-class kernel ms and its decode / prefill tokens, the KV
capacity and the iterations, the memory the run left in use (and the probe's reading, with
``--gpu-memory-utilization``); with ``--choices`` also the grouped GEMM backends ``--moe-backend auto`` picked.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    for r in json.load(open(argv[0])):
        p = r.get("profile") or {}
        print(r.get("label", r.get("mode")), "dense", r.get("dense_batch"), "per-class ms:",
              {k: round(v, 2) for k, v in (p.get("per_class_ms") or {}).items()}, "tokens:", p.get("decode_tokens"),
              p.get("prefill_tokens"), "kv_cache_tokens:", r.get("kv_cache_tokens"), "iterations:", r.get("iterations"))
        if r.get("memory") or r.get("memory_profile"):
            print("   memory GiB:", r.get("memory"), "probe:", r.get("memory_profile"))
        if "--choices" in argv[1:]:
            for c in r.get("grouped_mm_choices") or []:
                print("   grouped GEMM", c["rows"], c["n"], c["k"], c["backend"], c["ms"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
