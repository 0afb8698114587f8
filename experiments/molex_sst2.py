"""MoLEx as a fair test of the paper's claim (issue 11, items 1 and 4): SST-2 and pydoc/topics on minilm-l6.

Arms (all: LoRA r 8, alpha 16 on query/value with weight decay 0.1, the classifier head and the BERT pooler
trained — minilm-l6 is a mean-pooling sentence encoder whose pooler was never trained, which capped every arm
of the earlier study — same data, steps and batches):
  lora             LoRA alone (the baseline)
  molex-ours       MoLEx + LoRA as depthmix trains it: gate learnt by the task loss (straight-through), learnt
                   alpha, gate lr 1e-2, no balance loss
  molex-published  (a misnomer kept as the results' key) OUR per-sequence linear gate trained by the load-balancing
                   loss alone (weight 0.01), alpha fixed at 0.5, gate lr 0.1 and weight decay 0.1: the authors'
                   gate training, not their routing
  molex-frozen     control: the published arm with the gates frozen at their random start (no balance loss)
  molex-public     the authors' SST-2 script (design.md §4 pins each setting): one expert per batch (the most
                   frequent top-1 over every position, padding included), one cosine gate shared by all layers
                   (projection to 128, temperature from 0.5, normalised over the sequence as theirs is), trained by
                   the balance loss alone (T * P of the voted layer), alpha fixed at 0.5, gate lr 0.1 and weight
                   decay 0.1; unlike theirs, inputs are padded to the batch's longest, not to 512
  molex-pair       control for it: each layer mixed with a fixed other layer (t + 1), no gate, alpha fixed at 0.5
Sequence routing for the first three MoLEx arms (one expert per sentence), batch routing for molex-public.

Data: each task's training set is split once (seed 1234) into a validation set and a training set; dev (SST-2
dev.tsv, 872 sentences; pydoc/topics' held-out passages, 271) is never used for a choice.
Phase 1 (seed 0, validation accuracy): the LoRA learning rate of each arm, from --lrs; while an arm's best is on
the edge of the rates tried, the next one beyond it (x2 or /2) is run, at most two per arm (sweeps.py).
Phase 2 (seeds 0-4, dev accuracy): each arm at its chosen learning rate, trained on the same training set;
seed 0 is phase 1's run at that rate, scored on dev (the same seed, rows and flags train the same model);
compare() writes docs/results/molex-sst2.json and docs/results/molex-pydoc.json (summary, paired differences
against LoRA with 95% CI and the smallest detectable difference, verdicts); setup records the binomial standard
error of one run's accuracy on dev, the other limit on power.

    OMP_NUM_THREADS=1 nice python experiments/molex_sst2.py --out runs/molex_sst2 [--reverse]

Cost: (4 arms x 3 learning rates + 4 arms x 4 seeds) x 2 tasks = 56 runs, plus edge extensions. The SST-2
phase-1 runs (10,000 sentences, 3 epochs = 939 steps of batch 32 x <= 64 tokens) recorded 11-20 min of training
(LoRA) and 12-28 min (MoLEx arms) on one core of the shared 2-core CPU (OMP_NUM_THREADS=1, beside another
experiment; a resumed run records its last stretch only), plus start-up and evaluation; each run's time is in
docs/results/molex-sst2-sweep.json. The smoke test (tiny sizes, every phase, both result files; each of its runs
took 1.5-4 min of wall time, mostly start-up, on the loaded machine):

    python experiments/molex_sst2.py --out /tmp/molex_smoke --results /tmp/molex_smoke/results \
        --train-size 64 --validation-size 32 --eval-size 32 --epochs 1 --lrs 1e-3 --seeds 0 1

Resumable: a finished run (metrics.json) is skipped and an interrupted one continues from its last checkpoint
(every --save-steps steps), so the script can be stopped at any time and run again. Two cores: a second process
with --reverse takes the arms (phase 1) and the runs (phase 2) from the other end; each run is trained by the one
that claims it first (sweeps.claim); in phase 1 the other waits for it (the rate is chosen from every run), in
phase 2 it moves on to its next run (sweeps.busy).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import sweeps  # experiments/sweeps.py, beside this script

MODEL = "minilm-l6"
COMMON = ["--model", MODEL, "--lora-r", "8", "--lora-alpha", "16", "--weight-decay", "0.1", "--train-pooler",
          "--warmup", "0.06", "--eval-batch-size", "64", "--logging-steps", "20", "--save-total-limit", "1",
          "--no-progress"]
TASKS = {  # name -> the task, its sizes and its training settings
    "sst2": {"task": "glue/sst2", "train": 10000, "validation": 2000, "epochs": 3, "batch": 32, "length": 64},
    "pydoc": {"task": "pydoc/topics", "train": None, "validation": 235, "epochs": 10, "batch": 16, "length": 128},
}
MOLEX = ["--method", "molex", "--granularity", "sequence"]
ARMS = {
    "lora": ["--method", "lora"],
    "molex-ours": [*MOLEX, "--gate-grad", "straight_through", "--learn-alpha", "--alpha", "0.5"],
    "molex-published": [*MOLEX, "--gate-grad", "balance", "--balance-weight", "0.01", "--no-learn-alpha",
                        "--alpha", "0.5", "--router-lr", "0.1", "--router-weight-decay", "0.1"],
    "molex-frozen": [*MOLEX, "--gate-grad", "frozen", "--no-learn-alpha", "--alpha", "0.5"],
    "molex-public": ["--method", "molex", "--granularity", "batch", "--gate", "cosine", "--shared-gate",
                     "--gate-dim", "128", "--gate-temperature", "0.5", "--gate-norm", "sequence",
                     "--gate-grad", "balance", "--balance-weight", "0.01", "--no-learn-alpha", "--alpha", "0.5",
                     "--router-lr", "0.1", "--router-weight-decay", "0.1"],
    "molex-pair": [*MOLEX, "--gate", "pair", "--pairs", "next", "--no-learn-alpha", "--alpha", "0.5"],
}
LRS = ["5e-4", "1e-3", "2e-3"]
CARVED = "carved/"  # task names of this experiment: the base task's rows, from this experiment's split files
SPLIT_SEED = 1234


def main() -> None:
    if sys.argv[1:2] in (["train"], ["eval"], ["plot"]):  # in its own process: `depthmix ...` knowing the carved tasks
        register_carved()
        from depthmix.cli.main import main as cli
        sys.exit(cli(sys.argv[1:]))
    args = parse_args()
    if args.table:
        print(tables(Path(args.results)))
        return
    out = Path(args.out)
    for name in args.tasks:
        folders = prepare(args, name, out / "data" / name)
        if not args.summary_only:
            best = sweep(args, name, out / name, folders)
            kept = final_record(args, name, folders, best)
            for seed, arm in sweeps.ordered(args, [(seed, arm) for seed in args.seeds for arm in args.arms]):
                folder = out / name / "final" / f"{arm}-s{seed}"
                trained = out / name / "sweep" / f"{arm}-lr{best[arm]}"
                if folder.name in kept or sweeps.busy(folder):  # recorded by an earlier session, or the other lane's
                    continue
                if (seed == sweeps.PHASE1_SEED and not any(folder.glob("checkpoint-*"))
                        and (trained / "metrics.json").exists()):
                    rescore(name, folder, trained, folders["final"])
                else:
                    run(args, name, folder, seed, [*ARMS[arm], "--lr", best[arm]], folders["final"])
                summarize(args, name, out / name, folders)  # progress as data, after every run (the record)
        summarize(args, name, out / name, folders)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with glue/SST-2 (default: $DEPTHMIX_DATA)")
    p.add_argument("--out", default="runs/molex_sst2")
    p.add_argument("--results", default="docs/results")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--lrs", nargs="+", default=LRS, help="phase 1: LoRA learning rates tried per arm")
    p.add_argument("--train-size", type=int, help="training rows (default: SST-2 10,000; pydoc/topics all)")
    p.add_argument("--validation-size", type=int, help="rows carved from train (default: SST-2 2,000; pydoc 235)")
    p.add_argument("--eval-size", type=int, help="dev rows scored (default: all)")
    p.add_argument("--epochs", type=float, help="default: SST-2 3, pydoc/topics 10")
    p.add_argument("--save-steps", type=int, default=200, help="checkpoint interval (where a stopped run resumes)")
    p.add_argument("--reverse", action="store_true",
                   help="take the arms and the phase-2 runs from the other end: a second process beside a running "
                        "one (on another core), each run trained by whichever claims it first")
    p.add_argument("--summary-only", action="store_true", help="only write the results from finished runs")
    p.add_argument("--table", action="store_true", help="print the Markdown of the results files and stop")
    args = p.parse_args()
    if "lora" not in args.arms:
        p.error("--arms: the baseline arm 'lora' is needed for the paired differences")
    return args


# -- data -------------------------------------------------------------------------------------------------------
def prepare(args, name: str, root: Path) -> dict:
    """Two data folders, each with train.json and eval.json: "validation" (phase 1: train rows / the rows carved
    from train) and "final" (phase 2: the same train rows / dev). Written once; later calls reuse them."""
    folders = {"validation": root / "validation", "final": root / "final"}
    if (folders["final"] / "eval.json").exists():
        return folders
    from depthmix.data.tasks import get_task
    spec = TASKS[name]
    task = get_task(spec["task"])
    rows = task.load("train", args.data_dir).to_dict()
    order = list(range(len(rows["label"])))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = args.validation_size or spec["validation"]
    n_train = args.train_size or spec["train"] or len(order) - n_val
    if n_val + n_train > len(order):
        raise SystemExit(f"{name}: {n_val} validation + {n_train} training rows, but the training set has {len(order)}")
    val, train = order[:n_val], order[n_val:n_val + n_train]
    dev = task.load("eval", args.data_dir, args.eval_size, 0).to_dict()
    for folder, evaluation in ((folders["validation"], pick(rows, val)), (folders["final"], dev)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.json").write_text(json.dumps(pick(rows, train)))
        (folder / "eval.json").write_text(json.dumps(evaluation))  # last: its presence marks the folder complete
    return folders


def pick(rows: dict, idx: list[int]) -> dict:
    return {k: [v[i] for i in idx] for k, v in rows.items()}


class Carved:
    """A task whose rows come from train.json / eval.json in --data-dir; everything else is the base task's."""

    def __init__(self, base):
        self.base = base
        self.name = CARVED + base.name

    def __getattr__(self, name):
        return getattr(self.base, name)

    def load(self, split, data_dir=None, max_samples=None, seed=0):
        import datasets

        from depthmix.data.tasks import subsample
        rows = json.loads((Path(data_dir) / f"{split}.json").read_text())
        return subsample(datasets.Dataset.from_dict(rows), max_samples, seed)


