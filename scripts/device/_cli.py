"""The command line every device script starts with; imports no triton, so a script can call it before its first
triton import (``--dry-run`` must set TRITON_INTERPRET before triton is imported anywhere)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path


def parse_script_args(doc: str, report: str, add_args: Callable[[argparse.ArgumentParser], None] | None = None,
                      dry_run_help: str = "tiny shapes on the CPU under TRITON_INTERPRET=1") -> argparse.Namespace:
    """``--dry-run``, the script's own flags (``add_args``), then ``--out`` (the folder for ``report``, default
    ``$OUT``). A dry run sets TRITON_INTERPRET=1; the repository root goes on ``sys.path``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help=dry_run_help)
    if add_args is not None:
        add_args(ap)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help=f"folder for {report} (default $OUT)")
    opts = ap.parse_args()
    if opts.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    return opts
