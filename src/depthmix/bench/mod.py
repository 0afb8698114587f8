"""MoD against the same dense model, side by side in one run: FLOPs, forward, training step, decoding, predictor.

Both models are the real SmolLM2-135M (by default): timing depends only on the shape, and the real weights let
the routers and the causal predictor be measured on real held-out text. Unless --adapter names a router-tuned
MoD adapter (`depthmix train --method mod --update retrofit ...`), the bench tunes them itself, briefly:
routers + predictors on the LM loss (retrofit update: the dense model's forward values at every processed token),
then each predictor fitted to its block's top-k membership on hidden states collected from a few forward passes,
on the training text of lm/tinyshakespeare; the predictor is scored on the held-out text.
"""
from __future__ import annotations

import torch

from .. import flops
from ..depthmix_model import DepthMixModel, apply
from ..evaluation import heldout_nll
from ..flags import add_dataclass_flags, pick
from ..models import load_model
from ..tuners import MoDConfig
from ..tuners.mod import retrofit
from ..tuners.mod.flops import analytic
from .common import DTYPES, add_dtype_arg, add_timing_args, interleaved_times

MOD_FLAGS = ("capacity", "layers")  # the bench tunes a retrofit MoD with these MoDConfig fields from flags


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="the causal LM measured, dense and with MoD: a name "
                   "(smollm2-135m is embedded), a folder or a Hub id")
    p.add_argument("--adapter", help="a router-tuned MoD adapter for --model, whose capacity and layers are used "
                   "instead of those flags (default: tune routers and predictors here, briefly)")
    add_dataclass_flags(p, MoDConfig, group="MoD options (without --adapter)", only=MOD_FLAGS)
    p.add_argument("--batch-size", type=int, default=2,
                   help="sequences per timed forward pass and training step (decoding runs at batch 1)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence of the timed batch, of the "
                   "held-out blocks and of the predictors' fitting passes")
    add_timing_args(p, repeats=5, budget=120.0)
    add_dtype_arg(p)
    p.add_argument("--prompt-len", type=int, default=64,
                   help="tokens of the held-out prompt that greedy decoding starts from")
    p.add_argument("--new-tokens", type=int, default=48, help="decoding speed: tokens per second of the decoding "
                   "steps (generate(new tokens) - generate(1 token), so prompt processing is left out); "
                   "generate_tokens_per_s_ratio keeps it in")
    p.add_argument("--task", default="lm/tinyshakespeare", help="text the routers/predictors learn and are scored on")
    p.add_argument("--data-dir", help="local data folder for --task (default: $DEPTHMIX_DATA, else the Hub)")
    p.add_argument("--tune-steps", type=int, default=10,
                   help="router (+ predictor) training steps, batch 4 x 128; without --adapter")
    p.add_argument("--feature-batches", type=int, default=8, help="forward passes (batch 4 x --seq-len) whose "
                   "hidden states the predictors are then fitted on; without --adapter")
    p.add_argument("--eval-blocks", type=int, default=24, help="held-out blocks of --seq-len tokens on which the "
                   "NLL and the predictors' accuracy are scored")


def text_blocks(task_name, split, tokenizer, size, data_dir, limit=None):
    from ..data.tasks import get_task
    from ..data.text import blocks
    rows = get_task(task_name).load(split, data_dir)
    out = [b for b in blocks(rows["text"], tokenizer, size) if len(b) == size]
    return torch.tensor(out[:limit] if limit else out)


def decode_ceiling(mod, realized: float | None) -> dict:
    """Two bounds on the decoding speed-up at batch 1. "weights": a step takes the time of reading the weights it
    uses (memory-bound, as on a GPU): dense reads every block, the norm and the LM head; MoD reads the routed blocks
    at their realized capacity, plus routers and predictors at every step. "blocks": a step takes the time of its
    block calls (overhead-bound, as a small model on a CPU): routed blocks run at their realized capacity."""
    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())
    c = realized if realized is not None else 1.0
    blocks = [nbytes(b) for b in mod.arch.blocks]
    rest = nbytes(mod.arch.head) + (nbytes(mod.arch.norm) if mod.arch.norm is not None else 0)
    routed = sum(blocks[t] for t in mod.method.layers)
    dense = sum(blocks) + rest
    n, r = len(blocks), len(mod.method.layers)
    return {"weights": round(dense / (dense - (1 - c) * routed + nbytes(mod.method)), 4),
            "blocks": round(n / (n - (1 - c) * r), 4)}


