"""depthmix flops: FLOPs of one forward pass, dense vs MoD, counted on a real forward and estimated per block."""
from __future__ import annotations

import json

from ..flags import add_dataclass_flags, at_least, pick
from ..tuners.mod.config import MoDConfig

MOD_FLAGS = ("capacity", "layers", "causal", "skip")  # the MoDConfig fields a FLOP count depends on


def register(sub) -> None:
    p = sub.add_parser("flops", help="count the FLOPs of a forward pass, dense vs a method (MoD)")
    p.add_argument("--model", default="smollm2-135m", help="a model name, folder, or 'shape:NAME' for its shape "
                   "with random weights (no weights loaded)")
    p.add_argument("--method", default="mod", choices=["mod"],
                   help="the method counted against the dense model (choices: %(choices)s)")
    p.add_argument("--adapter", help="a trained MoD adapter for --model: its routers decide the causal count, and "
                   "its capacity, layers, causal and skip are used instead of those flags")
    add_dataclass_flags(p, MoDConfig, group="MoD options (without --adapter)", only=MOD_FLAGS)
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
    from ..depthmix_model import apply
    from ..tuners.mod.flops import analytic
    config = None if args.adapter else MoDConfig(**pick(args, MOD_FLAGS))  # refused before the model loads
    torch.manual_seed(args.seed)
    dense = load(args.model)
    counted = {"dense": flops.forward_flops(dense, args.batch_size, args.seq_len, seed=args.seed)}
    if args.adapter:
        from ..depthmix_model import DepthMixModel
        mod = DepthMixModel.from_pretrained(dense, args.adapter)
        config = mod.method_config
        if config is None or config.method != "mod":
            raise ConfigError(f"{args.adapter}: not an MoD adapter")
    else:
        torch.manual_seed(args.seed)
        mod = apply(dense, config)
    for routing in ("topk", "causal"):
        mod.method.reset_stats()
        counted[f"mod_{routing}"] = flops.forward_flops(mod, args.batch_size, args.seq_len, routing, seed=args.seed)
    realized = mod.method.summary().get("realized_capacity")
    why = (f"what this adapter's trained {config.causal} lets through on random tokens" if args.adapter else
           f"what an untrained {config.causal} (seed {args.seed}) lets through, not a trained router's share; "
           "pass --adapter for a trained one")
    est = analytic(dense.config, args.seq_len, mod.method.layers, config.capacity, mod.arch.num_layers,
                   dense.config.vocab_size, predictor=config.causal == "predictor", skip=config.skip)
    result = {
        "model": args.model, "method": "mod", "capacity": config.capacity, "skip": config.skip,
        "layers": mod.method.layers, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "counted": counted, "flop_ratio": round(counted["mod_topk"] / counted["dense"], 4),
        "flop_ratio_causal": round(counted["mod_causal"] / counted["dense"], 4),
        "realized_capacity_causal": realized, "realized_capacity_note": why, "seed": args.seed,
        "analytic_per_sequence": est,
    }
    if not args.json:
        print(f"{args.model}, seq {args.seq_len}: dense {counted['dense']:.4e} FLOPs/forward, MoD top-k "
              f"{counted['mod_topk']:.4e} ({result['flop_ratio']:.3f}x; analytic {est['ratio']:.3f}x, blocks only "
              f"{est['block_ratio']:.3f}x), MoD causal {counted['mod_causal']:.4e} ({result['flop_ratio_causal']:.3f}x "
              f"at realized capacity {realized}, asked {config.capacity}: {why})")
    print(json.dumps(result))
    return 0
