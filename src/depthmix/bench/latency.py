"""MoD's prefill latency and decoding speed against the same dense model, by prompt length and batch size.

For each cell (prompt length P, batch B) both models run greedy `generate` on the same random prompt [B, P],
interleaved round by round in one process: time to the first token (the prefill) and the decoding steps alone
(generate(N tokens) - generate(1 token)), each as a ratio to dense with its spread; peak memory of the whole
generate (measured after every timing); FLOPs counted on what really ran (prefill, and the N - 1 decoding
steps); and the analytic ceilings: prefill, the FLOP ratio of generate's prefill at P tokens (the LM head on the
last token only); decoding, the bytes a step must read (weights of the blocks a step runs, plus the KV cache of
the tokens it attends to), memory-bound as a GPU decodes.

MoD routes causally here (what inference runs). Without --adapter its routers and predictors are untrained, so
before timing each predictor's output bias is set so that it routes the --capacity share of the tokens of a
calibration prompt: speed depends on how many tokens a routed block runs, not on which (quality is not measured).
--time-limit bounds the whole run: a cell that would not fit is skipped and listed, so the table always ends."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..depthmix_model import DepthMixModel, apply
from ..flags import add_dataclass_flags, at_least, pick
from ..models import load_model
from ..tuners import MoDConfig
from ..tuners.mod.flops import analytic, block_shape
from .common import DTYPES, add_dtype_arg, add_timing_args, interleaved_times, peak_memory
from .mod import step_seconds

METHOD = "mod"  # the method this benchmark measures
MOD_FLAGS = ("capacity", "layers", "skip")  # MoDConfig fields from flags (update is "retrofit": a pretrained model)


def _ints(text: str) -> list[int]:
    import argparse
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers such as 128,512,2048") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers >= 1")
    return values


def add_args(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="the causal LM measured, dense and with MoD: a name "
                   "(smollm2-135m is embedded), a folder or a Hub id")
    p.add_argument("--adapter", help="a MoD adapter for --model (`depthmix train --method mod ...`): its capacity, "
                   "layers, skip and trained routers are used instead of those flags")
    add_dataclass_flags(p, MoDConfig, group="MoD options (without --adapter)", only=MOD_FLAGS)
    p.add_argument("--prompt-lens", type=_ints, default=[128, 512, 2048],
                   help="prompt lengths, comma-separated (default: 128,512,2048)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16],
                   help="batch sizes, comma-separated (default: 1,4,16)")
    p.add_argument("--new-tokens", type=at_least(2), default=32, help="tokens generated per timed decode (>= 2: the "
                   "decoding steps are generate(N) - generate(1))")
    add_timing_args(p, repeats=3, budget=30.0)
    add_dtype_arg(p)
    p.add_argument("--compile", action="store_true", help="torch.compile both models' forward (mode "
                   '"reduce-overhead", CUDA graphs, on CUDA; "default" elsewhere); MoD\'s routing decisions break '
                   "the graph where the shapes depend on them. Off: eager, as a user runs it")
    p.add_argument("--compile-backend", default="inductor", help='torch.compile backend with --compile ("eager" '
                   "traces without generating code: a quick check that compiling works)")
    p.add_argument("--time-limit", type=float, default=900.0, help="seconds for the whole table; cells that would "
                   "not fit are skipped and listed (default: %(default)s)")
    p.add_argument("--out", default="out/bench-latency", help="folder of latency.json and latency.png (rewritten "
                   "after each cell, so a stopped run keeps what it measured)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")


def check(args) -> None:
    if args.time_limit <= 0:
        raise ValueError(f"--time-limit {args.time_limit}: expected seconds > 0")


def build(args):
    """(dense, mod) on args.device in args.dtype, both in eval mode, SDPA attention."""
    config = None if args.adapter else MoDConfig(**pick(args, MOD_FLAGS), update="retrofit")  # refused before loading
    dtype = DTYPES[args.dtype]
    dense = load_model(args.model, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
    base = load_model(args.model, dtype=dtype, attn_implementation="sdpa")
    if args.adapter:
        mod = DepthMixModel.from_pretrained(base, args.adapter)
    else:
        mod = apply(base, config)
    return dense, mod.to(args.device).eval()


def calibrate(mod, ids: torch.Tensor) -> None:
    """Set each routed block's decision bias (predictor, or router with causal="aux_loss") so that it routes the
    configured capacity of the tokens of `ids`: one causal forward, each bias set just before its block runs."""
    method = mod.method
    q = 1 - method.config.capacity

    def last(i):
        return method.predictors[i][-1] if method.config.causal == "predictor" else method.routers[i]

    def hook(module, args, kwargs, i):
        x = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            logits = (method.predictor(i, x) if method.config.causal == "predictor" else method.router(i, x))
            last(i).bias -= torch.quantile(logits.flatten().float(), q).to(last(i).bias.dtype)

    hooks = [method.routed_module(i).register_forward_pre_hook(
        lambda m, a, kw, i=i: hook(m, a, kw, i), with_kwargs=True) for i in range(len(method.layers))]
    try:
        with torch.no_grad(), method.routing_mode("causal"):
            mod(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def compile_forward(model, device: str, backend: str) -> None:
    """torch.compile the HF model's forward in place (generate() calls it)."""
    base = getattr(model, "base_model", model)
    mode = "reduce-overhead" if torch.device(device).type == "cuda" and backend == "inductor" else None
    base.forward = torch.compile(base.forward, mode=mode, backend=backend)