def run(args) -> dict:
    from ..models import load_tokenizer
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    dense, mod = build_pair(args, tok)
    heldout = text_blocks(args.task, "eval", tok, args.seq_len, args.data_dir, args.eval_blocks)
    quality = {"dense": heldout_nll(dense, heldout), "mod_causal": heldout_nll(mod, heldout, routing="causal"),
               "mod_topk": heldout_nll(mod, heldout, routing="topk-lookahead")}
    # the same random batch for both; no padding, so the dense model runs SDPA with is_causal (its fastest path)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, dense.config.vocab_size, (args.batch_size, args.seq_len), generator=g).to(args.device)
    fwd = forward_times(args, dense, mod, ids, heldout)
    trn = train_step_times(args, dense, mod, ids)
    dec = decode_times(args, tok, dense, mod, heldout)
    return report(args, dense, mod, quality, fwd, trn, dec)


def build_pair(args, tok):
    """The dense model and the same model with MoD: from --adapter, or with routers and predictors tuned here."""
    config = None if args.adapter else MoDConfig(**pick(args, MOD_FLAGS), update="retrofit")  # refused before loading
    dense = load_model(args.model, dtype=DTYPES[args.dtype]).to(args.device).eval()
    base = load_model(args.model, dtype=DTYPES[args.dtype])
    if args.adapter:
        return dense, DepthMixModel.from_pretrained(base, args.adapter).to(args.device)
    mod = apply(base, config).to(args.device)
    retrofit.tune(mod, text_blocks(args.task, "train", tok, 128, args.data_dir), args.tune_steps, loss="lm")
    retrofit.fit_predictors(mod, text_blocks(args.task, "train", tok, args.seq_len, args.data_dir),
                            args.feature_batches)
    return dense, mod


def forward(model, x):
    def fn():
        with torch.no_grad():
            model(input_ids=x, use_cache=False)
    return fn


def forward_times(args, dense, mod, ids, heldout) -> dict:
    """Forward FLOPs and times: top-k routing on the random batch, causal routing on held-out rows."""
    dev = args.device
    flop = {"dense": flops.forward_flops(dense, args.batch_size, args.seq_len),
            "mod": flops.forward_flops(mod, args.batch_size, args.seq_len, "topk-lookahead")}
    mod.method.routing = "topk-lookahead"
    topk = interleaved_times({"dense": forward(dense, ids), "mod": forward(mod, ids)}, args.repeats, device=dev,
                             pairs=[("mod", "dense")], budget_s=args.budget)
    # causal routing (evaluation, scoring, generation) decides per token from the text: real held-out rows, the
    # processed tokens of all rows packed, so the work should follow the realized capacity, not the busiest row
    rows = heldout[:args.batch_size].to(dev)
    mod.method.routing = "causal"
    flop["mod_causal"] = flops.forward_flops(mod, len(rows), args.seq_len, "causal", ids=rows)
    flop["dense_rows"] = flop["dense"] * len(rows) // args.batch_size  # dense FLOPs follow the shape alone
    mod.method.reset_stats()
    causal = interleaved_times({"dense": forward(dense, rows), "mod": forward(mod, rows)}, args.repeats,
                               device=dev, pairs=[("mod", "dense")], budget_s=args.budget)
    realized = mod.method.summary().get("realized_capacity")
    mod.method.routing = "auto"
    return {"flops": flop, "topk": topk, "causal": causal, "realized": realized}


def train_step_times(args, dense, mod, ids) -> dict:
    """A full training step (every weight trains, AdamW), as when training from scratch: FLOPs and times."""
    steps, train_flops = {}, {}
    for name, model in (("dense", dense), ("mod", mod)):
        model.train()
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
        steps[name] = step
        train_flops[name] = flops.count(lambda: model(input_ids=ids, labels=ids, use_cache=False).loss.backward())
    times = interleaved_times(steps, max(2, args.repeats - 2), warmup=1, device=args.device,
                              pairs=[("mod", "dense")], budget_s=args.budget)
    for model in (dense, mod):
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return {"flops": train_flops, "times": times}


def step_seconds(name, new_tokens):
    """One round's seconds per decoding step, prompt processing left out."""
    def fn(r):
        return (r[name] - r[f"{name}_first"]) / (new_tokens - 1)
    fn.__name__ = f"{name}_step"
    return fn


def decode_times(args, tok, dense, mod, heldout) -> dict:
    """Greedy decoding at batch 1 from a real prompt; MoD decodes with causal routing and its own KV stores."""
    prompt = heldout[:1, :args.prompt_len].to(args.device)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id, attention_mask=torch.ones_like(prompt))

    def decode(model, **extra):
        def fn():
            with torch.no_grad():
                model.generate(prompt, **{**kw, **extra})
        return fn

    first = {"max_new_tokens": 1, "min_new_tokens": 1}  # prompt and first token: subtracted to get the steps alone
    mod.method.reset_stats()
    times = interleaved_times({"dense": decode(dense), "mod": decode(mod), "dense_first": decode(dense, **first),
                               "mod_first": decode(mod, **first)}, args.repeats, warmup=1, device=args.device,
                              pairs=[(step_seconds("dense", args.new_tokens), step_seconds("mod", args.new_tokens)),
                                     ("dense", "mod")], budget_s=args.budget)
    return {"times": times, "realized": mod.method.summary().get("realized_capacity")}


