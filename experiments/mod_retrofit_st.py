"""MoD retrofit, second design (issue 25): gated routers that see every token, against every static alternative.

    OMP_NUM_THREADS=1 nice -n 10 python experiments/mod_retrofit_st.py --data-dir ../shared/data [--commit]
    ... --reverse     # a second lane: the same points from the other end (each point is run by one lane)
    ... --device cuda # routers and healing LoRA train on a GPU; every measurement still runs on the CPU

Cost on the 2-core CPU: a tuning step at 2 x 256 (teacher forward, then every unit computed and gated, backward to
the routers) takes several seconds, so the default 2048 steps (1.05M tokens) are hours per point.

Arms, all on SmolLM2-135M, each point written to --runs as one JSON (a point whose JSON exists is not run again;
a point another lane holds is skipped) and the results file (--out, the schema of experiments/mod_retrofit.py:
`points` with `arm`, plus tuning_tokens, healing, decode_speedup_b4, nll_second_corpus) rewritten after every
point, committed with --commit:
- "mod-st": MoDConfig(update="gated", skip="sublayers", budget="global") on blocks 1..n-1: both sub-layers of a
  block routed apart, one parameter-weighted budget. Router tuning on --steps x --batch x --train-len tokens of
  wikitext-2 train (KL from the dense model), then calibrate_gates on training text (the realised capacity meets
  the target); healing "lora": routers and LoRA on the same tokens (SkipGPT's second stage). Adapters kept in --runs.
- "blockdrop" / "attndrop": the n least influential blocks (ShortGPT influence; attention influence for attndrop)
  removed, n matched to each capacity's FLOP ratio; healing "lora": LoRA alone on the same tokens, same loss.
- "oracle" (item 6): for --oracle-blocks blocks, each token's cost of skipping each sub-layer alone (the KL it
  adds over the sequence; skipped as MoD skips: no update, and no key or value for later tokens), and the NLL of
  skipping, in every such unit, the cheapest tokens at each capacity (non-causal: a bound, not a model); with
  --oracle-router, how well that point's routers order the same tokens.
- "curve": held-out NLL against tuning tokens for the first mod-st point (item 4).
Quality: held-out NLL with causal routing on wikitext-2 test and on tinyshakespeare (never tuned or chosen on);
speed: counted FLOP ratio and decode tokens/s over dense at batch 1 and 4, measured side by side in one process.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import depthmix
import mod_retrofit as base
import sweeps
from depthmix import lora as lora_layers
from depthmix.bench.mod import text_blocks
from depthmix.models import load_model, load_tokenizer
from depthmix.tuners.mod import retrofit
from depthmix.tuners.mod.importance import drop_attention, drop_blocks, least_important
from depthmix.tuners.mod.retrofit import token_kl

SECOND = "lm/tinyshakespeare"


# -- data and measurements ----------------------------------------------------------------------------------------
def prepare(args, tok):
    data = base.prepare(args, tok)
    second = text_blocks(SECOND, "eval", tok, args.seq_len, args.data_dir)
    pick = torch.linspace(0, len(second) - 1, min(args.eval_blocks, len(second))).long()
    held = torch.tensor(data["eval"][:4])
    data.update(eval2=second[pick].tolist(), prompt4=held[:, :args.prompt_len])
    return data


def measure(dense, model, data, base_rec, args) -> dict:
    """FLOP ratio, NLL on both corpora (causal routing) and decode speed-up at batch 1 and 4."""
    rec = {"flop_ratio": round(base.flop_count(model, data) / base_rec["flops"], 4), **base.nll(model, data),
           "nll_second_corpus": base.nll(model, {**data, "eval": data["eval2"]})["nll"]}
    rec.update(base.decode(dense, model, data, args))
    four = base.decode(dense, model, {**data, "prompt": data["prompt4"]}, args)
    rec.update(decode_speedup_b4=four["decode_speedup"], decode_spread_b4=four["decode_spread"])
    method = getattr(model, "method", None)
    if method is not None:
        method.reset_stats()
        with torch.no_grad():
            model(input_ids=torch.tensor(data["eval"][:4]), use_cache=False)
        rec["realized_capacity_units"] = {k: v for k, v in method.summary().items() if "/" in k}
    return rec


def tokens(args) -> int:
    return args.steps * args.batch * args.train_len


def lora_config(model, args):
    return lora_layers.config(model, r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0)


def heal(model, teacher, blocks, args):
    """LoRA on a static (dropped) model: the same tokens and loss (KL from the dense model) as the MoD arm's, on
    --device; the healed model comes back to the CPU."""
    model = depthmix.apply(model, None, lora=lora_config(model, args)).to(args.device).train()
    teacher = teacher if args.device == "cpu" else copy.deepcopy(teacher).to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lora_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        ids = blocks[torch.randint(len(blocks), (args.batch,), generator=g)].to(args.device)
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
        loss = token_kl(target, model(input_ids=ids, use_cache=False).logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.to("cpu").eval()


# -- the arms ---------------------------------------------------------------------------------------------------
def st_config(capacity, n_blocks):
    return depthmix.MoDConfig(capacity=capacity, layers=list(range(1, n_blocks)), update="gated", skip="sublayers",
                              budget="global")


def st_point(runs, dense, data, base_rec, capacity, healing, args, curve=False):
    name = f"mod-st-c{capacity}-{healing}"
    torch.manual_seed(0)
    model = load_model(args.model)
    config = st_config(capacity, model.config.num_hidden_layers)
    model = depthmix.apply(model, config, lora=lora_config(model, args) if healing == "lora" else None)
    model.to(args.device)
    points = []

    def held_out(step):
        points.append({"tuning_tokens": step * args.batch * args.train_len, "nll": base.nll(model, data)["nll"]})
        print(f"  {name}: {points[-1]}", flush=True)
    start = time.time()
    losses = retrofit.tune(model, data["train"], args.steps, args.batch, args.lr, "distill", progress=False,
                           lora_lr=args.lora_lr, every=args.curve_every if curve else 0,
                           callback=held_out if curve else None)
    calibrated = retrofit.calibrate_gates(model, data["calib"])
    seconds = time.time() - start
    model.to("cpu")
    model.save_pretrained(runs.root / name)
    rec = {"arm": "mod-st", "what": "sublayers", "layers": model.method.layers, "capacity": capacity,
           "tuning_steps": args.steps, "tuning_tokens": tokens(args), "healing": healing,
           "tuning": f"{args.steps} x {args.batch} x {args.train_len} tokens, KL from dense, lr {args.lr}"
           + (f", LoRA r {args.lora_r} lr {args.lora_lr}" if healing == "lora" else "") + ", gates calibrated",
           "tuning_loss": [round(v, 4) for v in losses[::max(1, len(losses) // 50)]], "tuning_seconds": round(seconds),
           "tuning_device": args.device,
           "realized_capacity_calibration": calibrated.get("realized_capacity"),
           **measure(dense, model, data, base_rec, args)}
    if curve:
        rec["curve"] = points
    return rec


def drop_count(flop_ratio, what, base_rec):
    """Blocks (or attention sub-layers) to drop for the FLOP ratio nearest to flop_ratio, at least 1."""
    per = base_rec["flops_one_attention_dropped" if what == "attention" else "flops_one_block_dropped"]
    return max(1, round((1 - flop_ratio) / ((base_rec["flops"] - per) / base_rec["flops"])))


def static_point(runs, dense, data, base_rec, arm, n, healing, args):
    what = "attention" if arm == "attndrop" else "block"
    layers = least_important(base_rec["influence"][what], n)
    model = copy.deepcopy(dense)
    model = drop_attention(model, layers) if arm == "attndrop" else drop_blocks(model, layers)
    start = time.time()
    if healing == "lora":
        model = heal(model, dense, data["train"], args)
    rec = {"arm": arm, "what": what, "layers": layers, "capacity": None, "tuning_steps": args.steps if healing
           == "lora" else 0, "tuning_tokens": tokens(args) if healing == "lora" else 0, "healing": healing,
           "tuning_seconds": round(time.time() - start), "tuning_device": args.device,
           **measure(dense, model, data, base_rec, args)}
    return rec


# -- the oracle ---------------------------------------------------------------------------------------------------
def unit_module(model, t, kind):
    block = model.model.layers[t]
    return block.self_attn if kind == "attention" else block.mlp


def hidden_keys(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True where a query may attend: causal, with the keys of the tokens in mask [B, S] hidden
    from every query but their own (whose output is dropped anyway)."""
    s = mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
    own = torch.eye(s, dtype=torch.bool, device=mask.device)
    return (causal & (~mask[:, None, :] | own)).unsqueeze(1)