def prefill_ceiling(est: dict, config, prompt_len: int) -> float:
    """1 / the analytic FLOP ratio of generate's prefill, which computes the LM head on the last prompt token only
    (analytic() counts it on every token, as a training forward does)."""
    head = 2 * (prompt_len - 1) * block_shape(config)["d"] * config.vocab_size
    return round((est["dense"] - head) / (est["mod"] - head), 4)


def kv_bytes_per_token(config, dtype) -> int:
    """K and V of one token in one attention layer."""
    s = block_shape(config)
    return 2 * s["kv_heads"] * s["head_dim"] * torch.empty(0, dtype=dtype).element_size()


def decode_ceiling(mod, config, batch: int, context: int, realized: float, dtype) -> float:
    """Speed-up bound of a decoding step at `batch` rows attending to `context` tokens, memory-bound: a step reads
    the weights of every module it runs and the KV cache. A routed module runs when any of the rows processes its
    token (each with probability `realized`, independently), and its KV store holds the `realized` share of the
    tokens; MoD's routers and predictors run on every step."""
    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())
    method = mod.method
    everything = weight_bytes(mod.base_model, skip=list(method.parameters()))
    routed = sum(nbytes(method.routed_module(i)) for i in range(len(method.layers)))
    runs = 1 - (1 - realized) ** batch
    kv = batch * context * kv_bytes_per_token(config, dtype)
    layers = mod.arch.num_layers
    kv_routed = len(method.layers) if method.config.skip != "mlp" else 0
    dense = everything + layers * kv
    ours = everything - (1 - runs) * routed + nbytes(method) + (layers - kv_routed * (1 - realized)) * kv
    return round(dense / ours, 4)


def share(counts: torch.Tensor) -> float:
    """Tokens processed / tokens seen, over every routed block ([blocks, 2] counts)."""
    return float(counts[:, 0].sum() / counts[:, 1].sum().clamp(min=1))


def weight_bytes(model, skip=()) -> int:
    """Bytes of the weights a decoding step reads: every parameter but the input embeddings (a step looks up B
    rows of them), unless they are tied to the LM head; shared tensors once; those in `skip` left out."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    left = {id(p) for p in skip} | ({id(emb)} if head is None or head.weight is not emb else set())
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in left)


def calls(dense, mod, args, prompt_len: int, batch: int) -> dict:
    """Greedy generate of n and of 1 new token, for each model, on one random prompt [batch, prompt_len]."""
    g = torch.Generator().manual_seed(args.seed + prompt_len * 1000 + batch)
    prompt = torch.randint(3, dense.config.vocab_size, (batch, prompt_len), generator=g).to(args.device)
    pad = dense.generation_config.pad_token_id
    pad = pad if pad is not None else (dense.config.eos_token_id or 0)
    kw = dict(do_sample=False, pad_token_id=pad, attention_mask=torch.ones_like(prompt))

    def generate(model, tokens):
        def fn():
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        return fn

    fns = {}
    for name, model in (("dense", dense), ("mod", mod)):
        fns[name] = generate(model, args.new_tokens)
        fns[f"{name}_first"] = generate(model, 1)
    return fns


def cell(dense, mod, args, prompt_len: int, batch: int, budget: float) -> dict:
    """Both models side by side on one random prompt [batch, prompt_len]: see the module's doc. Peak memory is
    measured later (memory()): measuring it changes the CPU allocator for the rest of the process."""
    from .. import flops
    n = args.new_tokens
    models = {"dense": dense, "mod": mod}
    fns = calls(dense, mod, args, prompt_len, batch)
    counted, snap = {}, {}
    for name, fn in fns.items():  # a first call of each, FLOPs counted (it also warms up)
        mod.method.reset_stats()
        counted[name] = flops.count(fn)
        snap[name] = mod.method.stats[:, :2].clone()  # tokens processed and tokens seen, per routed block

    def step(name):
        return step_seconds(name, n)

    rounds = interleaved_times(fns, args.repeats, warmup=0, device=args.device, progress=False,
                               pairs=[("mod_first", "dense_first"), (step("dense"), step("mod"))], budget_s=budget)
    realized_prefill = share(snap["mod_first"])
    realized_decode = share(snap["mod"] - snap["mod_first"])  # the decoding steps alone
    prefill = rounds.ratio("mod_first", "dense_first")
    decode = rounds.ratio(step("dense"), step("mod"))
    config = mod.method.config
    est = analytic(dense.config, prompt_len, mod.method.layers, config.capacity, mod.arch.num_layers,
                         dense.config.vocab_size, predictor=config.causal == "predictor", skip=config.skip)
    steps = {k: counted[k] - counted[f"{k}_first"] for k in models}
    medians = {k: rounds.median(k) for k in fns}
    seconds = {k: step(k)(medians) for k in models}  # per decoding step
    return {
        "prompt_len": prompt_len, "batch": batch,
        "prefill_time_ratio": prefill["median"],
        "prefill_speedup": round(1 / prefill["median"], 4) if prefill["median"] else None,
        "prefill_flop_ratio": round(counted["mod_first"] / counted["dense_first"], 4),
        "prefill_ceiling": prefill_ceiling(est, dense.config, prompt_len),
        "decode_tokens_per_s_ratio": decode["median"],
        "decode_flop_ratio": round(steps["mod"] / steps["dense"], 4) if steps["dense"] else None,
        "decode_ceiling": decode_ceiling(mod, dense.config, batch, prompt_len + n // 2, realized_decode,
                                         DTYPES[args.dtype]),
        "realized_capacity": {"prefill": round(realized_prefill, 4), "decode": round(realized_decode, 4)},
        "decode_tokens_per_s": {k: round(batch / v, 2) if v > 0 else None for k, v in seconds.items()},
        "prefill_seconds": {k: round(rounds.median(f"{k}_first"), 5) for k in models},
        "spreads": {"prefill_time_ratio": prefill, "decode_tokens_per_s_ratio": decode},
        "timing": rounds.stopped,
    }


def memory(dense, mod, args, c: dict) -> None:
    """Cell c's peak memory of one generate (prompt and decoding), each model, added to c."""
    fns = calls(dense, mod, args, c["prompt_len"], c["batch"])
    used = {name: peak_memory(fns[name], args.device) for name in ("dense", "mod")}
    c["peak_memory_bytes"] = used
    c["peak_memory_ratio"] = round(used["mod"] / used["dense"], 4) if used["dense"] > 0 else None


