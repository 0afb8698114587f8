"""MoDE on arithmetic reasoning, as a fair test of the paper's claim (issue 11, item 2), on the embedded SmolLM2-135M.

Data: LLM-Adapters' reasoning/math_train.json (3,260 worked problems), split once with a fixed seed into a
validation set (200, for choosing options), a held-out set (500, the primary metric) and a training pool; every run
trains on the same --train-size problems of the pool for --epochs epochs (seeds change the initialisation and the
order). The arithmetic test sets stay unseen until the secondary metric (SingleEq accuracy, greedy generation).

Phase 1 (seed 0, validation gold NLL): the learning rate of each arm (LoRA, MoDE + LoRA at the paper's options;
beyond the grid's edge while the best is there, sweeps.py), MoDE's distillation options at that rate (lambda in
{0, 0.1, 1}, summed or averaged over the shallower layers, into the backbone or the norms only), then MoDE + LoRA's
rate again at the chosen options (unless they are the paper's; centred on the rate the options ran at), so that
it is tuned where it is compared, and MoDE alone's rate at those options (it trains only the norms and the router:
its rate is --router-lr).
Phase 2 (paired seeds): LoRA vs MoDE + LoRA at its best options vs MoDE alone (norms + router), each at its own
best learning rate (MoDE alone with MoDE + LoRA's distillation options); primary metric the gold-response NLL on
the 500 held-out problems, secondary SingleEq accuracy. Seed 0 of each arm is phase 1's run at the chosen options
(the same seed, rows and flags train the same model), scored again.

    OMP_NUM_THREADS=2 nice python experiments/mode_math.py --data-dir ../shared/data --out runs/mode_math

Cost, measured on the shared 2-core CPU with OMP_NUM_THREADS=1 beside another experiment: one phase-1 run (500
problems x 2 epochs = 125 steps of batch 8 x <= 256 tokens, then the gold NLL of 200 problems) takes 15-45 min
(the neighbour's load varies); phase 1 is 16 runs (9 learning rates, 5 more MoDE options, 2 more rates at the
chosen ones) plus edge extensions, phase 2 six trainings and nine scorings (500 held-out problems, 300 SingleEq
answers generated): some 15-20 hours of one core in all (the smoke run had estimated 4-5).

Resumable: a finished run (metrics.json + nll.json) is skipped and a stopped one continues from its last checkpoint
(every 25 steps), so the script can be stopped at any time and run again; a second process with --reverse takes
phase 2's runs from the other end (each run is trained by the one that claims it first, sweeps.claim; the other
moves on, sweeps.busy). Writes docs/results/mode-math.json
(primary) and docs/results/mode-math-singleeq.json (secondary), both from the runs, with paired differences and
the smallest detectable difference.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import sweeps  # experiments/sweeps.py, beside this script

MODEL = "smollm2-135m"
COMMON = ["--model", MODEL, "--task", "singleeq", "--batch-size", "8", "--max-length", "256", "--lora-r", "8",
          "--lora-alpha", "16", "--eval-batch-size", "32", "--logging-steps", "10", "--save-steps", "25",
          "--save-total-limit", "1", "--no-progress"]
LRS = {"lora": ["5e-4", "1e-3", "2e-3"], "mode+lora": ["5e-4", "1e-3", "2e-3"], "mode": ["5e-3", "1e-2", "2e-2"]}
DISTILL = {  # MoDE options swept on the validation set at the MoDE + LoRA arm's best learning rate
    "kl0": ["--distill-weight", "0"],
    "kl0.1-mean": ["--distill-weight", "0.1", "--distill-reduction", "mean"],
    "kl1-mean": ["--distill-weight", "1", "--distill-reduction", "mean"],
    "kl1-sum": [],  # the paper's options, MoDEConfig's defaults: its runs are the learning-rate sweep's
    "kl0.1-mean-norms": ["--distill-weight", "0.1", "--distill-reduction", "mean", "--distill-into", "norms"],
    # the final layer's starting weight: 0.98 (default) keeps the untrained model at the base model; 0.5 lets the
    # shallower layers' logits count from the first step
    "kl0.1-mean-init0.5": ["--distill-weight", "0.1", "--distill-reduction", "mean", "--init-final-weight", "0.5"],
}
PAPER = "kl1-sum"
ARMS = {"lora": ["--method", "lora"], "mode+lora": ["--method", "mode"], "mode": ["--method", "mode", "--no-lora"]}
# the flag an arm's rate goes to: MoDE alone has no LoRA, its norms and router learn at the method's own rate
RATE = {"lora": "--lr", "mode+lora": "--lr", "mode": "--router-lr"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", default="runs/mode_math")
    p.add_argument("--results", default="docs/results")
    p.add_argument("--train-size", type=int, default=500)
    p.add_argument("--epochs", default="2")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-samples", type=int, default=300, help="SingleEq problems scored (secondary metric)")
    p.add_argument("--validation-size", type=int, default=200)
    p.add_argument("--heldout-size", type=int, default=500)
    p.add_argument("--reverse", action="store_true",
                   help="take phase 2's runs from the other end: a second process beside a running one (on another "
                        "core), each run trained by whichever claims it first")
    p.add_argument("--summary-only", action="store_true", help="only write the results from finished runs")
    p.add_argument("--table", action="store_true", help="print the Markdown of the results files and stop")
    args = p.parse_args()
    if args.table:
        print(tables(Path(args.results)))
        return
    out = Path(args.out)
    splits = prepare(Path(args.data_dir), out / "data", args.train_size, args.validation_size, args.heldout_size)
    if not args.summary_only:
        best = sweep(args, out, splits)
        nll, accuracy = final_records(args, best)
        for seed, arm in sweeps.ordered(args, [(seed, arm) for seed in args.seeds for arm in ARMS]):
            folder, trained = out / "final" / f"{arm}-s{seed}", phase1_run(arm, best)
            if folder.name in nll and folder.name in accuracy or sweeps.busy(folder):  # recorded, or the other lane's
                continue
            if seed == sweeps.PHASE1_SEED and (out / "sweep" / trained / "metrics.json").exists():
                rescore(args, folder, out / "sweep" / trained, splits)
            else:
                run(args, folder, seed, final_flags(arm, best), splits, "heldout", args.eval_samples)
            summarize(args, out)  # progress as data, after every run (the record)
    summarize(args, out)


def prepare(data: Path, root: Path, train_size: int, validation_size: int, heldout_size: int) -> dict:
    """Three data folders, each with a reasoning/math_train.json as the task reads it: train, validation, held-out."""
    from depthmix.io import atomic_write
    rows = json.loads((data / "reasoning" / "math_train.json").read_text())
    order = list(range(len(rows)))
    random.Random(1234).shuffle(order)
    a, b = validation_size, validation_size + heldout_size
    if b + train_size > len(order):
        raise SystemExit(f"{validation_size} validation + {heldout_size} held-out + {train_size} training problems, "
                         f"but math_train.json has {len(order)}")
    parts = {"validation": order[:a], "heldout": order[a:b], "train": order[b:b + train_size]}
    folders = {}
    for name, idx in parts.items():
        folder = root / name
        file = folder / "reasoning" / "math_train.json"
        if not file.exists():  # written last and atomically: its presence marks the folder complete
            file.parent.mkdir(parents=True, exist_ok=True)
            # the evaluation task (SingleEq) reads its test set from the same folder as the training file
            link = file.parent / "SingleEq_test.json"
            link.unlink(missing_ok=True)
            link.symlink_to((data / "reasoning" / "SingleEq_test.json").resolve())
            text = json.dumps([rows[i] for i in idx])
            atomic_write(file, lambda tmp: Path(tmp).write_text(text))
        folders[name] = folder
    return folders


def run(args, folder: Path, seed: int, flags: list[str], splits: dict, nll_split: str, eval_samples: int) -> dict:
    nll_file = folder / f"nll-{nll_split}.json"
    with sweeps.claim(folder):
        if not (folder / "metrics.json").exists():
            resume = ["--resume"] if any(folder.glob("checkpoint-*")) else []  # a stopped run continues (--save-steps)
            cmd = [sys.executable, "-m", "depthmix.cli.main", "train", *COMMON, "--data-dir", str(splits["train"]),
                   "--epochs", args.epochs, "--seed", str(seed), "--max-eval-samples", str(eval_samples),
                   "--eval-max-new-tokens", "160", "--output-dir", str(folder), *flags, *resume]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        if not nll_file.exists():
            gold_nll(folder, splits[nll_split], nll_file)
    return {**json.loads((folder / "metrics.json").read_text()), **json.loads(nll_file.read_text())}


def rescore(args, folder: Path, trained: Path, splits: dict) -> None:
    """Phase 2's seed-0 run: phase 1's run at the chosen options, scored on the held-out problems and SingleEq
    (sweeps.REUSED)."""
    with sweeps.claim(folder):
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "nll-heldout.json").exists():
            gold_nll(trained, splits["heldout"], folder / "nll-heldout.json")
        if not (folder / "metrics.json").exists():
            flags = ["--task", "singleeq", "--data-dir", str(splits["train"]), "--max-eval-samples",
                     str(args.eval_samples), "--max-new-tokens", "160", "--batch-size", "32", "--max-length", "256"]
            sweeps.rescore([sys.executable, "-m", "depthmix.cli.main"], trained, folder, flags, "eval-singleeq.json")


def phase1_run(arm: str, best: dict) -> str:
    """The phase-1 run that trained what phase 2's seed 0 of this arm trains."""
    return run_name(arm, best[arm]["lr"], None if arm == "lora" else best["distill"]["options"])


