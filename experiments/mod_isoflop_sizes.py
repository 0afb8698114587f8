r"""MoD vs dense from scratch, isoFLOP at fair sizes (issue 11, item 3): a size sweep per family at each budget.

    export DEPTHMIX_DATA=/work/shared/data
    OMP_NUM_THREADS=1 nice -n 10 python experiments/mod_isoflop_sizes.py --budgets 1e12       # one budget
    OMP_NUM_THREADS=1 nice -n 10 python experiments/mod_isoflop_sizes.py                      # everything
    python experiments/mod_isoflop_sizes.py --summarize     # results JSON + PNGs from what has finished
    python experiments/mod_isoflop_sizes.py --table         # the Markdown of docs/results-mod.md
    python experiments/mod_isoflop_sizes.py --plan          # the size grid, nothing run

Supersedes experiments/mod_isoflop.py, whose two shapes per family were 3-12x larger than compute-optimal for
its budgets, so the cheapest model per step won by construction.

Setup. Each run is `depthmix pretrain`: a Llama-style model from random init (RoPE, SwiGLU MLP of
64*ceil(8d/3/64), head size 32, tied input/output embedding), byte tokens (vocab 256), sequences of 512 (so
capacity 12.5% keeps 64 tokens per routed block), batch 8, AdamW lr 2e-3 (not tuned per size), cosine, 5% warmup.
The training budget is counted by FlopCounterMode on one real training step of the model as built (attention
scores included: at T = 512 and d <= 128 they are a large share, so a budget buys fewer tokens than 6ND says).
Families: dense, and MoD on every other block (1, 3, ...) at capacity 0.125, paper update, predictor for causal
routing; the held-out loss of MoD is taken with causal routing (what generation runs). Both families use the
same shapes.

Sizes. Parameters are counted WITHOUT the embedding (the tied 256 x d table; RoPE has no position table); MoD's
routers and predictors are counted. The compute-optimal size for a budget C is taken Chinchilla-like as
N_opt = sqrt(C / 120) (C = 6 N D with D = 20 N tokens): 91k at 1e12, 158k at 3e12, 289k at 1e13. The shapes form
a ladder of about 2x steps (non-embedding parameters, dense):

    L2 d16 8k | L2 d24 14k | L2 d32 33k | L2 d48 56k | L4 d48 111k | L4 d64 214k | L4 d96 443k | L8 d96 886k |
    L8 d128 1.70M

and each budget gets the 5 consecutive rungs centred on the rung nearest N_opt:
1e12: L2d32 .. L4d96 (0.36x-4.9x N_opt); 3e12 and 1e13: L2d48 .. L8d96 (0.35x-5.6x and 0.19x-3.1x).
Edge extension: once a sweep has finished, while a family's mean minimum is on its edge, the next rung beyond
that edge is run for both families and every seed (at most --extend = 2 rungs per corpus and budget); a minimum
still on the edge after that is reported as "not bracketed".
Controls (--controls 1x32,1x48): dense shapes outside the ladder, run into <out>/controls/; one block is about the
cost per step of MoD-L2 (whose routed block is nearly skipped), the control the first study needed. The JSON's
"controls" pairs MoD's best size per seed with the best dense model of ladder + controls. The 1e12 results:
    OMP_NUM_THREADS=1 nice -n 10 python experiments/mod_isoflop_sizes.py --budgets 1e12 --controls 1x32,1x48

Analysis, per corpus and budget: the isoFLOP curve of each family (held-out loss vs non-embedding parameters,
mean over seeds); its minimum from a parabola in log10(params) through the best mean point and its two
neighbours (the best point itself where it is on an edge or the parabola does not open upwards, and the
results say which); forward FLOPs per 512-byte sequence (counted on held-out text, causal routing) at the best
measured size and interpolated (log-log) at the fitted minimum. Paired test (depthmix.evaluation.compare): for
each seed, the loss at the best size of each family's sweep for that seed (the same seeds drive the init and data
order of both families); arm mod vs baseline dense, with the smallest detectable difference. Per-size paired
differences (mod - dense at the same shape and seed) are also in the JSON. Only seeds whose sweep is complete for
a family enter the minimum comparison; the JSON says "partial" while runs are missing.

Writes docs/results/mod-isoflop-<corpus>-<budget>.json (issue 11 schema, one comparison per file) and
docs/img/mod-isoflop-<corpus>-<budget>.png. Runs go to runs/mod_isoflop_sizes/<corpus>/<budget>/<family>-L<l>-d<d>/
s<seed>/; a run with metrics.json is skipped, so the script can be stopped at any time and restarted.

Time. Smoke test (2026-11-24, shared 2-core CPU at load average ~9, OMP_NUM_THREADS=1, nice 10):
    python experiments/mod_isoflop_sizes.py --budgets 2e10 --shapes 2x32,2x48,4x48,4x64,4x96 --seeds 0 \
        --corpora tinyshakespeare --out /tmp/smoke/runs --results /tmp/smoke/results --img /tmp/smoke/img
ran the five 1e12 shapes x both families (10 runs) in 4.5 min: 20-36 s a run, almost all of it fixed cost
(start-up, FLOP count, held-out evaluation, saving). The 20 real 1e12 runs on tinyshakespeare then took
~47 s of training (4.7e-11 s per FLOP, dense and MoD alike) + ~21 s fixed, 68 s a run, 23 min in all. Expected
per corpus: 1e12 ~25 min, 3e12 ~55 min, 1e13 ~2.8 h (+ up to 8 edge-extension runs per budget); the full sweep
(3 budgets x 5 sizes x 2 families x 2 seeds x 2 corpora = 120 runs, 5.6e14 training FLOPs) about 8.5 h of one
core at this load, ~10 h with extensions.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from isoflop_curves import heldout_nll, loglog_interp, markdown, parabola_min, plot, verdicts  # beside this script

CORPORA = {  # name: (train file, held-out file or None = last 10% of the train file)
    "tinyshakespeare": ("lm/tinyshakespeare.txt", None),
    "wikitext-2": ("lm/wikitext-2/valid.txt", "lm/wikitext-2/test.txt"),
}
LADDER = [(2, 16), (2, 24), (2, 32), (2, 48), (4, 48), (4, 64), (4, 96), (8, 96), (8, 128)]  # (layers, hidden), ~2x steps
BUDGETS = [1e12, 3e12, 1e13]
FAMILIES = {
    "dense": ["--method", "dense"],
    "mod": ["--method", "mod", "--mod-layers", "every_other", "--capacity", "0.125"],
}
COMMON = ["--arch", "llama", "--seq-len", "512", "--batch-size", "8", "--lr", "2e-3", "--tokenizer", "bytes",
          "--no-progress", "--logging-steps", "10"]
VOCAB = 256
SWEEP = 5


def label(budget: float) -> str:
    """1e12 -> '1e12', 3e12 -> '3e12', 2.5e10 -> '2.5e10'."""
    mant, exp = f"{budget:e}".split("e")
    return f"{float(mant):g}e{int(exp)}"


def llama_nonembedding(layers: int, hidden: int) -> int:
    """Non-embedding parameters of the dense Llama that `depthmix pretrain` builds (for planning; the results use
    the count of the model as built)."""
    inner = 64 * math.ceil(8 * hidden / 3 / 64)
    return layers * (4 * hidden * hidden + 3 * hidden * inner + 2 * hidden) + hidden


def n_opt(budget: float) -> float:
    return math.sqrt(budget / 120)


def grid(budget: float, shapes: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """The SWEEP consecutive ladder rungs centred on the rung nearest N_opt (or the given shapes)."""
    if shapes:
        return shapes
    logs = [abs(math.log(llama_nonembedding(*s) / n_opt(budget))) for s in LADDER]
    i = min(range(len(LADDER)), key=logs.__getitem__)
    lo = min(max(0, i - SWEEP // 2), len(LADDER) - SWEEP)
    return LADDER[lo:lo + SWEEP]


def run_dir(out: Path, corpus: str, budget: float, family: str, shape, seed: int) -> Path:
    return out / corpus / label(budget) / f"{family}-L{shape[0]}-d{shape[1]}" / f"s{seed}"


def sweep(out: Path, corpus: str, budget: float, args) -> list[tuple[int, int]]:
    """The budget's grid plus the ladder rungs already run as edge extensions, smallest first."""
    base = grid(budget, args.shapes)
    if args.shapes:
        return base
    extra = [s for s in LADDER if s not in base and any(
        (run_dir(out, corpus, budget, f, s, seed) / "metrics.json").exists() for f in args.families
        for seed in args.seeds)]
    return sorted(base + extra, key=lambda s: llama_nonembedding(*s))


