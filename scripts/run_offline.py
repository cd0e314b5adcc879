#!/usr/bin/env python3
"""The batch runner: `python scripts/run_offline.py --help` (same as `nanoflow run-offline`)."""

from __future__ import annotations

import sys

from nanoflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["run-offline", *sys.argv[1:]]))