def run_name(arm: str, lr: str, options: str | None) -> str:
    """A phase-1 run's folder: arm-lrLR, then -OPTIONS for MoDE options other than the paper's."""
    return f"{arm}-lr{lr}" + ("" if options in (None, PAPER) else f"-{options}")


def gold_nll(folder: Path, split_dir: Path, file: Path) -> None:
    """Mean NLL per token of the gold worked answers (prompt masked, teacher forced, eval mode: no lookahead)."""
    from depthmix.data.tasks import get_task
    from depthmix.evaluation import response_nll
    from depthmix.io import write_json
    from depthmix.train import load_trained
    model, tokenizer, _ = load_trained(str(folder))
    task = get_task("singleeq")
    start = time.time()
    result = response_nll(task, model, tokenizer, task.load("train", str(split_dir)), 256)
    write_json(file, {**result, "split": split_dir.name, "seconds": round(time.time() - start, 1)})
    print(f"{folder.name}: gold NLL {result['gold_nll']:.4f} on {split_dir.name}", flush=True)


def sweep(args, out: Path, splits: dict) -> dict:
    """Phase 1 on seed 0: the best learning rate of LoRA and of MoDE + LoRA (at the paper's options), the best
    distillation options for MoDE + LoRA at its rate, then, for options other than the paper's, its rate again, and
    MoDE alone's rate at the chosen options."""
    kept = sweep_record(args)

    def scored(name, flags):
        if name in kept and not (out / "sweep" / name / "metrics.json").exists():
            return kept[name]["value"]
        value = run(args, out / "sweep" / name, sweeps.PHASE1_SEED, flags, splits, "validation", 8)["gold_nll"]
        write_sweep(args, out)  # progress as data, after every run
        return value

    def arm_run(arm, lr, options=None):
        return scored(run_name(arm, lr, options), [*ARMS[arm], RATE[arm], lr, *DISTILL.get(options, [])])

    best = {}
    for arm in ("lora", "mode+lora"):
        lr, scores = sweeps.tune(lambda lr, arm=arm: arm_run(arm, lr), LRS[arm], higher_is_better=False)
        best[arm] = {"lr": lr, "validation_nll": scores}
    lr = best["mode+lora"]["lr"]  # tuned at the paper's options
    scores = {name: arm_run("mode+lora", lr, name) for name in DISTILL}
    options = min(scores, key=scores.get)
    best["distill"] = {"options": options, "lr": lr, "validation_nll": scores}
    if options != PAPER:  # other options may want another rate: MoDE + LoRA gets its own, as LoRA does
        # centred where the options ran (their run is reused), not on the first grid: the rate sweep may have
        # climbed past that grid's edge
        lr, retuned = sweeps.tune(lambda lr: arm_run("mode+lora", lr, options), sweeps.around(lr),
                                  higher_is_better=False)
        best["mode+lora"] = {"lr": lr, "validation_nll": best["mode+lora"]["validation_nll"],
                             "validation_nll_at_options": retuned}
    lr, scores = sweeps.tune(lambda lr: arm_run("mode", lr, options), LRS["mode"], higher_is_better=False)
    best["mode"] = {"lr": lr, "validation_nll": scores}
    from depthmix.io import write_json
    write_json(out / "sweep.json", best)
    print(f"phase 1: {json.dumps(best)}", flush=True)
    return best