def run(args) -> dict:
    from ..io import write_json
    from ..plots import speedup_lines
    check(args)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    dense, mod = build(args)
    if not args.adapter:
        g = torch.Generator().manual_seed(args.seed)
        calibrate(mod, torch.randint(3, dense.config.vocab_size, (2, min(args.prompt_lens)), generator=g)
                  .to(args.device))
    if args.compile:
        for model in (dense, mod):
            compile_forward(model, args.device, args.compile_backend)
    config = mod.method.config
    device_name = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "cpu"
    result = {"method": "mod", "bench": "latency", "model": args.model, "device": args.device,
              "device_name": device_name, "dtype": args.dtype, "compile": args.compile,
              "attention": "sdpa", "capacity": config.capacity, "layers": mod.method.layers, "skip": config.skip,
              "routers": "adapter " + args.adapter if args.adapter else
                         "untrained, decision bias calibrated to the capacity on a random prompt",
              "new_tokens": args.new_tokens, "cells": [], "skipped": []}
    out = Path(args.out)
    todo = sorted(((p, b) for p in args.prompt_lens for b in args.batch_sizes), key=lambda c: (c[0] * c[1], c))
    last = None  # (tokens, seconds) of the previous cell, to predict the next one's cost
    from tqdm.auto import tqdm
    for i, (p, b) in enumerate(tqdm(todo, desc="latency cells", unit="cell")):
        left = args.time_limit - (time.perf_counter() - start)
        need = last[1] * (p * b) / last[0] if last else 0.0
        if need > left or left <= 0:
            result["skipped"].append({"prompt_len": p, "batch": b,
                                      "why": f"about {need:.0f} s needed, {max(left, 0):.0f} s of --time-limit left"})
            continue
        t = time.perf_counter()
        share = max(0.0, (left - need) / (len(todo) - i))  # what goes on timing a wide spread may use
        result["cells"].append(cell(dense, mod, args, p, b, min(args.budget, share)))
        last = (p * b, time.perf_counter() - t)
        write_json(out / "latency.json", result)
    for c in tqdm(result["cells"], desc="peak memory", unit="cell"):  # after every timing: see cell()
        memory(dense, mod, args, c)
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "latency.json", result)
    if result["cells"]:
        result["picture"] = str(speedup_lines(result, out / "latency.png"))
    print(table(result))
    return result


def table(result: dict) -> str:
    rows = [f"MoD / dense, {result['model']} on {result['device_name']} ({result['dtype']}), capacity "
            f"{result['capacity']}, {len(result['layers'])} routed blocks (skip {result['skip']})",
            "prompt  batch  prefill speed-up (ceiling)  decode speed-up (ceiling)  peak memory  realized capacity"]
    for c in result["cells"]:
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        rows.append(f"{c['prompt_len']:>6}  {c['batch']:>5}  {fmt(c['prefill_speedup']):>16} "
                    f"({c['prefill_ceiling']:.2f}x)  {fmt(c['decode_tokens_per_s_ratio']):>15} "
                    f"({c['decode_ceiling']:.2f}x)  {fmt(c['peak_memory_ratio']):>11}  "
                    f"{c['realized_capacity']['decode']:.3f}")
    for s in result["skipped"]:
        rows.append(f"{s['prompt_len']:>6}  {s['batch']:>5}  skipped: {s['why']}")
    return "\n".join(rows)
