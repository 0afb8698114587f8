"""depthmix pretrain: a small causal LM from random init on a text file, dense or with a method (MoD is the one made
for it), with a FLOP budget."""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..flags import add_dataclass_flags, parse_value, pick

NAMES: list[str] = []
METHOD_FLAGS: dict[str, dict[str, str]] = {}  # method -> {flag's dest: its config field}


def register(sub) -> None:
    from ..train.pretrain import PretrainOptions
    from ..tuners import METHODS
    p = sub.add_parser("pretrain", help="train a small causal LM from scratch (dense or with a method) on a text file",
                       description="The training-FLOP budget (--flops) is counted on a real training step of the "
                                   "model as built. Held-out loss is reported in each routing mode the method "
                                   "compares (MoD: causal, what generation does, and topk-lookahead).")
    NAMES[:] = add_dataclass_flags(p, PretrainOptions, skip=("method_config",))
    for name, (cfg, _) in METHODS.items():
        # a field named like a pretrain option (MoD's `layers`) is --METHOD-FIELD here
        clash = [f for f in dataclasses.fields(cfg) if f.name in NAMES]
        group = f"{name} options"
        METHOD_FLAGS[name] = {n: n for n in add_dataclass_flags(p, cfg, skip=[f.name for f in clash], group=group)}
        for f in clash:
            dest = f"{name}_{f.name}"
            section = next(g for g in p._action_groups if g.title == group)
            section.add_argument(f"--{dest.replace('_', '-')}", dest=dest, type=parse_value, metavar="VALUE",
                                 default=argparse.SUPPRESS,
                                 help=f"{cfg.__name__}.{f.name}: {f.metadata.get('help', '')} (default: {f.default})")
            METHOD_FLAGS[name][dest] = f.name
    p.set_defaults(func=run)


def options(args):
    from ..config import ConfigError
    from ..train.pretrain import PretrainOptions
    values = pick(args, NAMES)
    method = values.get("method", "dense")
    given = {n for flags in METHOD_FLAGS.values() for n in flags if hasattr(args, n)}
    stray = sorted(given - set(METHOD_FLAGS.get(method, ())))
    if stray:
        raise ConfigError(f"--{stray[0].replace('_', '-')} is not an option of method {method!r}")
    config = {METHOD_FLAGS[method][n]: getattr(args, n) for n in given}
    return PretrainOptions(**values, method_config=config)


def run(args) -> int:
    from ..train.pretrain import pretrain
    s = pretrain(options(args))
    print(json.dumps({"params": s["params"], "train_steps": s["train_steps"], "train_flops": s["train_flops"],
                      "forward_flops": s["forward_flops"], "heldout": s["heldout"]}, indent=2))
    return 0
