"""``nanoflow run-offline | serve | chat | bench | search | analyze`` (also ``python -m nanoflow.cli``).

Each subcommand lives with its feature and exposes ``add_parser(subparsers)`` and ``run(args) -> int``; this file
only mounts them, importing each lazily so ``nanoflow --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (subcommand, module exposing add_parser/run)
_COMMANDS = [
    ("run-offline", "nanoflow.engine.offline"),
    ("serve", "nanoflow.serve.cli"),
    ("chat", "nanoflow.ui.chat"),
    ("bench", "nanoflow.bench.cli"),
    ("search", "nanoflow.search.cli"),
    ("analyze", "nanoflow.analysis.cli"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoflow",
        description="NanoFlow: throughput-first LLM serving with nano-batching and intra-device overlap.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in _COMMANDS:
        try:
            mod = importlib.import_module(module)
            mod.add_parser(sub)
        except ImportError as exc:  # an optional extra is missing: say which
            if name not in sub.choices:
                p = sub.add_parser(name, help=f"(unavailable: {exc})")
                p.set_defaults(_unavailable=str(exc))
            continue
        sub.choices[name].set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "_unavailable", None):
        print(f"nanoflow {args.command}: unavailable ({args._unavailable}); install the matching extra, e.g. "
              "pip install 'nanoflow[serve,ui]'", file=sys.stderr)
        return 2
    from nanoflow.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:  # options that do not go together: say which, without a traceback
        print(f"nanoflow {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