def register_carved() -> None:
    from depthmix.data.tasks import get_task, register
    for spec in TASKS.values():
        register(Carved(get_task(spec["task"])))


# -- runs -------------------------------------------------------------------------------------------------------
def run(args, name: str, folder: Path, seed: int, flags: list[str], data: Path) -> dict:
    metrics = folder / "metrics.json"
    with sweeps.claim(folder):
        if metrics.exists():
            return json.loads(metrics.read_text())
        spec = TASKS[name]
        if (folder / "depthmix_config.json").exists():  # trained, but stopped before its evaluation was written
            shutil.rmtree(folder)
        resume = ["--resume"] if any(folder.glob("checkpoint-*")) else []
        cmd = [sys.executable, __file__, "train", *COMMON, "--task", CARVED + spec["task"], "--data-dir", str(data),
               "--epochs", str(args.epochs or spec["epochs"]), "--batch-size", str(spec["batch"]),
               "--max-length", str(spec["length"]), "--save-steps", str(args.save_steps), "--seed", str(seed),
               "--output-dir", str(folder), *flags, *resume]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(metrics.read_text())


def rescore(name: str, folder: Path, trained: Path, data: Path) -> dict:
    """Phase 2's seed-0 run: phase 1's run at the chosen rate, scored on dev (sweeps.REUSED)."""
    with sweeps.claim(folder):
        if not (folder / "metrics.json").exists():
            flags = ["--task", CARVED + TASKS[name]["task"], "--data-dir", str(data), "--batch-size", "64",
                     "--max-length", str(TASKS[name]["length"])]
            sweeps.rescore([sys.executable, __file__], trained, folder, flags, "eval-dev.json")
        return json.loads((folder / "metrics.json").read_text())