def skipping(module, mask, kind):
    """Hooks on a sub-layer that make the tokens where mask [B, S] is true skip it as MoD skips them: no update
    from it, and for attention no key or value either, so later tokens do not see them there. Returns the hooks."""
    def drop_update(m, a, out):
        y = out[0] if isinstance(out, tuple) else out
        y = y.masked_fill(mask.unsqueeze(-1), 0.0)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    hooks = [module.register_forward_hook(drop_update)]
    if kind == "attention":
        allowed = hidden_keys(mask)

        def hide_keys(m, args, kwargs):
            if "attention_mask" not in kwargs:
                raise RuntimeError(f"{type(m).__name__} got its attention mask positionally: the oracle cannot hide "
                                   "the skipped keys")
            given = kwargs["attention_mask"]
            if given is None:
                new = allowed
            elif given.dtype == torch.bool:
                new = given & allowed
            else:  # an additive float mask (eager attention)
                new = given.masked_fill(~allowed, torch.finfo(given.dtype).min)
            return args, {**kwargs, "attention_mask": new}
        hooks.append(module.register_forward_pre_hook(hide_keys, with_kwargs=True))
    return hooks


@torch.no_grad()
def token_costs(dense, seqs, t, kind, chunk):
    """[N, L] the KL (summed over the sequence) that token j adds when it alone skips unit (t, kind); 0 at j = 0."""
    out = torch.zeros(seqs.shape, dtype=torch.float64)
    for n, seq in enumerate(seqs):
        ref = dense(input_ids=seq[None], use_cache=False).logits
        for lo in range(1, seq.numel(), chunk):
            js = torch.arange(lo, min(lo + chunk, seq.numel()))
            mask = torch.zeros(len(js), seq.numel(), dtype=torch.bool)
            mask[torch.arange(len(js)), js] = True
            hooks = skipping(unit_module(dense, t, kind), mask, kind)
            try:
                logits = dense(input_ids=seq.expand(len(js), -1), use_cache=False).logits
            finally:
                for h in hooks:
                    h.remove()
            t_log = torch.log_softmax(ref.float(), -1).expand_as(logits)
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1), t_log, log_target=True,
                                            reduction="none").sum((-1, -2))
            out[n, js] = kl.double()
    return out