def report(args, dense, mod, quality, fwd, trn, dec) -> dict:
    """The result JSON (ratios, spreads, targets) and its one-line summary."""
    flop, new = fwd["flops"], args.new_tokens
    times = {"forward": fwd["topk"], "forward_causal": fwd["causal"], "train_step": trn["times"],
             "decode": dec["times"]}
    d = dec["times"]
    spreads = {"forward_time_ratio": fwd["topk"].ratio("mod", "dense"),
               "forward_causal_time_ratio": fwd["causal"].ratio("mod", "dense"),
               "train_step_time_ratio": trn["times"].ratio("mod", "dense"),
               "decode_tokens_per_s_ratio": d.ratio(step_seconds("dense", new), step_seconds("mod", new)),
               "generate_tokens_per_s_ratio": d.ratio("dense", "mod")}
    step = {k: (d.median(k) - d.median(f"{k}_first")) / (new - 1) for k in ("dense", "mod")}
    ceiling = decode_ceiling(mod, dec["realized"])
    config = mod.method_config  # the adapter's with --adapter
    est = analytic(dense.config, args.seq_len, mod.method.layers, config.capacity, mod.arch.num_layers,
                   dense.config.vocab_size, predictor=config.causal == "predictor", skip=config.skip)
    flop_ratio = flop["mod"] / flop["dense"]
    result = {
        "method": "mod", "model": args.model, "device": args.device, "dtype": args.dtype, "capacity": config.capacity,
        "layers": mod.method.layers, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "flop_ratio": round(flop_ratio, 4),
        "flop_ratio_causal": round(flop["mod_causal"] / flop["dense_rows"], 4),
        "realized_capacity_forward_causal": fwd["realized"],
        **{name: spread["median"] for name, spread in spreads.items()},
        "train_flop_ratio": round(trn["flops"]["mod"] / trn["flops"]["dense"], 4),
        "decode_ceiling": ceiling,
        "decode_fraction_of_ceiling": {k: round(spreads["decode_tokens_per_s_ratio"]["median"] / v, 4)
                                       for k, v in ceiling.items()},
        "spreads": spreads,
        "timing": {name: r.stopped for name, r in times.items()},
        "predictor_accuracy": quality["mod_causal"].get("predictor_accuracy"),
        "predictor_accuracy_topk_states": quality["mod_topk"].get("predictor_accuracy"),
        "realized_capacity_causal": quality["mod_causal"].get("realized_capacity"),
        "realized_capacity_decode": dec["realized"],
        "analytic_flop_ratio": est["ratio"], "analytic_block_flop_ratio": est["block_ratio"],
        "forward_flops": flop, "train_flops": trn["flops"],
        "seconds": {name: {k: round(r.median(k), 4) for k in r.seconds} for name, r in times.items()},
        # medians that do not differ measured no decoding step: no speed to report
        "decode_tokens_per_s": {k: round(1 / v, 2) if v > 0 else None for k, v in step.items()},
        "generate_tokens_per_s": {k: round(new / d.median(k), 2) for k in ("dense", "mod")},
        "heldout_nll": {k: round(v["nll"], 4) for k, v in quality.items()},
        "tuned": "adapter " + args.adapter if args.adapter else
                 f"{args.tune_steps} router+predictor steps, predictors fitted on {args.feature_batches} x 4 x "
                 f"{args.seq_len} tokens of {args.task}",
    }
    result["targets"] = {
        "forward_time_ratio <= 1.05 * flop_ratio": result["forward_time_ratio"] <= 1.05 * flop_ratio,
        "train_step_time_ratio <= 1.05 * train_flop_ratio":
            result["train_step_time_ratio"] <= 1.05 * result["train_flop_ratio"],
        "decode_tokens_per_s_ratio >= 1.5 (batch 1)": result["decode_tokens_per_s_ratio"] >= 1.5,
        "predictor_accuracy >= 0.97": (result["predictor_accuracy"] or 0) >= 0.97,
    }
    print(f"MoD / dense on {args.model} ({args.device}): FLOPs {flop_ratio:.3f}x, forward "
          f"{result['forward_time_ratio']:.3f}x (top-k), {result['forward_causal_time_ratio']:.3f}x causal on "
          f"held-out text (FLOPs {result['flop_ratio_causal']:.3f}x, realized capacity {fwd['realized']:.3f}), "
          f"train step {result['train_step_time_ratio']:.3f}x (FLOPs {result['train_flop_ratio']:.3f}x), decode "
          f"{result['decode_tokens_per_s_ratio']:.2f}x tokens/s (ceilings: weights read {ceiling['weights']:.2f}x, "
          f"block calls {ceiling['blocks']:.2f}x), predictor accuracy {result['predictor_accuracy']}")
    return result
