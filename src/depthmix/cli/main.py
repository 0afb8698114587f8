"""`depthmix` command line: one sub-command per module of this package."""
from __future__ import annotations

import argparse
import os
import sys

from ..config import ConfigError
from ..data.tasks import DataError
from ..io import AdapterError
from ..architectures import UnsupportedModelError

COMMANDS = ("train", "plot", "bench", "demo", "lm_eval", "pretrain", "flops", "models")  # modules of depthmix.cli; train also registers eval


class HelpFormatter(argparse.HelpFormatter):
    """Adds `(default: X)` to a flag's help, unless it has no default or its help already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "default" in text or any(action.default is v for v in
                                                                  (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    import importlib
    from .. import __version__
    parser = argparse.ArgumentParser(prog="depthmix", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"depthmix {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"depthmix.cli.{name}").register(sub)
    for p in parsers(parser):
        p.formatter_class = HelpFormatter
    return parser


def parsers(parser: argparse.ArgumentParser):
    """The parser and all its sub-command parsers, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from parsers(child)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ConfigError, DataError, AdapterError, UnsupportedModelError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"depthmix {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Under torchrun or accelerate launch the process group the Trainer joined is still up when a command returns.
    It is destroyed here, as PyTorch asks: left to the interpreter's exit, gloo's worker threads can abort the
    process ("terminate called without an active exception", exit -6) after a run that succeeded."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
