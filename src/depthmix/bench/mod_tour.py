"""MoD's part of `depthmix demo` (bench/tour.py): SmolLM2-135M dense, with blocks dropped, and with MoD."""
from __future__ import annotations

import copy
from pathlib import Path

from .tour import step

METHOD = "mod"
TEXT = "lm/pydoc"  # the help topics of CPython's pydoc_data: ships with Python


def tour(args, out: Path) -> dict:
    """Dense SmolLM2, the same with its least influential blocks dropped, and MoD on the blocks around them with
    threshold routing at a matched FLOP budget: held-out NLL, counted FLOPs and decoding tokens/s side by side."""
    import torch

    from .. import apply
    from ..evaluation.perplexity import heldout_nll
    from ..flops import forward_flops
    from ..models import load_model, load_tokenizer
    from ..train import load_trained
    from ..tuners.mod import MoDConfig
    from ..tuners.mod.importance import block_influence, drop_blocks, least_important
    from ..tuners.mod.retrofit import calibrate_gates, tune
    from .common import interleaved_times
    from .mod import text_blocks

    step("MoD on SmolLM2-135M: loading the model and the text (pydoc help topics)")
    torch.manual_seed(args.seed)
    dense = load_model("smollm2-135m").eval()
    tok = load_tokenizer("smollm2-135m")
    train = text_blocks(TEXT, "train", tok, 128, None, limit=64)
    held = text_blocks(TEXT, "eval", tok, 128, None, limit=16)
    scores = block_influence(dense, train[:8])
    n_drop = 4
    dropped = least_important(scores, n_drop)
    drop = drop_blocks(copy.deepcopy(dense), dropped).eval()
    if args.mod_adapter:
        mod, _, _ = load_trained(args.mod_adapter, None, "causal_lm", None)
        how = f"adapter {args.mod_adapter}"
    else:
        # the blocks the drop removes, and as many of the next least influential, each run by half of the tokens:
        # the same share of block compute as the drop
        layers = sorted(least_important(scores, 2 * n_drop))
        config = MoDConfig(layers=layers, capacity=0.5, update="gated", causal="threshold")
        mod = apply(copy.deepcopy(dense), config)
        step(f"MoD: tuning the routers of blocks {layers} ({args.tune_steps} steps, distilled from the dense model)")
        tune(mod, train, args.tune_steps, batch=2, loss="distill", seed=args.seed)
        calibrate_gates(mod, train[:8])
        how = f"blocks {layers} at capacity 0.5, routers tuned {args.tune_steps} steps"
    mod.eval()
    step("MoD: held-out NLL and counted FLOPs")
    models = {"dense": dense, f"drop {n_drop} blocks": drop, "MoD": mod}
    rows = {}
    for name, m in models.items():
        nll = heldout_nll(m, held, routing="causal" if name == "MoD" else None)
        rows[name] = {"nll": round(nll["nll"], 4), "flops": forward_flops(m, 1, 128, "causal", ids=held[:1])}
        if name == "MoD":
            rows[name]["realized_capacity"] = nll.get("realized_capacity")
    n = args.new_tokens
    step(f"MoD: decoding speed, batch 1, {n} new tokens from a 64-token prompt (the three timed in turns)")
    prompt = held[:1, :64]

    def decoder(m):
        return lambda: m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    with torch.no_grad():
        rounds = interleaved_times({name: decoder(m) for name, m in models.items()}, repeats=args.repeats, warmup=1)
    for name in models:
        rows[name]["flop_ratio"] = round(rows[name]["flops"] / rows["dense"]["flops"], 4)
        rows[name]["decode_speedup"] = rounds.ratio("dense", name)
        rows[name]["tokens_per_s"] = round(n / rounds.median(name), 1)
    return {"model": "smollm2-135m", "text": TEXT, "held_out": f"{len(held)} x 128 tokens", "mod": how,
            "dropped": dropped, "rows": rows}


def summary(result: dict) -> str:
    lines = [f"MoD on {result['model']} ({result['mod']}); held-out NLL on {result['held_out']} of {result['text']}",
             "model             held-out NLL  FLOP ratio  decode tokens/s  speed-up (IQR)"]
    for name, r in sorted(result["rows"].items(), key=lambda item: -item[1]["flop_ratio"]):
        s = r["decode_speedup"]
        lines.append(f"{name:<18}{r['nll']:>12.3f}{r['flop_ratio']:>12.3f}{r['tokens_per_s']:>17.1f}  "
                     f"{s['median']:.2f}x ({s['iqr'][0]:.2f}-{s['iqr'][1]:.2f})")
    drop = next(r for name, r in result["rows"].items() if name.startswith("drop"))
    mod = result["rows"]["MoD"]
    nll = "lower" if mod["nll"] < drop["nll"] else "higher"
    speed = "faster" if mod["decode_speedup"]["median"] > drop["decode_speedup"]["median"] else "slower"
    lines.append(f"At about the same FLOPs, this MoD has a {nll} held-out NLL than dropping blocks and decodes {speed} "
                 "(docs/results-mod.md has the full study).")
    return "\n".join(lines)
