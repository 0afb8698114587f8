"""MoDE + LoRA against LoRA alone on an instruction-tuning batch (prompt tokens unscored): same model, one run."""
from __future__ import annotations

import torch

from ..depthmix_model import apply
from ..lora import config as lora_config
from ..models import load_model
from ..tuners import MoDEConfig
from .common import add_timing_args, training_ratios, training_step
from .tour import routing_tour
from .tour import routing_summary as summary  # noqa: F401  (what `depthmix demo` prints of the tour)


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="the causal LM both sides fine-tune: a name "
                   "(smollm2-135m is embedded), a folder or a Hub id")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per training step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (random tokens)")
    p.add_argument("--labelled", type=float, default=0.5, help="fraction of each sequence scored (the answer, "
                   "after an unscored prompt of ragged length)")
    add_timing_args(p, repeats=5, budget=180.0)
    p.add_argument("--num-layers", type=int, default=3, help="how many of the last blocks MoDE ensembles (>= 2)")
    p.add_argument("--mixing", default="token", choices=["token", "static"], help="MoDE's routing weights: per "
                   "token (a linear layer on the final hidden state) or static (one set shared by all tokens) "
                   "(choices: %(choices)s)")
    p.add_argument("--chunk-size", type=int, default=256, help="labelled tokens per chunk of the distillation "
                   "term (bounds its memory: chunk size x vocabulary)")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of MoDE's distillation term; 0 times the ensemble without distillation")
    p.add_argument("--tensor-peak", action="store_true",
                   help="on the CPU, also measure the peak of live tensors with the profiler (two more slow steps)")


def instruction_batch(vocab: int, batch_size: int, seq_len: int, labelled: float, device, seed: int = 0) -> dict:
    """Random tokens; each row's first part (a prompt of ragged length around 1 - labelled) is unscored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=g)
    labels = ids.clone()
    centre = round(seq_len * (1 - labelled))
    jitter = max(1, seq_len // 8)
    for row in range(batch_size):
        prompt = centre + (row % 3 - 1) * jitter  # ragged, averaging `labelled` over rows of 3
        labels[row, :max(0, min(seq_len - 1, prompt))] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def tensor_peak(step) -> int:
    """Peak bytes of live CPU tensors allocated during one call of `step`, from the profiler's allocation events
    (a check on the RSS high-water mark, which the C allocator's heap reuse and fragmentation can blur)."""
    from torch.profiler import ProfilerActivity, profile
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # the raw events carry every allocation (+bytes) and free (-bytes) with its time
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


def run(args) -> dict:
    torch.manual_seed(0)
    cfg = MoDEConfig(num_layers=args.num_layers, mixing=args.mixing, chunk_size=args.chunk_size,
                     distill_weight=args.distill_weight)
    models, params = {}, {}
    for key, method, use_lora in (("lora", None, True), ("method", cfg, True), ("alone", cfg, False)):
        base = load_model(args.model)
        lora = lora_config(base, r=8, lora_alpha=16) if use_lora else None
        dm = apply(base, method, lora).to(args.device).train()
        params[key] = dm.trainable_parameters()[0]
        if key != "alone":  # MoDE alone is counted, not timed
            models[key] = dm
    vocab = models["lora"].config.vocab_size
    batch = instruction_batch(vocab, args.batch_size, args.seq_len, args.labelled, args.device)
    labelled = int((batch["labels"][:, 1:] != -100).sum())

    result = {
        "method": "mode", "model": args.model, "device": args.device, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "labelled_tokens": labelled, "num_layers": args.num_layers, "mixing": args.mixing,
        "chunk_size": args.chunk_size, "distill_weight": args.distill_weight,
        **training_ratios(models, batch, args.repeats, args.device, args.budget),
        "trainable_params_ratio": round(params["method"] / params["lora"], 4),
        "trainable_params": {"lora": params["lora"], "mode+lora": params["method"], "mode_alone": params["alone"]},
    }
    if args.device == "cpu" and args.tensor_peak:
        tensors = {k: tensor_peak(training_step(m, batch)) for k, m in models.items()}
        result["tensor_peak_bytes"] = tensors
        result["tensor_peak_mem_ratio"] = round(tensors["method"] / tensors["lora"], 4)
    # the ensemble and its distillation cost FLOPs of their own: the time should follow them, not exceed them
    result["targets"] = {
        "peak_mem_ratio <= 1.10": result["peak_mem_ratio"] <= 1.10,
        "step_time_ratio <= 1.05 * flop_ratio": result["step_time_ratio"] <= 1.05 * result["flop_ratio"]}
    result["targets_met"] = all(result["targets"].values())
    print(f"MoDE+LoRA / LoRA on {args.model} (batch {args.batch_size} x {args.seq_len}, {labelled} labelled "
          f"tokens, {args.device}): step time {result['step_time_ratio']:.3f}x "
          f"(95% CI {result['step_time_ratio_spread']['ci95']}), "
          f"FLOPs {result['flop_ratio']:.3f}x, "
          f"peak step memory {result['peak_mem_ratio']:.3f}x, trainable params {result['trainable_params_ratio']:.3f}x "
          f"(MoDE alone: {params['alone']:,d} vs LoRA {params['lora']:,d})")
    return result


def tour(args, out):
    """`depthmix demo`'s part (bench/tour.py): smollm2-135m + LoRA on lm/pydoc, briefly; the ensemble's mixing
    weights, from an even start."""
    return routing_tour("mode", "smollm2-135m", "lm/pydoc", args, out, {"init_final_weight": 1 / 3})
