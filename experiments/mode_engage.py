"""MoDE gets its real chance (issue 27): its premise measured, then an ensemble that can engage, against LoRA.

The study of experiments/mode_math.py found MoDE + LoRA tied with LoRA, but its mixing weights never left the final
layer's head start (weight 0.98, router lr 1e-3 over ~126 steps). This one reuses that study's data, splits, LoRA
runs and chosen rates (docs/results/mode-math.json), on the embedded SmolLM2-135M-Instruct (de-quantised from
Q4_1), and adds:

Premise (docs/results/mode-premise.json): the held-out gold-answer NLL through each of the last k layers (logit
lens, each shallower layer through MoDE's norm, the final one through the model's; depthmix.tuners.mode.lens) and
how often a shallower layer is right where the final one is wrong, for the base model, after LoRA (its seed 0,
LoRA merged, MoDE's norms as they start: copies of the final norm) and after the chosen MoDE + LoRA (its trained
norms).
Phase 1 (seed 0, validation gold NLL): MoDE + LoRA at mode-math's chosen LoRA rate and distillation options, with
the router's rate in --router-lrs and the final layer's starting weight 0.98 or uniform (1/k); then LoRA's rate
again around the best (sweeps.around), so that the two rates are tuned together.
Phase 2 (seeds --seeds): the chosen configuration against mode-math's LoRA runs of the same seeds (same data and
flags: paired), gold NLL on the 500 held-out problems (docs/results/mode-engage.json) with, per run, the learned
mixing weights (mean and spread over held-out tokens) and a picture of them (docs/img/mode-engage-weights.png).

    OMP_NUM_THREADS=2 nice python experiments/mode_engage.py --data-dir ../shared/data --out runs/mode_engage

Cost: as mode_math's runs (15-45 min each on one core of the shared CPU): 1 LoRA run for the premise, 6 + 2 in
phase 1, 2 more seeds in phase 2. Resumable: finished runs are skipped (their results files are the record).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mode_math  # experiments/mode_math.py: data splits, training runs, gold NLL
import sweeps

K = 3  # MoDEConfig's default num_layers, as in mode-math
INITS = {"init0.98": "0.98", "uniform": repr(1 / K)}
ROUTER_LRS = ["1e-3", "1e-2", "1e-1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", default="runs/mode_engage")
    p.add_argument("--results", default="docs/results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--router-lrs", nargs="+", default=ROUTER_LRS)
    p.add_argument("--reverse", action="store_true", help="a second lane: phase 2's runs from the other end")
    p.add_argument("--base-premise-only", action="store_true",
                   help="measure the premise on the untrained base model (minutes, no training) and stop")
    p.add_argument("--table", action="store_true", help="print the Markdown of the results files and stop")
    args = p.parse_args()
    if args.table:
        print(tables(Path(args.results)))
        return
    math_result = json.loads((Path(args.results) / "mode-math.json").read_text())
    args.train_size, args.epochs, args.eval_samples = 500, "2", 300  # mode-math's, so its LoRA runs pair with these
    out = Path(args.out)
    splits = mode_math.prepare(Path(args.data_dir), out / "data", args.train_size, 200, 500)
    base = math_result["setup"]["phase1"]
    premise = recorded_premise(args)
    if "base" not in premise:
        premise["base"] = lens_of(None, splits)
        write_premise(args, premise)
    if args.base_premise_only:
        return
    if "after_lora" not in premise:
        lora = out / "lora-s0"
        mode_math.run(args, lora, 0, mode_math.final_flags("lora", base), splits, "heldout", args.eval_samples)
        premise["after_lora"] = lens_of(lora, splits)
        write_premise(args, premise)
    best = sweep(args, out, splits, base)
    kept = final_record(args, best)
    runs = []
    for seed in sweeps.ordered(args, args.seeds):
        folder = out / "final" / f"mode+lora-s{seed}"
        if f"mode+lora-engaged-s{seed}" in kept or sweeps.busy(folder):
            continue
        record = mode_math.run(args, folder, seed, best["flags"], splits, "heldout", args.eval_samples)
        runs.append({"arm": "mode+lora-engaged", "seed": seed, "value": record["gold_nll"],
                     "mixing": mixing(folder, splits["heldout"])})
        if seed == 0:
            premise["after_mode_lora"] = lens_of(folder, splits)
            write_premise(args, premise)
        summarize(args, math_result, best, runs, premise["base"]["layers"])  # progress as data, after every run


def lens_of(folder: Path | None, splits: dict) -> dict:
    """The layer lens on the held-out problems: of the base model (folder None), of a LoRA run (merged, then MoDE's
    starting norms) or of a MoDE run (its trained norms)."""
    import depthmix
    from depthmix.data.tasks import get_task
    from depthmix.models import load_model, load_tokenizer
    from depthmix.train import load_trained
    from depthmix.tuners.mode.lens import layer_lens
    if folder is None:
        model, tok = depthmix.apply(load_model(mode_math.MODEL), depthmix.MoDEConfig(num_layers=K)), \
            load_tokenizer(mode_math.MODEL)
    else:
        model, tok, _ = load_trained(str(folder))
        if model.method is None:  # LoRA alone: merged into the base, then MoDE as it starts
            model = depthmix.apply(model.merge_and_unload(), depthmix.MoDEConfig(num_layers=K))
    task = get_task("singleeq")
    enc = task.encode(task.load("train", str(splits["heldout"])), tok, 256)
    collate = task.collator(tok)
    batches = (collate([enc[i] for i in range(s, min(s + 16, len(enc)))]) for s in range(0, len(enc), 16))
    return layer_lens(model, batches)


def mixing(folder: Path, problems: Path) -> dict:
    """The learned mixing weights of a MoDE run on a split's problems: mean and spread over tokens per layer."""
    from depthmix.data.tasks import get_task
    from depthmix.evaluation import response_nll
    from depthmix.train import load_trained
    model, tok, _ = load_trained(str(folder))
    model.method.reset_stats()
    task = get_task("singleeq")
    response_nll(task, model, tok, task.load("train", str(problems)), 256)
    return model.method.routing_record()


