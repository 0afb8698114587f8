"""MoLEx + LoRA against LoRA alone: same model, same batch, one run."""
from __future__ import annotations

import torch

from ..depthmix_model import apply
from ..lora import config as lora_config
from ..models import load_model
from ..architectures import resolve
from ..tuners import MoLExConfig
from .common import add_timing_args, count_flops, interleaved_times, peak_memory


def add_args(p) -> None:
    p.add_argument("--model", default="minilm-l6", help="the model both sides fine-tune: a name (minilm-l6 is "
                   "embedded), a folder or a Hub id; an encoder gets a 2-label classification head, a causal LM "
                   "trains on next tokens")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per training step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (random tokens)")
    add_timing_args(p, repeats=10, budget=120.0)
    p.add_argument("--granularity", default="sequence", choices=["sequence", "token"], help="MoLEx's expert choice: "
                   "one expert per sequence or one per token (choices: %(choices)s)")


def training_step(model, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    return step


def forward_backward(model, batch):
    def run():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    return run


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


def compare(models: dict, batch: dict, repeats: int, device, budget_s: float = 0.0) -> dict:
    steps = {k: training_step(m, batch) for k, m in models.items()}
    times = interleaved_times(steps, repeats, device=device, pairs=[("method", "lora")], budget_s=budget_s)
    flops = {k: count_flops(forward_backward(m, batch)) for k, m in models.items()}
    mem = {k: peak_memory(steps[k], device) for k in models}
    step = times.ratio("method", "lora")
    return {
        "step_time_ratio": step["median"],
        "step_time_ratio_spread": step,
        "timing": times.stopped,
        "flop_ratio": round(flops["method"] / flops["lora"], 4),
        "peak_mem_ratio": round(mem["method"] / mem["lora"], 4),
        "step_seconds": {k: round(times.median(k), 4) for k in steps},
        "train_flops": flops,
        "step_peak_bytes": mem,
    }


def run(args) -> dict:
    torch.manual_seed(0)
    models = build_pair(args.model, args.device, MoLExConfig(granularity=args.granularity))
    batch = synthetic_batch(models["lora"], args.batch_size, args.seq_len, args.device)
    result = {"method": "molex", "model": args.model, "device": args.device, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "granularity": args.granularity, **compare(models, batch, args.repeats, args.device, args.budget)}
    result["target"] = "step_time_ratio <= 1.05 * flop_ratio"
    result["target_met"] = result["step_time_ratio"] <= 1.05 * result["flop_ratio"]
    print(f"MoLEx+LoRA / LoRA on {args.model} (batch {args.batch_size} x {args.seq_len}, {args.device}): "
          f"step time {result['step_time_ratio']:.3f}x (95% CI {result['step_time_ratio_spread']['ci95']}), FLOPs {result['flop_ratio']:.3f}x, "
          f"peak step memory {result['peak_mem_ratio']:.3f}x")
    return result