def sweep(args, name: str, out: Path, folders: dict) -> dict:
    """Phase 1, seed 0: each arm's learning rate, by accuracy on the rows carved from train (ties: the smaller)."""
    file = out / "sweep.json"
    done = json.loads(file.read_text()) if file.exists() else {"best_lr": {}, "validation_accuracy": {}}
    best, scores = done["best_lr"], done["validation_accuracy"]  # other arms' choices stay (runs of --arms subsets)
    kept = sweep_record(args, name, folders)
    for arm in sweeps.ordered(args, args.arms):
        def score(lr, arm=arm):
            folder = out / "sweep" / f"{arm}-lr{lr}"
            if folder.name in kept and not (folder / "metrics.json").exists():
                return kept[folder.name]["value"]
            value = accuracy(run(args, name, folder, sweeps.PHASE1_SEED, [*ARMS[arm], "--lr", lr],
                                 folders["validation"]))
            write_sweep(args, name, out, folders)  # progress as data, after every run
            return value
        best[arm], scores[arm] = sweeps.tune(score, args.lrs, higher_is_better=True)
    from depthmix.io import write_json
    write_json(file, {"best_lr": best, "validation_accuracy": scores})
    print(f"{name} phase 1: {json.dumps({arm: best[arm] for arm in args.arms})}", flush=True)
    return best