def sweep(args, out: Path, splits: dict, base: dict) -> dict:
    """Phase 1: the router's rate and the final layer's start, then LoRA's rate again at the best of them."""
    lr, options = base["mode+lora"]["lr"], base["distill"]["options"]

    def flags(lora_lr, router_lr, init):
        return ["--method", "mode", "--lr", lora_lr, *mode_math.DISTILL[options], "--router-lr", router_lr,
                "--init-final-weight", INITS[init]]

    file = Path(args.results) / "mode-engage-sweep.json"
    done = sweeps.recorded(file, lambda rec: rec["lr"] == lr and rec["distill"] == options)

    def scored(lora_lr, router_lr, init):
        name = f"mode+lora-lr{lora_lr}-rlr{router_lr}-{init}"
        if name not in done:
            value = mode_math.run(args, out / "sweep" / name, sweeps.PHASE1_SEED, flags(lora_lr, router_lr, init),
                                  splits, "validation", 8)["gold_nll"]
            # the weights each run learnt (on the validation problems): did the ensemble engage at this rate?
            done[name] = {"run": name, "arm": "mode+lora", "seed": sweeps.PHASE1_SEED, "value": value,
                          "flags": flags(lora_lr, router_lr, init),
                          "mixing": mixing(out / "sweep" / name, splits["validation"])}
            sweeps.publish(file, {"experiment": "mode-engage-sweep", "metric": "gold_nll", "lr": lr,
                                  "distill": options, "runs": sorted(done.values(), key=sweeps.name_of)})
        return name, done[name]["value"]

    # fastest router first: a stopped sweep has first tried the rate most likely to move the weights
    grid = {(lr, rlr, init): scored(lr, rlr, init) for rlr in reversed(args.router_lrs) for init in INITS}
    _, router_lr, init = min(grid, key=lambda key: grid[key][1])
    retuned = {(l, router_lr, init): scored(l, router_lr, init) for l in sweeps.around(lr)}
    lora_lr = min(retuned, key=lambda key: retuned[key][1])[0]
    scores = dict([*grid.values(), *retuned.values()])
    return {"lora_lr": lora_lr, "router_lr": router_lr, "init": init, "distill": options,
            "validation_nll": scores, "flags": flags(lora_lr, router_lr, init)}


def recorded_premise(args) -> dict:
    file = Path(args.results) / "mode-premise.json"
    if not file.exists():
        return {}
    rec = json.loads(file.read_text())
    return {key: rec[key] for key in ("base", "after_lora", "after_mode_lora") if key in rec}