@torch.no_grad()
def oracle_nll(dense, seqs, costs, capacity):
    """NLL of seqs when every oracle unit skips its cheapest (1 - capacity) tokens of each sequence (sink kept)."""
    hooks = []
    for (t, kind), cost in costs.items():
        skip = int(round((1 - capacity) * (seqs.shape[1] - 1)))
        mask = torch.zeros(seqs.shape, dtype=torch.bool)
        if skip:
            order = cost[:, 1:].argsort(dim=1)[:, :skip] + 1
            mask.scatter_(1, order, True)
        hooks.extend(skipping(unit_module(dense, t, kind), mask, kind))
    try:
        logits = dense(input_ids=seqs, use_cache=False).logits[:, :-1]
    finally:
        for h in hooks:
            h.remove()
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), seqs[:, 1:].flatten()))


def router_agreement(runs, name, seqs, costs, args):
    """Spearman correlation, per oracle unit, between a mod-st point's router scores and the oracle's cost (high
    score should mean costly to skip)."""
    model = depthmix.DepthMixModel.from_pretrained(load_model(args.model), runs.root / name).eval()
    method, seen = model.method, {}
    hooks = [r.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.squeeze(-1)))
             for i, r in enumerate(method.routers)]
    with torch.no_grad():
        model(input_ids=seqs, use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for (t, kind), cost in costs.items():
        if (t, kind) not in method.units:
            continue
        r = seen[method.units.index((t, kind))][:, 1:].flatten()
        c = cost[:, 1:].flatten()
        rank = [x.argsort().argsort().double() for x in (r.double(), c)]
        out[f"{t}.{kind}"] = round(float(torch.corrcoef(torch.stack(rank))[0, 1]), 4)
    return out


def oracle_points(runs, dense, data, base_rec, args):
    seqs = torch.tensor(data["eval"][:args.oracle_seqs])[:, :args.oracle_len]
    units = [(t, kind) for t in args.oracle_blocks for kind in ("attention", "mlp")]
    costs = {}
    for t, kind in units:
        key = f"oracle-cost-{t}-{kind}"
        rec = runs.get(key)
        if rec is None:
            cost = token_costs(dense, seqs, t, kind, args.oracle_chunk)
            rec = runs.put(key, {"unit": f"{t}.{kind}", "cost": cost.tolist()})
        costs[(t, kind)] = torch.tensor(rec["cost"])
    dense_nll = oracle_nll(dense, seqs, {}, 1.0)
    drop = runs.get("oracle-blockdrop")
    if drop is None:  # the simplest alternative on the same text: the least influential whole block dropped
        t = least_important(base_rec["influence"]["block"], 1)
        drop = runs.put("oracle-blockdrop", {"blocks": t, "nll": round(oracle_nll(
            drop_blocks(copy.deepcopy(dense), t), seqs, {}, 1.0), 4),
            "flop_ratio": round(base_rec["flops_one_block_dropped"] / base_rec["flops"], 4)})
    unit_cost = {f"{t}.{kind}": cost_summary(c[:, 1:]) for (t, kind), c in costs.items()}
    params = {u: sum(p.numel() for p in unit_module(dense, *u).parameters()) for u in units}
    agreement = router_agreement(runs, args.oracle_router, seqs, costs, args) if args.oracle_router else None
    for capacity in args.capacities:
        name = f"oracle-c{capacity}"
        if runs.get(name) is not None:
            continue
        # 2 FLOPs per parameter per skipped token, on the tokens base_rec["flops"] was counted on
        saved = 2 * (1 - capacity) * sum(params.values()) * data["flop_ids"].numel()
        runs.put(name, {"arm": "oracle", "what": "sublayers", "layers": args.oracle_blocks, "capacity": capacity,
                        "tuning_steps": 0, "tuning_tokens": 0, "healing": "none",
                        "flop_ratio": round(1 - saved / base_rec["flops"], 4), "nll": round(oracle_nll(
                            dense, seqs, costs, capacity), 4), "nll_dense_same_text": round(dense_nll, 4),
                        "oracle_text": f"{seqs.shape[0]} x {seqs.shape[1]} tokens of wikitext-2 test",
                        "router_agreement": agreement, "oracle_router": args.oracle_router,
                        "unit_cost": unit_cost, "skipped_cost_share": {f"{t}.{kind}": skipped_share(c[:, 1:], capacity)
                                                                       for (t, kind), c in costs.items()},
                        "blockdrop_same_text": drop})


def cost_summary(cost: torch.Tensor) -> dict:
    """Mean, median, 90th percentile and max over tokens of the KL a token adds by skipping a unit alone."""
    c = cost.flatten().double()
    return {"mean": round(float(c.mean()), 5), "median": round(float(c.median()), 5),
            "p90": round(float(c.quantile(0.9)), 5), "max": round(float(c.max()), 5)}


def skipped_share(cost: torch.Tensor, capacity: float) -> float:
    """The share of a unit's summed skip costs that its cheapest (1 - capacity) tokens of each sequence carry:
    small where a few tokens carry the unit's value (what per-token routing can exploit), 1 - capacity where the
    cost is even."""
    skip = int(round((1 - capacity) * cost.shape[1]))
    cheapest = cost.sort(dim=1).values[:, :skip]
    return round(float(cheapest.sum() / cost.sum().clamp(min=1e-12)), 4)


def oracle_table(path) -> str:
    """The oracle's numbers from its results file: NLL against the dense model and a one-block drop on the same
    text, and how unevenly each unit's skip cost is spread over tokens."""
    rec = json.loads(Path(path).read_text())
    # record() lists points and details in the same order: by arm, then by falling FLOP ratio (capacity)
    rows = [(p, d) for p, d in zip(rec["points"], rec["details"]) if p["arm"] == "oracle"]
    if not rows:
        return "(no oracle point yet)"
    first = rows[0][1]
    drop = first["blockdrop_same_text"]
    units = list(first["unit_cost"])
    out = [f"Oracle text: {first['oracle_text']}; units: {', '.join(units)}; dense NLL on it "
           f"{first['nll_dense_same_text']:.4f}; block {drop['blocks']} dropped (least influential): NLL "
           f"{drop['nll']:.4f} at FLOP ratio {drop['flop_ratio']:.4f}.", "",
           "| capacity | FLOP ratio | oracle NLL | - dense | " + " | ".join(f"{u}: cost share skipped" for u in units)
           + " |", "| --- " * (4 + len(units)) + "|"]
    for p, d in rows:
        out.append(f"| {p['capacity']} | {p['flop_ratio']:.4f} | {p['nll']:.4f} | "
                   f"{p['nll'] - d['nll_dense_same_text']:+.4f} | "
                   + " | ".join(f"{d['skipped_cost_share'][u]:.3f}" for u in units) + " |")
    out += ["", "| unit | mean KL | median | 90th pct. | max |", "| --- | --- | --- | --- | --- |"]
    for u, c in first["unit_cost"].items():
        out.append(f"| {u} | {c['mean']:.5f} | {c['median']:.5f} | {c['p90']:.5f} | {c['max']:.5f} |")
    return "\n".join(out)


# -- the study ----------------------------------------------------------------------------------------------------
def dense_point(runs, dense, data, args):
    rec = runs.get("dense")
    if rec is None or "nll_second_corpus" not in rec:
        rec = base.dense_point(runs, dense, None, data, args)
        one = drop_attention(copy.deepcopy(dense), [1])
        rec.update(flops_one_attention_dropped=base.flop_count(one, data),
                   nll_second_corpus=base.nll(dense, {**data, "eval": data["eval2"]})["nll"])
        rec = runs.put("dense", rec)
    return rec


def plan(args):
    """(name, maker) of every point, in the order a lane takes them."""
    items = []
    for capacity in args.capacities:
        for healing in args.healing:
            items.append((f"mod-st-c{capacity}-{healing}", ("st", capacity, healing)))
            for arm in args.static:
                items.append((f"{arm}-c{capacity}-{healing}", (arm, capacity, healing)))
    return items


def run_point(runs, dense, data, base_rec, spec, args, first):
    kind, capacity, healing = spec
    if kind == "st":
        return st_point(runs, dense, data, base_rec, capacity, healing, args, curve=first and args.curve_every > 0)
    # static arms at the FLOP ratio of the MoD point of the same capacity where it exists, else the capacity
    mod = runs.get(f"mod-st-c{capacity}-{healing}") or runs.get(f"mod-st-c{capacity}-none")
    ratio = mod["flop_ratio"] if mod else capacity
    n = drop_count(ratio, "attention" if kind == "attndrop" else "block", base_rec)
    return static_point(runs, dense, data, base_rec, kind, n, healing, args)


def commit(args, message):
    if not args.commit:
        return
    paths = [args.out, args.img]
    subprocess.run(["git", "add", *[p for p in paths if Path(p).exists()]], check=False)
    subprocess.run(["git", "commit", "-q", "-m", message], check=False)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir")
    p.add_argument("--model", default=base.MODEL, help="a smaller model (folder) for a smoke test")
    p.add_argument("--runs", default="runs/mod_retrofit", help="one JSON per finished point (resumable)")
    p.add_argument("--out", default="docs/results/mod-retrofit-st.json", help="the results file (the schema of "
                   "mod-retrofit.json), rewritten from --runs after every point")
    p.add_argument("--img", default="docs/img/mod-retrofit.png")
    p.add_argument("--capacities", type=float, nargs="+", default=[0.95, 0.9, 0.85, 0.75])
    p.add_argument("--healing", nargs="+", default=["none", "lora"], choices=["none", "lora"])
    p.add_argument("--static", nargs="+", default=["blockdrop", "attndrop"], choices=["blockdrop", "attndrop"])
    p.add_argument("--steps", type=int, default=2048, help="tuning steps per point (2048 x 2 x 256 = 1.05M tokens)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--train-len", type=int, default=256, help="tokens per tuning/calibration block")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per held-out block")
    p.add_argument("--lr", type=float, default=1e-2, help="router learning rate")
    p.add_argument("--device", default="cpu", help="where routers and healing LoRA train (e.g. cuda: minutes a point "
                   "instead of hours); every measurement (NLL, FLOPs, decode speed) runs on the CPU")
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--curve-every", type=int, default=256, help="held-out NLL every this many steps of the first "
                   "mod-st point (0: no curve)")
    p.add_argument("--calib-blocks", type=int, default=8, help="training blocks for influence and gate calibration")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks of --seq-len tokens per corpus")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3, help="decode timing rounds at least")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of further decode rounds while the IQR is wide")
    p.add_argument("--oracle-blocks", type=int, nargs="*", default=[5, 15, 25], help="blocks of the oracle ([]: none)")
    p.add_argument("--oracle-seqs", type=int, default=4)
    p.add_argument("--oracle-len", type=int, default=128)
    p.add_argument("--oracle-chunk", type=int, default=32, help="copies of a sequence per oracle forward")
    p.add_argument("--oracle-router", help="a finished mod-st point whose routers are compared with the oracle")
    p.add_argument("--oracle-only", action="store_true", help="only the dense reference and the oracle (no points)")
    p.add_argument("--oracle-table", action="store_true", help="print the oracle's Markdown from --out and stop")
    p.add_argument("--reverse", action="store_true", help="a second lane: take the points from the other end")
    p.add_argument("--commit", action="store_true", help="git commit --out and --img after every point")
    args = p.parse_args(argv)
    args.mc, args.mc_samples, args.eval_blocks = False, 0, args.eval_blocks  # what mod_retrofit's helpers read
    return args