def accuracy(metrics: dict) -> float:
    return metrics["metrics"]["accuracy"]


# -- results ----------------------------------------------------------------------------------------------------
def sweep_record(args, name: str, folders: dict) -> dict[str, dict]:
    """The phase-1 runs docs/results/molex-<task>-sweep.json records with this process's data and, for each run,
    its arm's flags as they are now (sweeps.recorded; a file without "settings" was written at the defaults)."""
    settings = run_settings(args, name, folders)
    defaults = args.train_size is args.validation_size is args.epochs is None
    file = Path(args.results) / f"molex-{name}-sweep.json"
    kept = sweeps.recorded(file, lambda rec: rec["settings"] == settings if "settings" in rec else defaults)
    return current_arms(kept, json.loads(file.read_text())["arms"] if kept else {})


def current_arms(kept: dict[str, dict], recorded: dict) -> dict[str, dict]:
    """The recorded runs whose arm was run with the flags it has now: an arm whose flags changed since is run
    again, the others' runs stay."""
    return {n: r for n, r in kept.items() if recorded.get(r["arm"]) == ARMS.get(r["arm"])}


def final_record(args, name: str, folders: dict, best: dict) -> dict[str, dict]:
    """The phase-2 runs docs/results/molex-<task>.json records with this process's flags, data and rates."""
    def same(rec):
        s = rec["setup"]
        return (s["common_flags"] == COMMON and s["epochs"] == (args.epochs or TASKS[name]["epochs"])
                and s["rows"] == rows(folders)
                and all(best.get(arm) == lr for arm, lr in s["phase1"]["best_lr"].items() if arm in ARMS))
    file = Path(args.results) / f"molex-{name}.json"
    kept = sweeps.recorded(file, same)
    return current_arms(kept, json.loads(file.read_text())["setup"]["arms"] if kept else {})


def run_settings(args, name: str, folders: dict) -> dict:
    """What a phase-1 run's result depends on beside its flags: the epochs and the rows it trains and validates on."""
    sizes = rows(folders)
    return {"epochs": args.epochs or TASKS[name]["epochs"], "train": sizes["train"], "validation": sizes["validation"]}


def rows(folders: dict) -> dict:
    return {split: len(json.loads((folders[part] / f"{kind}.json").read_text())["label"])
            for split, part, kind in (("train", "final", "train"), ("validation", "validation", "eval"),
                                      ("dev", "final", "eval"))}


def write_sweep(args, name: str, out: Path, folders: dict) -> None:
    """docs/results/molex-<task>-sweep.json: every finished phase-1 run (seed 0, validation accuracy), so far, and
    those an earlier session recorded there."""
    runs = []
    for file in sorted((out / "sweep").glob("*-lr*/metrics.json")):
        arm, lr = file.parent.name.rsplit("-lr", 1)
        m = json.loads(file.read_text())
        runs.append({"run": file.parent.name, "arm": arm, "lr": lr, "seed": 0, "value": accuracy(m),
                     "train_seconds": m["train_seconds"], "train_steps": m["train_steps"]})
        if "--gate-grad" in ARMS.get(arm, []):  # an arm with a gate (each says how it learns) chose its experts
            runs[-1]["choice"] = choices(name, file.parent, folders["validation"])
    runs = sweeps.merged(runs, sweep_record(args, name, folders))
    sweeps.publish(Path(args.results) / f"molex-{name}-sweep.json", {
        "experiment": f"molex-{name}-sweep", "task": TASKS[name]["task"], "metric": "accuracy",
        "higher_is_better": True, "split": "validation rows carved from train", "runs": runs,
        "settings": run_settings(args, name, folders),
        "planned": len(ARMS) * len(args.lrs), "lrs": args.lrs, "arms": ARMS,
        "edge_extension": sweeps.RULE})


