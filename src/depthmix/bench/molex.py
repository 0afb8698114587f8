"""MoLEx + LoRA against LoRA alone: same model, same batch, one run."""
from __future__ import annotations

import torch

from ..depthmix_model import apply
from ..lora import config as lora_config
from ..models import load_model
from ..architectures import resolve
from ..tuners import MoLExConfig
from .common import add_timing_args, training_ratios
from .tour import routing_tour
from .tour import routing_summary as summary  # noqa: F401  (what `depthmix demo` prints of the tour)


def add_args(p) -> None:
    p.add_argument("--model", default="minilm-l6", help="the model both sides fine-tune: a name (minilm-l6 is "
                   "embedded), a folder or a Hub id; an encoder gets a 2-label classification head, a causal LM "
                   "trains on next tokens")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per training step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (random tokens)")
    add_timing_args(p, repeats=10, budget=120.0)
    p.add_argument("--granularity", default="sequence", choices=["sequence", "token"], help="MoLEx's expert choice: "
                   "one expert per sequence or one per token (choices: %(choices)s)")


def synthetic_batch(model, batch_size, seq_len, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if resolve(model).causal:
        batch["labels"] = ids.clone()
    else:
        batch["labels"] = torch.randint(0, model.config.num_labels, (batch_size,), generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def build_pair(name, device, method_config):
    """Two copies of the base model: LoRA alone, and the method on top of LoRA."""
    head = "causal_lm"
    models = {}
    for key, cfg in (("lora", None), ("method", method_config)):
        base = load_model(name, head=head) if _is_causal(name) else load_model(name, "sequence_classification", 2)
        lora = lora_config(base, r=8, lora_alpha=16)
        models[key] = apply(base, cfg, lora).to(device).train()
    return models


def _is_causal(name) -> bool:
    from transformers import AutoConfig
    from ..models import resolve_model
    from ..architectures import FAMILIES
    mt = AutoConfig.from_pretrained(resolve_model(name)).model_type
    return not any(mt in f.model_types and not f.causal for f in FAMILIES)


def run(args) -> dict:
    torch.manual_seed(0)
    models = build_pair(args.model, args.device, MoLExConfig(granularity=args.granularity))
    batch = synthetic_batch(models["lora"], args.batch_size, args.seq_len, args.device)
    result = {"method": "molex", "model": args.model, "device": args.device, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "granularity": args.granularity,
              **training_ratios(models, batch, args.repeats, args.device, args.budget)}
    result["target"] = "step_time_ratio <= 1.05 * flop_ratio"
    result["target_met"] = result["step_time_ratio"] <= 1.05 * result["flop_ratio"]
    print(f"MoLEx+LoRA / LoRA on {args.model} (batch {args.batch_size} x {args.seq_len}, {args.device}): "
          f"step time {result['step_time_ratio']:.3f}x (95% CI {result['step_time_ratio_spread']['ci95']}), FLOPs {result['flop_ratio']:.3f}x, "
          f"peak step memory {result['peak_mem_ratio']:.3f}x")
    return result


def tour(args, out):
    """`depthmix demo`'s part (bench/tour.py): minilm-l6 + LoRA on pydoc/topics, briefly; which layer its gate
    chose at each layer."""
    return routing_tour("molex", "minilm-l6", "pydoc/topics", args, out)