def keeps_recorded(args, runs) -> None:
    """The results file is rewritten from --runs: refuse where it records points that --runs lacks (an earlier
    study's, or one from another machine), which the rewrite would lose."""
    out = Path(args.out)
    if not out.exists():
        return
    recorded = {d["name"] for d in json.loads(out.read_text()).get("details", [])}
    lost = sorted(recorded - set(runs.all()))
    if lost:
        raise SystemExit(f"--out {out}: records {len(lost)} points that {runs.root} lacks ({', '.join(lost[:4])}"
                         f"{', ...' if len(lost) > 4 else ''}); rewriting it from {runs.root} would lose them. "
                         "Give a new --out.")


def main(argv=None):
    args = parse(argv)
    if args.oracle_table:
        print(oracle_table(args.out))
        return 0
    torch.manual_seed(0)
    runs = base.Runs(args.runs)
    keeps_recorded(args, runs)
    tok = load_tokenizer(args.model)
    data = prepare(args, tok)
    dense = load_model(args.model).eval()
    base_rec = dense_point(runs, dense, data, args)
    items = [] if args.oracle_only else plan(args)
    for name, spec in sweeps.ordered(args, items):
        folder = runs.root / name
        if runs.get(name) is not None or sweeps.busy(folder):
            continue
        with sweeps.claim(folder):
            if runs.get(name) is not None:  # the other lane finished it while this one waited
                continue
            runs.put(name, run_point(runs, dense, data, base_rec, spec, args, first=name == items[0][0]))
        base.write(runs, args, [])
        commit(args, f"mod retrofit (issue 25): {name}")
    if args.oracle_blocks:
        oracle_points(runs, dense, data, base_rec, args)
        base.write(runs, args, [])
        commit(args, "mod retrofit (issue 25): oracle")


if __name__ == "__main__":
    sys.exit(main())