def choices(name: str, folder: Path, data: Path) -> dict:
    """How a MoLEx run's gates chose on the validation rows (`depthmix plot routing`, drawn beside the run): per
    mixed layer, the share of the choices that went to its most chosen layer, and to t + 1 (molex-pair's fixed
    choice); near 1 both, and the gate is a fixed pairing."""
    record = folder / "routing.json"
    if not record.exists():
        subprocess.run([sys.executable, __file__, "plot", "routing", str(folder), "--task",
                        CARVED + TASKS[name]["task"], "--data-dir", str(data), "--max-samples", "500",
                        "--output", str(folder / "routing.png")], check=True)
    rec = json.loads(record.read_text())
    top, nxt = [], []
    for t, row in zip(rec["layers"], rec["counts"]):
        total = max(sum(row), 1)
        top.append(max(row) / total)
        nxt.append(row[t + 1 if t + 1 < len(row) else t - 1] / total)
    return {"top_share": round(sum(top) / len(top), 4), "next_share": round(sum(nxt) / len(nxt), 4),
            "most_chosen": [row.index(max(row)) for row in rec["counts"]], "rows": sum(rec["counts"][0])}


def tables(results: Path) -> str:
    parts = []
    for name in TASKS:
        file = results / f"molex-{name}-sweep.json"
        if file.exists():
            rec = json.loads(file.read_text())
            parts.append(sweeps.phase1_table(rec, f"{rec['task']}, phase 1", rec["split"], {
                "arm": lambda r: r["arm"], "lr": lambda r: r["lr"],
                "validation accuracy": lambda r: f"{r['value']:.4f}",
                "gate: most chosen layer's share (t + 1's)": lambda r: (
                    f"{r['choice']['top_share']:.2f} ({r['choice']['next_share']:.2f})" if "choice" in r else "")}))
        file = results / f"molex-{name}.json"
        if file.exists():
            parts.append(sweeps.report(json.loads(file.read_text()), " on dev", picture=True))
    return "\n\n".join(parts) if parts else "no results yet"


def summarize(args, name: str, out: Path, folders: dict) -> None:
    from depthmix.evaluation.compare import compare
    if (out / "sweep").exists():
        write_sweep(args, name, out, folders)
    sweep_file = out / "sweep.json"
    if not sweep_file.exists():
        print(f"{name}: phase 1 not finished, nothing to summarise")
        return
    runs = []
    for file in sorted((out / "final").glob("*-s*/metrics.json")):
        arm, seed = file.parent.name.rsplit("-s", 1)
        m = json.loads(file.read_text())
        runs.append({"arm": arm, "seed": int(seed), "value": accuracy(m), "train_seconds": m["train_seconds"],
                     "train_steps": m["train_steps"], "train_loss": m["train_loss"],
                     "trainable_params": m["trainable_params"], "method_state": m["method_state"]})
    runs = sweeps.merged(runs, final_record(args, name, folders, json.loads(sweep_file.read_text())["best_lr"]))
    if not runs:
        print(f"{name}: no phase 2 run finished yet")
        return
    # does the published gate learn anything its random start had not? (the frozen control exists for this)
    result = compare(f"molex-{name}", TASKS[name]["task"], "accuracy", True, "lora", runs,
                     setup(args, name, folders, json.loads(sweep_file.read_text()), runs),
                     controls=(("molex-published", "molex-frozen"), ("molex-public", "molex-pair")))
    sweeps.write(result, Path(args.results))
    print(sweeps.report(result, " on dev"))


def setup(args, name: str, folders: dict, sweep_result: dict, runs: list[dict]) -> dict:
    spec = TASKS[name]
    sizes = rows(folders)
    means = {arm: sum(r["value"] for r in runs if r["arm"] == arm) / sum(r["arm"] == arm for r in runs)
             for arm in {r["arm"] for r in runs}}
    return {
        "model": MODEL, "common_flags": COMMON, "arms": {arm: ARMS[arm] for arm in sorted(means)},
        "epochs": args.epochs or spec["epochs"], "batch_size": spec["batch"], "max_length": spec["length"],
        "rows": sizes,
        "split": f"the task's training set shuffled with seed {SPLIT_SEED}: the first {sizes['validation']} rows "
                 "validate (phase 1), the next ones train; dev scores phase 2 only",
        "phase1": {"seed": sweeps.PHASE1_SEED, "lrs": args.lrs, **sweep_result}, "phase2_seed0": sweeps.REUSED,
        "seeds": args.seeds,
        # one run's accuracy on dev is a binomial proportion: its s.e. bounds what one seed can resolve
        "binomial_se_per_run": {arm: math.sqrt(m * (1 - m) / sizes["dev"]) for arm, m in sorted(means.items())},
    }


if __name__ == "__main__":
    main()
