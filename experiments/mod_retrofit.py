"""MoD retrofit against dropping whole layers on SmolLM2-135M: a speed/quality map (issue 10).

    OMP_NUM_THREADS=2 nice -n 10 python experiments/mod_retrofit.py --data-dir ../shared/data
    python experiments/mod_retrofit.py --table      # the Markdown table of docs/results-mod.md

SmolLM2-135M (embedded: SmolLM2-135M-Instruct, de-quantised from Q4_1), 30 blocks. Every MoD point: update
"retrofit" (zero routers), the same tuning budget (--steps AdamW steps of --batch x --seq-len tokens of
lm/wikitext-2 train text (the shared data's valid.txt), routers and predictors only, loss --loss: KL from the
same model with routing bypassed + the predictor's BCE), then each predictor fitted to its block's top-k
membership (depthmix.tuners.mod.retrofit). Blocks: every other one, or the same number chosen by ShortGPT
influence (lowest first, block 0 never; of the whole block, or of the attention sub-layer for attention-only
points) on --calib-blocks blocks of the training text; whole block or attention only (MoDConfig.skip, where the
installed MoD has it). Layer drop: the n least influential blocks removed, no
training, n matched to each MoD point's FLOP ratio. For every point: FLOPs of a real forward (causal routing) over
dense, held-out NLL with causal routing on a fixed subsample of lm/wikitext-2 test, decode tokens/s at batch 1
over dense (interleaved rounds, median with IQR), realized capacity and predictor accuracy (causal routing);
multiple-choice accuracy (ARC-Easy, BoolQ, log-likelihood, a seeded subsample) for dense, every layer-drop point
and the lowest-NLL MoD point per capacity (--mc).

Resumable: one JSON per finished point under --runs (MoD points keep their adapter there too); a point whose
JSON exists is not run again. Writes --out (docs/results/mod-retrofit.json) and --img from whatever is finished.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

import depthmix
from depthmix import flops
from depthmix.bench.common import interleaved_times
from depthmix.bench.mod import text_blocks
from depthmix.data.tasks import get_task
from depthmix.evaluation import evaluate, perplexity
from depthmix.tuners.mod.importance import drop_blocks, influence, least_important
from depthmix.models import load_model, load_tokenizer
from depthmix.tuners.mod import retrofit

MODEL = "smollm2-135m"
TASK = "lm/wikitext-2"
MC_TASKS = ("arc-easy", "boolq")


def has_skip() -> bool:
    return "skip" in {f.name for f in dataclasses.fields(depthmix.MoDConfig)}


class Runs:
    """One JSON per finished point under `root`."""

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, name):
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, name, record):
        (self.root / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(summary(record))}", flush=True)
        return record

    def all(self):
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.root.glob("*.json"))}


def summary(record):
    return {k: v for k, v in record.items() if not isinstance(v, (dict, list)) or k == "mc_accuracy"}


# -- measurements ------------------------------------------------------------------------------------------------
def nll(model, data):
    """Held-out NLL (the lm tasks' perplexity()), with MoD's realized capacity and predictor accuracy."""
    method = getattr(model, "method", None)
    if method is not None:
        method.reset_stats()
    out = perplexity(model, data["eval"], data["pad"], batch_size=4, progress=False)
    state = method.summary() if method is not None else {}
    return {"nll": round(out["nll"], 4), "tokens": int(out["tokens"]),
            "realized_capacity": state.get("realized_capacity"), "predictor_accuracy": state.get("predictor_accuracy")}


def flop_count(model, data):
    return flops.forward_flops(model, 0, 0, routing="causal", ids=data["flop_ids"])


def greedy(data, n):
    """generate() keywords for exactly n new tokens, greedy, after the held-out prompt at batch 1."""
    return dict(do_sample=False, pad_token_id=data["pad"], attention_mask=torch.ones_like(data["prompt"]),
                max_new_tokens=n, min_new_tokens=n)


def decode(dense, model, data, args):
    """Decoding tokens/s of `model` over dense at batch 1 (greedy, prompt processing left out), interleaved."""
    def gen(m, n):
        kw = greedy(data, n)

        def fn():
            with torch.no_grad():
                m.generate(data["prompt"], **kw)
        return fn

    def step(name):
        def fn(r):
            return (r[name] - r[f"{name}_first"]) / (args.new_tokens - 1)
        fn.__name__ = f"{name}_step"
        return fn

    method = getattr(model, "method", None)
    if method is not None:
        method.reset_stats()
    rounds = interleaved_times({"dense": gen(dense, args.new_tokens), "other": gen(model, args.new_tokens),
                                "dense_first": gen(dense, 1), "other_first": gen(model, 1)}, args.repeats,
                               warmup=1, progress=False, pairs=[(step("dense"), step("other"))],
                               budget_s=args.budget)
    spread = rounds.ratio(step("dense"), step("other"))
    state = method.summary() if method is not None else {}
    return {"decode_speedup": spread["median"], "decode_spread": spread, "timing": rounds.stopped,
            "realized_capacity_decode": state.get("realized_capacity")}


def mc_accuracy(model, tok, args):
    out = {}
    for name in MC_TASKS:
        rows = get_task(name).load("eval", args.data_dir, args.mc_samples, 0)
        # each option's own text, as lm-eval scores ARC: the label format ("the correct answer is answer2") means
        # nothing to a model that was not tuned on it (SmolLM2 scored 0.26 on ARC-Easy that way, chance 0.25)
        m = evaluate(get_task(name), model, tok, rows, batch_size=8, max_length=512, progress=False,
                     mode="loglik-text")
        out[name] = round(m["accuracy"], 4)
        out[f"{name}_norm"] = round(m["accuracy_norm"], 4)
    return out


# -- the points --------------------------------------------------------------------------------------------------
def prepare(args, tok):
    train = text_blocks(TASK, "train", tok, args.train_len, args.data_dir)
    held = text_blocks(TASK, "eval", tok, args.seq_len, args.data_dir)
    pick = torch.linspace(0, len(held) - 1, args.eval_blocks).long()  # spread over the whole test text
    g = torch.Generator().manual_seed(0)
    return {"train": train, "calib": train[torch.randperm(len(train), generator=g)[:args.calib_blocks]],
            "eval": held[pick].tolist(), "flop_ids": held[pick[:2]], "prompt": held[pick[:1], :args.prompt_len],
            "pad": tok.pad_token_id}


def dense_point(runs, dense, tok, data, args):
    rec = runs.get("dense")
    if rec is None:
        one = drop_blocks(copy.deepcopy(dense), [1])
        rec = {**nll(dense, data), "flops": flop_count(dense, data), "flops_one_block_dropped": flop_count(one, data),
               "influence": influence(dense, data["calib"])}
        rec = runs.put("dense", rec)
    if args.mc and "mc_accuracy" not in rec:
        rec["mc_accuracy"] = mc_accuracy(dense, tok, args)
        rec = runs.put("dense", rec)
    return rec


def mod_layers(choice, base, skip):
    """every_other, last_third, or "importance": the blocks (or sub-layers, as `skip`) of lowest influence."""
    scores = base["influence"].get(skip, base["influence"]["block"])
    if choice == "importance":  # as many blocks as every_other
        return least_important(scores, len(range(1, len(scores), 2)))
    return choice  # every_other, last_third


def mod_name(choice, skip, capacity):
    return f"mod-{choice}-{skip}-c{capacity}"


def mod_point(runs, dense, tok, data, base, choice, skip, capacity, args):
    name = mod_name(choice, skip, capacity)
    if runs.get(name) is not None:
        return runs.get(name)
    kw = {"skip": skip} if has_skip() else {}
    config = depthmix.MoDConfig(capacity=capacity, layers=mod_layers(choice, base, skip), update="retrofit", **kw)
    model = depthmix.apply(load_model(args.model), config)
    start = time.time()
    losses = retrofit.tune(model, data["train"], args.steps, args.batch, args.lr, args.loss, progress=False)
    retrofit.fit_predictors(model, data["train"], args.feature_batches, args.batch, progress=False)
    tuning_s = time.time() - start
    model.save_pretrained(runs.root / name)
    rec = {"arm": "mod", "what": skip, "choice": choice, "layers": model.method.layers, "capacity": capacity,
           "tuning_steps": args.steps, "tuning": f"{args.steps} x {args.batch} x {args.train_len} tokens, {args.loss}, "
           f"lr {args.lr}, predictors fitted on {args.feature_batches} x {args.batch} blocks",
           "tuning_loss": [round(v, 4) for v in losses], "tuning_seconds": round(tuning_s),
           "flop_ratio": round(flop_count(model, data) / base["flops"], 4), **nll(model, data)}
    rec.update(decode(dense, model, data, args))
    return runs.put(name, rec)


def drop_count(flop_ratio, base):
    """Blocks to drop for the FLOP ratio nearest to flop_ratio (at least 1)."""
    per_block = (base["flops"] - base["flops_one_block_dropped"]) / base["flops"]
    return max(1, round((1 - flop_ratio) / per_block))


def point_model(runs, dense, name, rec, args):
    """The model of a finished point: its MoD adapter on a fresh base model, or dense without its dropped blocks."""
    if rec["arm"] == "mod":
        return depthmix.DepthMixModel.from_pretrained(load_model(args.model), runs.root / name).eval()
    return drop_blocks(copy.deepcopy(dense), rec["layers"])


def drop_point(runs, dense, tok, data, base, n, args):
    name = f"drop-n{n}"
    rec = runs.get(name)
    if rec is None:
        layers = least_important(base["influence"]["block"], n)
        model = drop_blocks(copy.deepcopy(dense), layers)
        rec = {"arm": "layerdrop", "what": "block", "layers": layers, "capacity": None, "tuning_steps": 0,
               "flop_ratio": round(flop_count(model, data) / base["flops"], 4), **nll(model, data)}
        rec.update(decode(dense, model, data, args))
        rec = runs.put(name, rec)
    if args.mc and "mc_accuracy" not in rec:
        rec["mc_accuracy"] = mc_accuracy(point_model(runs, dense, name, rec, args), tok, args)
        rec = runs.put(name, rec)
    return rec


def mod_mc(runs, dense, tok, args):
    """Multiple-choice accuracy of the lowest-NLL MoD point of each capacity."""
    done = [(k, r) for k, r in runs.all().items() if r.get("arm") == "mod"]
    for capacity in sorted({r["capacity"] for _, r in done}):
        name, rec = min(((k, r) for k, r in done if r["capacity"] == capacity), key=lambda kr: kr[1]["nll"])
        if "mc_accuracy" in rec:
            continue
        rec["mc_accuracy"] = mc_accuracy(point_model(runs, dense, name, rec, args), tok, args)
        runs.put(name, rec)


def retime(runs, dense, data, args):
    """Decode timing again, of every point (--retime all) or of those whose rounds ended with a wide spread (a
    loaded machine: --retime wide), all in one quiet sitting. The earlier measurement is kept under
    `decode_before_retime`."""
    for name, rec in runs.all().items():
        if rec.get("decode_speedup") is None or rec.get("arm") not in ("mod", "layerdrop"):
            continue  # issue 25's arms are timed again by their own script
        if args.retime == "wide" and "IQR still wider" not in rec.get("timing", ""):
            continue
        model = point_model(runs, dense, name, rec, args)
        before = rec.get("decode_before_retime") or {k: rec[k] for k in ("decode_speedup", "decode_spread", "timing")}
        rec.update(decode(dense, model, data, args), decode_before_retime=before)
        runs.put(name, rec)


def profile_decode(runs, dense, data, names, args):
    """Where a decode step's time goes, dense vs the point (torch.profiler over one greedy generate of
    --new-tokens tokens at batch 1): matmul time (mm/addmm/bmm) and everything else, in ms per generate."""
    from torch.profiler import ProfilerActivity, profile
    prompt, kw = data["prompt"], greedy(data, args.new_tokens)

    def split(model):
        with torch.no_grad():
            model.generate(prompt, **kw)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.generate(prompt, **kw)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e3
        return {"matmul_ms": round(mm, 1), "other_ms": round(total - mm, 1), "ops": sum(e.count for e in events)}

    for name in names:
        rec = runs.get(name)
        model = point_model(runs, dense, name, rec, args)
        rec["decode_profile"] = {"dense": split(dense), "point": split(model), "threads": torch.get_num_threads()}
        runs.put(name, rec)


def diagnose(runs, dense, data, names, args):
    """What limits a MoD point: its NLL with top-k-lookahead routing (no predictor errors; sees the future) and,
    with the same blocks and capacity, untrained (zero) routers under top-k-lookahead (what tuning bought)."""
    for name in names:
        rec = runs.get(name)
        if rec is None or "nll_topk_lookahead" in rec:
            continue
        model = point_model(runs, dense, name, rec, args)
        with model.method.routing_mode("topk-lookahead"):
            rec["nll_topk_lookahead"] = nll(model, data)["nll"]
        config = dataclasses.replace(model.method_config)
        zero = depthmix.apply(load_model(args.model), config).eval()
        with zero.method.routing_mode("topk-lookahead"):
            rec["nll_untrained_topk_lookahead"] = nll(zero, data)["nll"]
        runs.put(name, rec)


def settings(args):
    skips = [s for s in args.skips if s == "block" or has_skip()]
    if len(skips) < len(args.skips):
        print("MoDConfig has no `skip` field here: only whole-block points are run", flush=True)
    for capacity in args.capacities:
        for skip in skips:
            for choice in args.choices:
                yield choice, skip, capacity


# -- results -----------------------------------------------------------------------------------------------------
POINT_KEYS = ("arm", "what", "layers", "capacity", "tuning_steps", "flop_ratio", "nll", "decode_speedup",
              "realized_capacity", "predictor_accuracy", "mc_accuracy",
              # issue 25 (experiments/mod_retrofit_st.py): absent from the first study's points
              "tuning_tokens", "healing", "decode_speedup_b4", "nll_second_corpus")


def record(runs, args, todo):
    recs = runs.all()
    base = recs.get("dense")
    names = sorted((k for k, r in recs.items() if r.get("arm")), key=lambda k: (recs[k]["arm"], -recs[k]["flop_ratio"]))
    missing = [mod_name(*s) for s in todo if mod_name(*s) not in recs]
    return {
        "model": f"{MODEL} (SmolLM2-135M-Instruct, de-quantised from Q4_1)" if args.model == MODEL else args.model,
        "data": f"{TASK}: tuning on train (the shared data's valid.txt); NLL on {args.eval_blocks} blocks of "
                f"{args.seq_len} tokens spread over test.txt ({base['tokens'] if base else '?'} predicted tokens), "
                f"causal routing; multiple choice: {args.mc_samples} seeded examples each of "
                f"{' and '.join(MC_TASKS)} test, log-likelihood of each option's text (BoolQ of LLM-Adapters: no passage)",
        "dense_nll": base["nll"] if base else None,
        "points": [{k: recs[n].get(k) for k in POINT_KEYS} for n in names],
        "dense_mc_accuracy": base.get("mc_accuracy") if base else None,
        "details": [{"name": n, **{x: recs[n].get(x) for x in DETAIL_KEYS}} for n in names],
        "partial": f"not yet measured: {missing}" if missing else None,
    }


DETAIL_KEYS = ("choice", "tuning", "tuning_seconds", "tuning_device", "decode_spread", "timing",
               "realized_capacity_decode", "tokens", "nll_topk_lookahead", "nll_untrained_topk_lookahead",
               "decode_profile", "decode_spread_b4", "realized_capacity_units", "realized_capacity_calibration",
               "curve", "router_agreement", "oracle_router", "oracle_text", "nll_dense_same_text", "unit_cost",
               "skipped_cost_share", "blockdrop_same_text")


def table(rec) -> str:
    lines = ["| arm | skips | blocks | capacity | FLOP ratio | NLL | decode speed-up (IQR) | realized capacity | "
             "predictor acc. | ARC-Easy | BoolQ |", "|" + " --- |" * 11]
    mc = rec.get("dense_mc_accuracy") or {}
    lines.append(f"| dense | | | | 1.000 | {rec['dense_nll']:.3f} | 1.00 | | | {mc.get('arc-easy', '')} | "
                 f"{mc.get('boolq', '')} |")
    for p, d in zip(rec["points"], rec["details"]):
        spread = d.get("decode_spread")
        iqr = f" ({spread['iqr'][0]:.2f}-{spread['iqr'][1]:.2f})" if spread else ""
        mc = p.get("mc_accuracy") or {}
        what = "whole block (dropped)" if p["arm"] == "layerdrop" else p["what"]
        blocks = f"{d.get('choice') or 'least influential'} ({len(p['layers'])})"
        speed = "" if p.get("decode_speedup") is None else f"{p['decode_speedup']:.2f}{iqr}"
        lines.append(f"| {arm_label(p)} | {what} | {blocks} | {p['capacity'] if p['capacity'] is not None else ''} | "
                     f"{p['flop_ratio']:.3f} | {p['nll']:.3f} | {speed} | "
                     f"{fmt(p['realized_capacity'])} | {fmt(p['predictor_accuracy'])} | {mc.get('arc-easy', '')} | "
                     f"{mc.get('boolq', '')} |")
    return "\n".join(lines)


def arm_label(p) -> str:
    """The arm, with its healing where it has one (issue 25's points)."""
    return p["arm"] + (" + LoRA" if p.get("healing") == "lora" else "")


def fmt(v):
    return "" if v is None else f"{v:.3f}"


def draw(rec, path):
    from depthmix.plots import plt, save
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    markers = {"mod": "o", "layerdrop": "s", "mod-st": "D", "blockdrop": "s", "attndrop": "^", "oracle": "*"}
    for arm, marker in markers.items():
        pts = [p for p in rec["points"] if p["arm"] == arm]
        for what, healing in sorted({(p["what"], p.get("healing") or "") for p in pts}):
            sel = sorted((p for p in pts if p["what"] == what and (p.get("healing") or "") == healing),
                         key=lambda p: p["flop_ratio"])
            label = arm_label(sel[0]) if arm != "mod" else f"MoD ({what})"
            fill = "none" if healing == "none" else None
            a.plot([p["flop_ratio"] for p in sel], [p["nll"] for p in sel], marker, label=label, fillstyle=fill)
            timed = [p for p in sel if p.get("decode_speedup") is not None]
            b.plot([p["decode_speedup"] for p in timed], [p["nll"] for p in timed], marker, label=label,
                   fillstyle=fill)
    for ax in (a, b):
        ax.axhline(rec["dense_nll"], color="gray", ls="--", lw=1, label="dense")
        ax.axhline(1.05 * rec["dense_nll"], color="gray", ls=":", lw=1, label="1.05 x dense")
        ax.set_ylabel("held-out NLL (wikitext-2 test, nats/token)")
        ax.legend(fontsize=7)
    a.set_xlabel("forward FLOPs / dense (causal routing)")
    b.set_xlabel("decode tokens/s / dense (batch 1)")
    b.axvline(1.2, color="gray", ls=":", lw=1)
    fig.suptitle("SmolLM2-135M: MoD retrofit vs dropping layers")
    return save(fig, path)


def write(runs, args, todo):
    rec = record(runs, args, todo)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    if rec["points"]:
        draw(rec, args.img)
    print(f"wrote {out}" + (f" and {args.img}" if rec["points"] else ""), flush=True)


# -- main --------------------------------------------------------------------------------------------------------
def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir")
    p.add_argument("--model", default=MODEL, help="a smaller model (folder) for a smoke test")
    p.add_argument("--runs", default="runs/mod_retrofit", help="one JSON per finished point (resumable)")
    p.add_argument("--out", default="docs/results/mod-retrofit.json")
    p.add_argument("--img", default="docs/img/mod-retrofit.png")
    p.add_argument("--capacities", type=float, nargs="+", default=[0.9, 0.75, 0.5])
    p.add_argument("--choices", nargs="+", default=["every_other", "importance"])
    p.add_argument("--skips", nargs="+", default=["block", "attention"])
    p.add_argument("--steps", type=int, default=16, help="router tuning steps per MoD point")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--train-len", type=int, default=256, help="tokens per tuning/calibration block")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per held-out block")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--loss", default="distill", choices=retrofit.LOSSES)
    p.add_argument("--feature-batches", type=int, default=4, help="forward passes the predictors are fitted on")
    p.add_argument("--calib-blocks", type=int, default=8, help="training blocks the block influence is measured on")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks of --seq-len tokens")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3, help="decode timing rounds at least")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of further decode rounds while the IQR is wide")
    p.add_argument("--mc", action="store_true", help="multiple-choice accuracy (dense, layer drop, best MoD)")
    p.add_argument("--mc-samples", type=int, default=300)
    p.add_argument("--diagnose", nargs="+", default=[], help="MoD point names: also their top-k-lookahead NLL, "
                   "tuned and untrained")
    p.add_argument("--max-points", type=int, default=100, help="stop after this many new MoD points")
    p.add_argument("--profile", nargs="+", default=[], help="MoD point names: where their decode step's time "
                   "goes (matmul or not), beside dense")
    p.add_argument("--retime", choices=["wide", "all"], help="time decoding again: where the spread stayed wide, "
                   "or every point (run on a quiet machine)")
    p.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    return p.parse_args()


def main():
    args = parse()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    torch.manual_seed(0)
    runs = Runs(args.runs)
    tok = load_tokenizer(args.model)
    data = prepare(args, tok)
    dense = load_model(args.model).eval()
    base = dense_point(runs, dense, tok, data, args)
    todo = list(settings(args))
    new = 0
    for choice, skip, capacity in todo:
        if new >= args.max_points:
            break
        fresh = runs.get(mod_name(choice, skip, capacity)) is None
        rec = mod_point(runs, dense, tok, data, base, choice, skip, capacity, args)
        new += fresh
        drop_point(runs, dense, tok, data, base, drop_count(rec["flop_ratio"], base), args)
        write(runs, args, todo)
    if args.mc:
        mod_mc(runs, dense, tok, args)
    if args.retime:
        retime(runs, dense, data, args)
    diagnose(runs, dense, data, args.diagnose, args)
    profile_decode(runs, dense, data, args.profile, args)
    write(runs, args, todo)


if __name__ == "__main__":
    main()