def sweep_settings(args) -> dict:
    return {"train": f"{args.train_size} problems, {args.epochs} epochs",
            "validation": f"{args.validation_size} problems of math_train"}


def sweep_record(args) -> dict[str, dict]:
    """The phase-1 runs docs/results/mode-math-sweep.json records with this process's data and options
    (sweeps.recorded)."""
    return sweeps.recorded(Path(args.results) / "mode-math-sweep.json", lambda rec: rec["distill"] == DISTILL and all(
        rec[k] == v for k, v in sweep_settings(args).items()))


def final_records(args, best: dict) -> tuple[dict, dict]:
    """The phase-2 runs docs/results/mode-math.json (held-out NLL) and mode-math-singleeq.json record with this
    process's data, flags and SingleEq sample (sweeps.recorded)."""
    def same(rec):
        s, mine = rec["setup"], setup(args, best)
        return all(s[k] == mine[k] for k in ("train", "heldout", "arms"))
    results = Path(args.results)
    return (sweeps.recorded(results / "mode-math.json", same),
            sweeps.recorded(results / "mode-math-singleeq.json",
                            lambda rec: same(rec) and all(r["rows"] == args.eval_samples for r in rec["runs"])))


def write_sweep(args, out: Path) -> None:
    """docs/results/mode-math-sweep.json: every finished phase-1 run (seed 0, validation gold NLL), so far, and
    those an earlier session recorded there."""
    runs = []
    for nll in sorted((out / "sweep").glob("*/nll-validation.json")):
        name = nll.parent.name
        arm, lr, options = re.fullmatch(r"(.+?)-lr([0-9.]+e-?[0-9]+)(?:-(.+))?", name).groups()
        m = json.loads((nll.parent / "metrics.json").read_text())
        options = options or (PAPER if arm != "lora" else None)
        runs.append({"run": name, "arm": arm, "lr": lr, "options": options, "seed": 0,
                     "value": json.loads(nll.read_text())["gold_nll"], "train_seconds": m["train_seconds"],
                     "train_steps": m["train_steps"]})
    runs = sweeps.merged(runs, sweep_record(args))
    # the paper's options are the rate sweep's runs; other chosen options sweep the rate again (one run reused)
    planned = sum(len(v) for v in LRS.values()) + len(DISTILL) - 1 + len(sweeps.around(LRS["mode+lora"][0])) - 1
    sweeps.publish(Path(args.results) / "mode-math-sweep.json", {
        "experiment": "mode-math-sweep", "task": "reasoning/math (validation worked answers)", "metric": "gold_nll",
        "higher_is_better": False, **sweep_settings(args), "runs": runs, "planned": planned,
        "lrs": LRS, "rate_flags": RATE, "edge_extension": sweeps.RULE, "distill": DISTILL,
        "paper": f"{PAPER}: MoDEConfig's defaults (distill_weight 1, distill_reduction sum, distill_into backbone, "
                 "init_final_weight 0.98), no flags"})


