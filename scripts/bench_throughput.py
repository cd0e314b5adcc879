#!/usr/bin/env python3
"""Offline throughput benchmark: `python scripts/bench_throughput.py --help` (same as `nanoflow bench`)."""

from __future__ import annotations

import sys

from nanoflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
