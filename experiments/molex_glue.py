"""MoLEx + LoRA vs LoRA on minilm-l6, GLUE SST-2 and RTE, several seeds, same budget.

    python experiments/molex_glue.py --data-dir ../shared/data --out runs/molex_glue

Resumable: finished runs (metrics.json present) are skipped. Writes summary.json, a table and heat maps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = {  # same budget for both methods; LoRA r=8, alpha=16 on query/value as in the public MoLEx code
    "glue/sst2": ["--max-train-samples", "2000", "--epochs", "2", "--batch-size", "32", "--max-length", "64",
                  "--lr", "1e-3"],
    "glue/rte": ["--epochs", "3", "--batch-size", "16", "--max-length", "128", "--lr", "1e-3"],
}
METHODS = {"lora": ["--method", "lora"], "molex": ["--method", "molex", "--granularity", "sequence"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", default="runs/molex_glue")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=list(SETTINGS))
    args = p.parse_args()
    out = Path(args.out)
    for seed in args.seeds:
        for task in args.tasks:
            for method, flags in METHODS.items():
                run = out / f"{task.split('/')[1]}-{method}-s{seed}"
                if (run / "metrics.json").exists() or not claim(run):
                    continue
                cmd = ["depthmix", "train", "--model", "minilm-l6", "--task", task, "--data-dir", args.data_dir,
                       "--output-dir", str(run), "--seed", str(seed), "--save-steps", "100000", "--no-progress",
                       *SETTINGS[task], *flags]
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
                if method == "molex":
                    subprocess.run(["depthmix", "plot", "routing", str(run), "--data-dir", args.data_dir],
                                   check=True)
    summarize(out, args.tasks)


def claim(run: Path) -> bool:
    """Several copies of this script may run at once (different cores): each run goes to the first to claim it."""
    run.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(run.parent / f".{run.name}.claimed", os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def summarize(out: Path, tasks) -> None:
    rows = {}
    for task in tasks:
        for method in METHODS:
            runs = sorted(out.glob(f"{task.split('/')[1]}-{method}-s*/metrics.json"))
            if not runs:
                continue
            ms = [json.loads(r.read_text()) for r in runs]
            key = ms[0]["metrics"] and next(iter(ms[0]["metrics"]))
            vals = [m["metrics"][key] for m in ms]
            rows[f"{task} {method}"] = {
                "metric": key, "seeds": [m["seed"] for m in ms], "values": vals,
                "mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "train_seconds": statistics.mean(m["train_seconds"] for m in ms),
                "trainable_params": ms[0]["trainable_params"]}
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"{'task / method':<22}{'metric':<10}{'mean +- std':<18}{'seeds':<30}{'train s':>8}")
    for k, r in rows.items():
        vals = ", ".join(f"{v:.4f}" for v in r["values"])
        print(f"{k:<22}{r['metric']:<10}{r['mean']:.4f} +- {r['std']:.4f}  {vals:<30}{r['train_seconds']:>8.0f}")


if __name__ == "__main__":
    sys.exit(main())