def tables(results: Path) -> str:
    parts = []
    sweep_file = results / "mode-math-sweep.json"
    if sweep_file.exists():
        rec = json.loads(sweep_file.read_text())
        parts.append(sweeps.phase1_table(rec, "Phase 1", rec["validation"], {
            "run": lambda r: r["run"], "arm": lambda r: r["arm"],
            "lr": lambda r: r["lr"] + (" (router)" if rec["rate_flags"][r["arm"]] == "--router-lr" else ""),
            "options": lambda r: r["options"] or "—", "validation gold NLL": lambda r: f"{r['value']:.4f}"}))
    for name in ("mode-math", "mode-math-singleeq"):
        file = results / f"{name}.json"
        if file.exists():
            parts.append(sweeps.report(json.loads(file.read_text()), picture=True))
    return "\n\n".join(parts) if parts else "no results yet"


def final_flags(arm: str, best: dict) -> list[str]:
    flags = [*ARMS[arm], RATE[arm], best[arm]["lr"]]
    return flags if arm == "lora" else flags + DISTILL[best["distill"]["options"]]  # MoDE alone: the same options


def summarize(args, out: Path) -> None:
    from depthmix.evaluation.compare import compare
    if (out / "sweep").exists():
        write_sweep(args, out)
    sweep_file = out / "sweep.json"
    if not sweep_file.exists():
        print(f"phase 1 not finished: only {Path(args.results) / 'mode-math-sweep.json'} written")
        return
    best = json.loads(sweep_file.read_text())
    runs_nll, runs_acc = [], []
    for folder in sorted((out / "final").glob("*-s*")):
        nll = folder / "nll-heldout.json"
        if not (folder / "metrics.json").exists() or not nll.exists():
            continue
        arm, seed = folder.name.rsplit("-s", 1)
        m, n = json.loads((folder / "metrics.json").read_text()), json.loads(nll.read_text())
        common = {"arm": arm, "seed": int(seed), "trainable_params": m["trainable_params"],
                  "train_seconds": m["train_seconds"], "train_steps": m["train_steps"]}
        runs_nll.append({**common, "value": n["gold_nll"], "tokens": n["tokens"], "rows": n["rows"]})
        runs_acc.append({**common, "value": m["metrics"]["accuracy"], "rows": args.eval_samples})
    nll, accuracy = final_records(args, best)
    runs_nll, runs_acc = sweeps.merged(runs_nll, nll), sweeps.merged(runs_acc, accuracy)
    results = Path(args.results)
    primary = compare("mode-math", "reasoning/math (held-out worked answers)", "gold_nll", False, "lora", runs_nll,
                      setup(args, best))
    secondary = compare("mode-math-singleeq", "singleeq", "accuracy", True, "lora", runs_acc, setup(args, best))
    for result in (primary, secondary):
        sweeps.write(result, results)
    print(sweeps.report(primary), sweeps.report(secondary), sep="\n\n")


def setup(args, best: dict) -> dict:
    return {"model": MODEL, "train": f"{args.train_size} problems of reasoning/math_train.json, {args.epochs} epochs, "
            "batch 8, LoRA r 8 on q_proj/v_proj", "validation": f"{args.validation_size} problems of math_train (phase 1)",
            "heldout": f"{args.heldout_size} problems of math_train, never trained on", "phase1": best,
            "phase2_seed0": sweeps.REUSED, "seeds": args.seeds,
            "arms": {arm: final_flags(arm, best) for arm in ARMS}}


if __name__ == "__main__":
    main()
