"""`depthmix` command line: one sub-command per module of this package."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from ..config import ConfigError
from ..data.tasks import DataError
from ..io import AdapterError
from ..architectures import UnsupportedModelError

COMMANDS = ("train", "plot", "bench", "demo", "lm_eval", "pretrain", "flops", "drop", "models")  # modules of depthmix.cli; train also registers eval


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
        if not any(isinstance(a, argparse._SubParsersAction) for a in p._actions):  # each command's own flags
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="show the libraries' own logs (transformers' load reports, DeepSpeed's warnings) "
                                "and a traceback with each error (default: false)")
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
    verbose = getattr(args, "verbose", False)
    name = " ".join(n for n in (args.command, getattr(args, "kind", None)) if n)
    try:
        with contextlib.nullcontext() if verbose else quiet_libraries():
            return args.func(args) or 0
    except (ConfigError, DataError, AdapterError, UnsupportedModelError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"depthmix {name}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if verbose:
            raise
        print(f"depthmix {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine's side (a full disk, a folder that cannot be written): no traceback helps
        if verbose:
            raise
        print(f"depthmix {name}: error: {e} (-v shows where)", file=sys.stderr)
        return 1
    finally:
        leave_process_group()


@contextlib.contextmanager
def quiet_libraries():
    """transformers' load reports and weight-loading bars, and DeepSpeed's accelerator warnings, are about the
    libraries' internals, which depthmix takes care of: a user sees them with -v. Errors still show, and the
    settings are put back when the command ends (depthmix may run inside a user's process)."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    deepspeed = logging.getLogger("DeepSpeed")  # it sets its level when imported (late, by the Trainer): a filter stays
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    deepspeed.addFilter(_errors_only)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        deepspeed.removeFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def leave_process_group() -> None:
    """Under torchrun or accelerate launch the process group the Trainer joined is still up when a command returns.
    It is destroyed here, as PyTorch asks: left to the interpreter's exit, gloo's worker threads can abort the
    process ("terminate called without an active exception", exit -6) after a run that succeeded."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
