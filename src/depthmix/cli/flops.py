"""depthmix flops: FLOPs of one forward pass, dense vs a method, counted on a real forward and estimated from the
model's shape by the method (Method.flop_report)."""
from __future__ import annotations

import json

from ..flags import add_dataclass_flags, at_least, pick
from ..tuners import METHODS

COUNTED = [name for name, (cfg, _) in METHODS.items() if cfg.flop_fields]  # methods `flops` counts


def register(sub) -> None:
    p = sub.add_parser("flops", help="count the FLOPs of a forward pass, dense vs a method")
    p.add_argument("--model", default="smollm2-135m", help="a model name, folder, or 'shape:NAME' for its shape "
                   "with random weights (no weights loaded)")
    p.add_argument("--method", default=COUNTED[0], choices=COUNTED,
                   help="the method counted against the dense model (choices: %(choices)s)")
    p.add_argument("--adapter", help="a trained adapter of the method for --model: its routers decide the counts, "
                   "and its config is used instead of the method's flags")
    for name in COUNTED:
        cfg = METHODS[name][0]
        add_dataclass_flags(p, cfg, group=f"{name} options (without --adapter)", only=cfg.flop_fields)
    p.add_argument("--seq-len", type=at_least(1), default=512, help="tokens per sequence")
    p.add_argument("--batch-size", type=at_least(1), default=1, help="sequences per forward pass")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the routers (untrained without --adapter), of "
                   "'shape:' weights and of the random tokens: the same command gives the same numbers")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.set_defaults(func=run)


def load(name: str):
    """A causal LM by name; 'shape:NAME' builds NAME's architecture with random weights on the meta-free CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import load_model, resolve_model
    from ..train.preflight import model_config
    model_config(name.removeprefix("shape:"))  # an unknown name fails in one line, not after the Hub's retries
    if name.startswith("shape:"):
        cfg = AutoConfig.from_pretrained(resolve_model(name[len("shape:"):]))
        return AutoModelForCausalLM.from_config(cfg)
    return load_model(name)


def run(args) -> int:
    import torch

    from .. import flops
    from ..config import ConfigError
    from ..depthmix_model import DepthMixModel, apply
    cfg = METHODS[args.method][0]
    config = None if args.adapter else cfg(**pick(args, cfg.flop_fields))  # refused before the model loads
    torch.manual_seed(args.seed)
    dense = load(args.model)
    dense_flops = flops.forward_flops(dense, args.batch_size, args.seq_len, seed=args.seed)
    if args.adapter:
        model = DepthMixModel.from_pretrained(dense, args.adapter)
        if model.method_config is None or model.method_config.method != args.method:
            raise ConfigError(f"{args.adapter}: not an adapter of method {args.method!r}")
    else:
        torch.manual_seed(args.seed)
        model = apply(dense, config)
    result, line = model.method.flop_report(model, dense_flops, args.batch_size, args.seq_len, args.seed,
                                            trained=bool(args.adapter))
    result = {"model": args.model, "method": args.method, **result}
    if not args.json:
        print(f"{args.model}, seq {args.seq_len}: {line}")
    print(json.dumps(result))
    return 0
