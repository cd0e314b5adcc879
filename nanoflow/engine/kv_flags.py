"""The ``--kv-offload`` flag group of ``run-offline``, ``serve`` and ``chat`` (no torch import: ``--help`` stays
fast)."""

from __future__ import annotations

import argparse
from typing import Any


def _gib(minimum: float, inclusive: bool):
    def parse(text: str) -> float:
        value = float(text)
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum} GiB, got {text}")
        return value
    return parse


def add_kv_offload_args(parser: argparse.ArgumentParser, what: str, host_gib: float) -> None:
    """Register ``--kv-offload --kv-host-gib --kv-ssd-dir --kv-ssd-gib``; ``what`` says what the reuse is for."""
    parser.add_argument("--kv-offload", action="store_true",
                        help="keep finished requests' KV in host memory (and on SSD with --kv-ssd-dir) and reuse it "
                             f"for later prompts that start with the same tokens: {what}")
    parser.add_argument("--kv-host-gib", type=_gib(0.0, False), default=host_gib,
                        help="host-memory tier of --kv-offload, GiB; least recently used KV moves to SSD or is dropped")
    parser.add_argument("--kv-ssd-dir", default=None,
                        help="folder for the SSD tier of --kv-offload (checksummed files); default: host memory only")
    parser.add_argument("--kv-ssd-gib", type=_gib(0.0, True), default=64.0, help="size of the SSD tier, GiB")


def kv_offload_extra(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EngineArgs.extra`` entries for the parsed flags (empty without ``--kv-offload``)."""
    if not args.kv_offload:
        return {}
    extra: dict[str, Any] = {"kv_offload": True, "kv_host_bytes": int(args.kv_host_gib * 2**30)}
    if args.kv_ssd_dir:
        extra.update(kv_ssd_dir=args.kv_ssd_dir, kv_ssd_bytes=int(args.kv_ssd_gib * 2**30))
    return extra
