"""depthmix pretrain: a small causal LM from random init on a text file, dense or MoD, with a FLOP budget."""
from __future__ import annotations

import json

from ..flags import add_dataclass_flags, parse_value, pick

NAMES: list[str] = []
MOD_NAMES: list[str] = []


def register(sub) -> None:
    from ..train.pretrain import PretrainOptions
    from ..tuners import MoDConfig
    p = sub.add_parser("pretrain", help="train a small causal LM from scratch (dense or MoD) on a text file",
                       description="The training-FLOP budget (--flops) is counted on a real training step of the "
                                   "model as built. Held-out loss is reported with causal routing (what "
                                   "generation does) and with top-k routing.")
    NAMES[:] = add_dataclass_flags(p, PretrainOptions, skip=("method_config",))
    MOD_NAMES[:] = add_dataclass_flags(p, MoDConfig, skip=("layers",), group="mod options")
    p.add_argument("--mod-layers", dest="mod_layers", type=parse_value, metavar="VALUE",
                   help="MoDConfig.layers: every_other (default), all, or a list like 1,3,5")
    p.set_defaults(func=run)


def options(args):
    from ..config import ConfigError
    from ..train.pretrain import PretrainOptions
    values = pick(args, NAMES)
    mod = pick(args, MOD_NAMES)
    if getattr(args, "mod_layers", None) is not None:
        mod["layers"] = args.mod_layers
    if mod and values.get("method", "dense") != "mod":
        raise ConfigError(f"--{sorted(mod)[0].replace('_', '-')} is an MoD option; add --method mod")
    return PretrainOptions(**values, method_config=mod)


def run(args) -> int:
    from ..train.pretrain import pretrain
    s = pretrain(options(args))
    print(json.dumps({"params": s["params"], "train_steps": s["train_steps"], "train_flops": s["train_flops"],
                      "forward_flops": s["forward_flops"], "heldout": s["heldout"]}, indent=2))
    return 0
