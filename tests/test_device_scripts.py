"""The GPU benchmark scripts' CPU dry runs (tiny shapes through TRITON_INTERPRET), so they do not rot between the
sessions that have a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_green_decode_dry_run(tmp_path):
    """green_decode.py --dry-run times each decode config on the CPU and checks it against the float64 reference."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "green_decode.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT / "scripts" / "device", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "green_decode.json").read_text())
    names = {c["config"] for c in report["configs"]}
    assert {"fp8-default", "bf16-default"} <= names and any("packed" in n for n in names)
    for c in report["configs"]:
        assert "error" not in c, c
        assert c["rel_err"] < 3e-2, c