def edge_extension(out: Path, corpus: str, budget: float, args) -> tuple[int, int] | None:
    """The ladder rung beyond the edge where a family's mean curve has its minimum, once every run of the sweep has
    finished (at most --extend rungs per corpus and budget); None where both minima are bracketed."""
    if args.shapes:
        return None
    shapes = sweep(out, corpus, budget, args)
    if len(shapes) - SWEEP >= args.extend:
        return None
    means = {}
    for family in args.families:
        for shape in shapes:
            vals = []
            for seed in args.seeds:
                f = run_dir(out, corpus, budget, family, shape, seed) / "metrics.json"
                if not f.exists():
                    return None
                held = json.loads(f.read_text())["heldout"]
                vals.append(heldout_nll(held.get("causal", held.get("dense"))))
            means.setdefault(family, []).append(sum(vals) / len(vals))
    lo, hi = LADDER.index(shapes[0]), LADDER.index(shapes[-1])
    for family, m in means.items():
        i = m.index(min(m))
        if i == 0 and lo > 0:
            return LADDER[lo - 1]
        if i == len(m) - 1 and hi + 1 < len(LADDER):
            return LADDER[hi + 1]
    return None


def run_one(args, corpus: str, budget: float, family: str, shape, seed: int, out: Path | None = None) -> None:
    run = run_dir(out or Path(args.out), corpus, budget, family, shape, seed)
    if (run / "metrics.json").exists():
        return
    train_file, held = CORPORA[corpus]
    cmd = [sys.executable, "-m", "depthmix.cli.main", "pretrain", *COMMON, *FAMILIES[family],
           "--layers", str(shape[0]), "--hidden", str(shape[1]), "--flops", repr(budget), "--seed", str(seed),
           "--eval-blocks", str(args.eval_blocks), "--corpus", str(Path(args.data) / train_file),
           "--output-dir", str(run)]
    if held:
        cmd += ["--eval-corpus", str(Path(args.data) / held)]
    print(f"[{time.strftime('%H:%M:%S')}] {corpus} {label(budget)} {family} L{shape[0]} d{shape[1]} s{seed}",
          flush=True)
    run.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(run / "log.txt", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    print(f"    rc {rc}, {time.time() - start:.0f} s", flush=True)
    if rc:
        print((run / "log.txt").read_text()[-3000:], flush=True)
        raise SystemExit(rc)
    (run / "wall_seconds.txt").write_text(f"{time.time() - start:.1f}\n")


def train(args) -> None:
    """Run order: budget, corpus, seed (a whole curve per seed first), size, the families side by side; then,
    while a family's minimum is on an edge of the sweep, the next rung beyond it (every family and seed)."""
    out = Path(args.out)
    for budget in args.budgets:
        for corpus in args.corpora:
            for seed in args.seeds:
                for shape in sweep(out, corpus, budget, args):
                    for family in args.families:
                        run_one(args, corpus, budget, family, shape, seed)
            while (shape := edge_extension(out, corpus, budget, args)) is not None:
                print(f"    {corpus} {label(budget)}: a minimum is on the edge; adding L{shape[0]} d{shape[1]}",
                      flush=True)
                for seed in args.seeds:
                    for family in args.families:
                        run_one(args, corpus, budget, family, shape, seed)
            for shape in args.controls or []:
                for seed in args.seeds:
                    run_one(args, corpus, budget, "dense", shape, seed, out / "controls")


# ---------------------------------------------------------------------------------------------------- analysis

def record(run: Path, family: str, shape, seed: int) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    held = m["heldout"]
    main = held.get("causal", held.get("dense"))
    topk = held.get("topk-lookahead", held.get("topk"))  # "topk": its name in older runs
    fwd = m.get("forward_flops_heldout", m["forward_flops"])  # runs before the key was dropped wrote both
    wall = run / "wall_seconds.txt"
    return {"arm": family, "seed": seed, "value": heldout_nll(main), "layers": shape[0], "hidden": shape[1],
            "params": m["params"], "params_nonembedding": m["params"] - VOCAB * shape[1],
            "heldout_loss_topk": heldout_nll(topk) if topk is not None else None,
            "forward_flops": fwd.get("causal", fwd.get("dense")),
            "forward_flops_topk": fwd.get("topk-lookahead", fwd.get("topk")),
            "train_steps": m["train_steps"], "train_tokens": m["train_tokens"], "train_flops": m["train_flops"],
            "train_step_flops": m["train_step_flops"], "train_seconds": m["train_seconds"],
            "wall_seconds": float(wall.read_text()) if wall.exists() else None,
            "realized_capacity": main.get("realized_capacity"), "predictor_accuracy": main.get("predictor_accuracy")}


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def analyse(args, corpus: str, budget: float) -> dict | None:
    from depthmix.evaluation.compare import compare, paired_seeds, verdict
    out = Path(args.out)
    shapes = sweep(out, corpus, budget, args)
    runs, missing = [], []
    for family in args.families:
        for shape in shapes:
            for seed in args.seeds:
                run = run_dir(out, corpus, budget, family, shape, seed)
                if (run / "metrics.json").exists():
                    runs.append(record(run, family, shape, seed))
                else:
                    missing.append(f"{family}-L{shape[0]}-d{shape[1]} s{seed}")
    if not runs:
        return None
    curves, minima = {}, {}
    for family in args.families:
        pts = []
        for shape in shapes:
            rs = [r for r in runs if r["arm"] == family and (r["layers"], r["hidden"]) == shape]
            if not rs:
                continue
            vals = [r["value"] for r in rs]
            mean = sum(vals) / len(vals)
            sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
            pts.append({"shape": f"L{shape[0]} d{shape[1]}", "layers": shape[0], "hidden": shape[1],
                        "params_nonembedding": rs[0]["params_nonembedding"], "loss_mean": mean, "loss_std": sd,
                        "n": len(vals), "seeds": [r["seed"] for r in rs], "forward_flops": rs[0]["forward_flops"],
                        "train_tokens": rs[0]["train_tokens"], "train_steps": rs[0]["train_steps"],
                        "realized_capacity": _mean([r["realized_capacity"] for r in rs]),
                        "predictor_accuracy": _mean([r["predictor_accuracy"] for r in rs]),
                        "loss_topk_mean": _mean([r["heldout_loss_topk"] for r in rs])})
        if not pts:
            continue
        curves[family] = pts
        fit = parabola_min([(p["params_nonembedding"], p["loss_mean"]) for p in pts])
        best = pts[fit.pop("index")]
        xs = [p["params_nonembedding"] for p in pts]
        # forward FLOPs of one sequence depend on the run (causal routing on text); the mean over seeds
        fwd = [sum(r["forward_flops"] for r in runs if r["arm"] == family and r["layers"] == p["layers"]
                   and r["hidden"] == p["hidden"]) / p["n"] for p in pts]
        minima[family] = {"fit": fit, "best_measured": {k: best[k] for k in ("shape", "params_nonembedding",
                                                                              "loss_mean", "loss_std", "n")},
                          "forward_flops_at_best": fwd[pts.index(best)],
                          "forward_flops_at_fit": loglog_interp(xs, fwd, fit["params"]),
                          "sizes": len(pts), "complete": all(p["n"] == len(args.seeds) for p in pts)
                          and len(pts) == len(shapes)}
    # per seed: the best size of each family's complete sweep for that seed
    best_runs = []
    for family in args.families:
        for seed in args.seeds:
            rs = [r for r in runs if r["arm"] == family and r["seed"] == seed]
            if len(rs) < len(shapes):
                continue
            b = min(rs, key=lambda r: r["value"])
            best_runs.append({**{k: b[k] for k in ("arm", "seed", "value", "layers", "hidden",
                                                   "params_nonembedding", "forward_flops", "train_tokens")},
                              "shape": f"L{b['layers']} d{b['hidden']}"})
    per_size = {}
    for shape in shapes:
        d = {r["seed"]: r["value"] for r in runs if r["arm"] == "dense" and (r["layers"], r["hidden"]) == shape}
        m = {r["seed"]: r["value"] for r in runs if r["arm"] == "mod" and (r["layers"], r["hidden"]) == shape}
        if set(d) & set(m):
            p = paired_seeds(m, d)
            per_size[f"L{shape[0]} d{shape[1]}"] = {**p, "verdict": verdict("mod", "dense", p, False)}
    setup = {
        "budget_flops": budget, "budget_label": label(budget), "corpus": corpus,
        "corpus_files": list(filter(None, CORPORA[corpus])),
        "model": "Llama-style from random init (RoPE, SwiGLU 64*ceil(8d/3/64), head size 32, tied embedding), "
                 "byte tokens (vocab 256)",
        "training": "seq 512, batch 8, AdamW lr 2e-3 cosine, 5% warmup, weight decay 0.1, beta2 0.95; budget "
                    "counted by FlopCounterMode on one real training step, spent in whole steps",
        "families": {"dense": "all blocks", "mod": "every other block (1, 3, ...) routed, capacity 0.125, paper "
                     "update, predictor; held-out loss with causal routing"},
        "params": "non-embedding: total minus the tied 256 x d embedding (RoPE: no position table); MoD routers "
                  "and predictors included",
        "n_opt": n_opt(budget), "n_opt_rule": "sqrt(C / 120) (Chinchilla-like, C = 6 N D, D = 20 N)",
        "sizes": [{"shape": f"L{s[0]} d{s[1]}", "params_nonembedding_dense": llama_nonembedding(*s),
                   "x_n_opt": round(llama_nonembedding(*s) / n_opt(budget), 2)} for s in shapes],
        "seeds": args.seeds, "eval": f"{args.eval_blocks} held-out blocks of 512 bytes, mean next-byte NLL (nats)",
        "pairing": "per seed, the held-out loss at the best size of each family's sweep for that seed (only "
                   "seeds whose sweep is complete); per-size pairs (same shape and seed) under per_size",
        "minimum": "parabola in log10(non-embedding params) through the best mean point and its neighbours; the "
                   "best point where it is on an edge (not bracketed)",
        "forward_flops": "one forward pass of a 512-byte held-out sequence, causal routing, mean over 8 blocks",
        "extended": [f"L{x[0]} d{x[1]}" for x in shapes if x not in grid(budget, args.shapes)],
        "extension_rule": "while a family's mean minimum is on an edge of the sweep, the next ladder rung beyond it "
                          f"is run for every family and seed (at most {args.extend} per corpus and budget)",
        "partial": bool(missing), "missing_runs": missing,
    }
    result = compare(f"mod-isoflop-{corpus}-{label(budget)}", corpus,
                     "held-out loss at the isoFLOP minimum (nats/byte, causal routing)", False, "dense",
                     best_runs, setup)
    result.update(curves=curves, minima=minima, per_size=per_size, all_runs=runs)
    result["controls"] = controls(out, corpus, budget, runs, best_runs, args)
    return result


def controls(out: Path, corpus: str, budget: float, runs: list[dict], best_runs: list[dict], args) -> dict | None:
    """Dense shapes outside the ladder (--controls, e.g. one block: MoD-L2's cost per step), run into
    <out>/controls/: their runs, and mod's best per seed against the best dense model of ladder + controls."""
    from depthmix.evaluation.compare import paired_test, verdict
    folder = out / "controls" / corpus / label(budget)
    ctl = []
    for run in sorted(folder.glob("dense-L*-d*/s*")):
        if (run / "metrics.json").exists():
            layers, hidden = (int(v) for v in run.parent.name[len("dense-L"):].split("-d"))
            ctl.append(record(run, "dense", (layers, hidden), int(run.name[1:])))
    if not ctl:
        return None
    pairs = {}
    for seed in args.seeds:
        mod = [r for r in best_runs if r["arm"] == "mod" and r["seed"] == seed]
        dense = [r for r in best_runs if r["arm"] == "dense" and r["seed"] == seed]
        extra = [r for r in ctl if r["seed"] == seed]
        if mod and dense and extra:
            b = min(dense + extra, key=lambda r: r["value"])
            pairs[seed] = (mod[0]["value"], b["value"], f"L{b['layers']} d{b['hidden']}")
    p = {**paired_test([m - d for m, d, _ in pairs.values()]), "seeds": sorted(pairs)}
    return {"what": "dense shapes outside the ladder (one block: about MoD-L2's cost per step); the paired test "
                    "compares mod's best size per seed with the best dense model of ladder + controls",
            "runs": ctl, "dense_best_with_controls": {s: {"value": d, "shape": sh} for s, (_, d, sh) in pairs.items()},
            "paired": p, "verdict": verdict("mod", "dense (ladder + one-block controls)", p, False)}


def summarize(args) -> list[Path]:
    from depthmix.io import write_json
    written = []
    for budget in args.budgets:
        for corpus in args.corpora:
            result = analyse(args, corpus, budget)
            if result is None:
                continue
            name = f"mod-isoflop-{corpus}-{label(budget)}"
            write_json(Path(args.results) / f"{name}.json", result)
            plot(result, Path(args.img) / f"{name}.png")
            written.append(Path(args.results) / f"{name}.json")
            print(f"wrote {args.results}/{name}.json, {args.img}/{name}.png", flush=True)
    every = sorted(Path(args.results).glob("mod-isoflop-*-*.json"),
                   key=lambda f: (float(f.stem.rsplit("-", 1)[1]), f.stem))  # by budget
    if verdicts(every, Path(args.img) / "mod-isoflop-verdicts.png"):
        print(f"wrote {args.img}/mod-isoflop-verdicts.png", flush=True)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("DEPTHMIX_DATA", "../shared/data"))
    p.add_argument("--out", default="runs/mod_isoflop_sizes")
    p.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    p.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--shapes", help="override the grid, e.g. 2x32,2x48 (layers x hidden), for every budget")
    p.add_argument("--extend", type=int, default=2, help="ladder rungs at most added per corpus and budget where a "
                   "minimum is on the edge of the sweep (0: none)")
    p.add_argument("--controls", help="dense-only shapes outside the ladder, e.g. 1x32,1x48 (one block), run into "
                   "<out>/controls/ for every corpus and budget given")
    p.add_argument("--eval-blocks", type=int, default=100, help="held-out blocks of 512 bytes")
    p.add_argument("--results", default="docs/results")
    p.add_argument("--img", default="docs/img")
    p.add_argument("--plan", action="store_true", help="print the size grid and stop")
    p.add_argument("--summarize", action="store_true", help="only write the results from finished runs")
    p.add_argument("--table", action="store_true", help="print the Markdown of the results files and stop")
    args = p.parse_args()
    args.controls = [tuple(int(v) for v in s.split("x")) for s in args.controls.split(",")] if args.controls else None
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else None
    if args.plan:
        for budget in args.budgets:
            sizes = ", ".join(f"L{s[0]} d{s[1]} {llama_nonembedding(*s) / 1e3:.0f}k "
                              f"({llama_nonembedding(*s) / n_opt(budget):.2f}x)" for s in grid(budget, args.shapes))
            print(f"{label(budget)}: N_opt {n_opt(budget) / 1e3:.0f}k: {sizes}")
        return
    if args.table:
        files = [Path(args.results) / f"mod-isoflop-{c}-{label(b)}.json" for b in args.budgets for c in args.corpora]
        print(markdown([f for f in files if f.exists()]))
        return
    if not args.summarize:
        train(args)
    summarize(args)


if __name__ == "__main__":
    main()