def final_record(args, best: dict) -> dict[str, dict]:
    """The phase-2 runs docs/results/mode-engage.json records at this configuration (sweeps.recorded)."""
    file = Path(args.results) / "mode-engage.json"
    return {name: r for name, r in sweeps.recorded(file, lambda rec: rec["setup"]["chosen"]["flags"] == best["flags"])
            .items() if r["arm"] == "mode+lora-engaged"}


def write_premise(args, premise: dict) -> None:
    sweeps.publish(Path(args.results) / "mode-premise.json", {
        "experiment": "mode-premise", "model": "SmolLM2-135M-Instruct, de-quantised from Q4_1",
        "data": "500 held-out problems of reasoning/math_train.json (mode-math's split), gold answers",
        "k": K, **premise})


def summarize(args, math_result: dict, best: dict, runs: list[dict], layers: list[int]) -> None:
    from depthmix import plots
    from depthmix.evaluation.compare import compare
    runs = sweeps.merged(runs, final_record(args, best))
    lora = [r for r in math_result["runs"] if r["arm"] == "lora"]  # mode-math's LoRA: same data, flags and seeds
    paper = [{**r, "arm": "mode+lora-paper"} for r in math_result["runs"] if r["arm"] == "mode+lora"]
    setup = {"model": mode_math.MODEL, "reused": "LoRA and MoDE + LoRA at the paper's start from mode-math.json",
             "mode_math_setup": math_result["setup"], "chosen": best, "seeds": args.seeds,
             "final_layer_weight": {r["seed"]: r["mixing"]["mean_weights"][-1] for r in runs}}
    result = compare("mode-engage", "reasoning/math (held-out worked answers)", "gold_nll", False, "lora",
                     lora + paper + runs, setup, controls=(("mode+lora-engaged", "mode+lora-paper"),))
    sweeps.write(result, Path(args.results))
    plots.layer_weights({f"seed {r['seed']}": (r["mixing"]["mean_weights"], r["mixing"]["weight_std"])
                         for r in runs}, layers,
                        Path(args.results).parent / "img" / "mode-engage-weights.png",
                        title="MoDE + LoRA (engaged): learned mixing weights on held-out tokens (± s.d. over tokens)")
    print(sweeps.report(result), flush=True)


def tables(results: Path) -> str:
    parts = []
    file = results / "mode-premise.json"
    if file.exists():
        rec = json.loads(file.read_text())
        lines = ["| model | layer | NLL | top-1 accuracy | right where the final layer is wrong |", "|" + " --- |" * 5]
        for key, label in (("base", "base"), ("after_lora", "after LoRA (seed 0)"),
                           ("after_mode_lora", "after MoDE + LoRA (seed 0)")):
            if key not in rec:
                continue
            lens = rec[key]
            for j, t in enumerate(lens["layers"]):
                final = " (final)" if j == len(lens["layers"]) - 1 else ""
                lines.append(f"| {label} | block {t}{final} | {lens['nll'][j]:.4f} | {lens['accuracy'][j]:.4f} | "
                             f"{lens['right_where_final_wrong'][j]:.4f} |")
            lines.append(f"| {label} | any of them (oracle) | | {lens['oracle_accuracy']:.4f} | |")
        parts.append(f"**The premise** ({rec['model']}; {rec['data']}; {rec['base']['tokens']} tokens; logit lens "
                     "through each layer's MoDE norm and the shared head):\n\n" + "\n".join(lines))
    file = results / "mode-engage-sweep.json"
    if file.exists():
        runs = json.loads(file.read_text())["runs"]
        lines = ["| phase-1 run (seed 0) | validation gold NLL | mixing weights, blocks in order (mean over tokens) |",
                 "|" + " --- |" * 3]
        for r in runs:
            weights = " / ".join(f"{w:.3f}" for w in r["mixing"]["mean_weights"]) if "mixing" in r else ""
            lines.append(f"| {r['run']} | {r['value']:.4f} | {weights} |")
        parts.append("**Phase 1** (router rate and start, then LoRA's rate; validation split):\n\n" + "\n".join(lines))
    file = results / "mode-engage.json"
    if file.exists():
        rec = json.loads(file.read_text())
        weights = ", ".join(f"seed {s}: {w:.3f}" for s, w in sorted(rec["setup"]["final_layer_weight"].items()))
        parts.append(sweeps.report(rec, picture=True) + f"\n\nFinal layer's mean mixing weight at the end: {weights}."
                     "\n\n![learned mixing weights](img/mode-engage-weights.png)")
    return "\n\n".join(parts) if parts else "no results yet"


if __name__ == "__main__":
    sys.exit(main())
