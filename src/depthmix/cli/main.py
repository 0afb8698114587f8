"""`depthmix` command line: one sub-command per module of this package."""
from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError
from ..data.tasks import DataError
from ..io import AdapterError
from ..registry import UnsupportedModelError

COMMANDS = ("train", "plot", "bench", "demo", "lm_eval", "pretrain", "flops", "models")  # modules of depthmix.cli; train also registers eval


def build_parser() -> argparse.ArgumentParser:
    import importlib
    parser = argparse.ArgumentParser(prog="depthmix", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"depthmix.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, DataError, AdapterError, UnsupportedModelError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"depthmix {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
