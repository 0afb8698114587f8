"""MoDE + LoRA vs LoRA, and MoDE alone vs LoRA, on smollm2-135m: arithmetic (LLM-Adapters' math_train ->
SingleEq, generation + answer extraction), BoolQ and ARC-Easy (log-likelihood multiple choice). Same data, steps
and batch for every method; several seeds; a CPU-sized budget (see SETTINGS).

    OMP_NUM_THREADS=1 python experiments/mode_smollm2.py --data-dir ../shared/data --out runs/mode_smollm2

Resumable: finished runs (metrics.json present) are skipped. Writes summary.json, summary.md (tables), the
routing weights per layer (routing-<task>.png) and loss curves (loss-<task>.png) into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODEL = "smollm2-135m"
COMMON = ["--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--lora-r", "8", "--lora-alpha", "16",
          "--eval-batch-size", "32", "--logging-steps", "5", "--save-steps", "100000", "--no-progress"]
SETTINGS = {  # task: (training / evaluation flags, headline metric)
    "singleeq": (["--max-train-samples", "160", "--max-length", "160", "--max-eval-samples", "100",
                  "--eval-max-new-tokens", "96"], "accuracy"),
    "boolq": (["--max-train-samples", "160", "--max-length", "96", "--max-eval-samples", "200"], "accuracy"),
    "arc-easy": (["--max-train-samples", "160", "--max-length", "160", "--max-eval-samples", "120"], "accuracy"),
}
METHODS = {  # MoDE alone trains only norms + router (~2.9k parameters): a higher learning rate for them
    "lora": ["--method", "lora"],
    "mode+lora": ["--method", "mode"],
    "mode": ["--method", "mode", "--no-lora", "--router-lr", "1e-2"],
    "mode+lora-kl0.1": ["--method", "mode", "--distill-weight", "0.1"],  # ablation, run with --methods
}
DEFAULT_METHODS = ["lora", "mode+lora", "mode"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", default="runs/mode_smollm2")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--nll", action="store_true", help="also score every finished run's held-out gold responses")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    if not args.summary_only:
        for task in args.tasks:
            zero_shot(task, args.data_dir, out / f"{task}-base")
        for seed in args.seeds:
            for task in args.tasks:
                for method in args.methods:
                    run = out / f"{task}-{method}-s{seed}"
                    if (run / "metrics.json").exists():
                        continue
                    cmd = ["depthmix", "train", "--model", MODEL, "--task", task, "--data-dir", args.data_dir,
                           "--output-dir", str(run), "--seed", str(seed), *COMMON, *SETTINGS[task][0],
                           *METHODS[method]]
                    print(" ".join(cmd), flush=True)
                    subprocess.run(cmd, check=True)
    if args.nll:
        for run in sorted(out.glob("*/metrics.json")):
            gold_nll(run.parent, args.data_dir)
    summarize(out, args.tasks)


def setting(task_name: str, flag: str) -> int | None:
    """The integer value of one of a task's SETTINGS flags (None where the task does not set it)."""
    flags = SETTINGS[task_name][0]
    return int(flags[flags.index(flag) + 1]) if flag in flags else None


def zero_shot(task_name: str, data_dir: str, run: Path) -> None:
    """The base model, untrained, on the same evaluation rows."""
    if (run / "metrics.json").exists():
        return
    import time

    from depthmix.data.tasks import get_task
    from depthmix.evaluation import evaluate
    from depthmix.io import write_json
    from depthmix.models import load_model, load_tokenizer
    task = get_task(task_name)
    rows = task.load("eval", data_dir, setting(task_name, "--max-eval-samples"), 0)
    new_tokens = setting(task_name, "--eval-max-new-tokens")
    extra = {"max_new_tokens": new_tokens} if new_tokens else {}
    start = time.time()
    metrics = evaluate(task, load_model(MODEL), load_tokenizer(MODEL), rows, batch_size=32,
                       max_length=setting(task_name, "--max-length"), progress=False, **extra)
    write_json(run / "metrics.json", {"task": task_name, "method": "base", "seed": 0, "metrics": metrics,
                                      "trainable_params": 0, "train_seconds": 0.0,
                                      "eval_seconds": round(time.time() - start, 1)})
    print(f"zero-shot {task_name}: {metrics}", flush=True)


def gold_nll(run: Path, data_dir: str) -> None:
    """Mean negative log-likelihood per token of the evaluation rows' gold responses (teacher forced, prompt
    masked): a continuous measure of what a short run learned, steadier than accuracy on a few hundred rows."""
    if (run / "nll.json").exists():
        return
    import time

    from depthmix.data.tasks import get_task
    from depthmix.evaluation import response_nll
    from depthmix.io import read_json, write_json
    from depthmix.models import load_model, load_tokenizer
    from depthmix.train import load_trained
    task_name = read_json(run / "metrics.json")["task"]
    task = get_task(task_name)
    if (run / "depthmix_config.json").exists():
        model, tokenizer, _ = load_trained(str(run))
    else:
        model, tokenizer = load_model(MODEL), load_tokenizer(MODEL)
    rows = task.load("eval", data_dir, setting(task_name, "--max-eval-samples"), 0)
    start = time.time()
    result = response_nll(task, model, tokenizer, rows, setting(task_name, "--max-length"))
    write_json(run / "nll.json", {**result, "seconds": round(time.time() - start, 1)})
    print(f"{run.name}: gold NLL {result['gold_nll']:.4f}", flush=True)


def _stats(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(out: Path, tasks) -> dict:
    from depthmix.plots import layer_weights, loss_curve
    summary = {}
    lines = ["| task | method | trainable params | accuracy, mean ± std | per seed | gold NLL, mean ± std | "
             "train s / run |", "| --- | --- | ---: | --- | --- | --- | ---: |"]
    for task in tasks:
        metric = SETTINGS[task][1]
        routing, curves = {}, {}
        for method in ["base", *METHODS]:
            files = sorted(out.glob(f"{task}-{method}-s*/metrics.json")) if method != "base" else \
                sorted(out.glob(f"{task}-base/metrics.json"))
            if not files:
                continue
            ms = [json.loads(f.read_text()) for f in files]
            vals = [m["metrics"][metric] for m in ms]
            mean, std = _stats(vals)
            nll_files = [f.parent / "nll.json" for f in files]
            nll = [json.loads(f.read_text())["gold_nll"] for f in nll_files if f.exists()]
            entry = {"metric": metric, "seeds": [m["seed"] for m in ms], "values": vals, "mean": mean, "std": std,
                     "trainable_params": ms[0]["trainable_params"],
                     "train_seconds": statistics.mean(m["train_seconds"] for m in ms),
                     "all_metrics": [m["metrics"] for m in ms], "gold_nll": nll}
            states = [m.get("method_state") or {} for m in ms]
            layers = sorted(int(k.split("/")[1]) for k in states[0] if k.startswith("weight/"))
            if layers:
                per_seed = [[s[f"weight/{t}"] for t in layers] for s in states]
                entry["routing_layers"] = layers
                entry["routing_weights"] = per_seed
                cols = list(zip(*per_seed))
                routing[method] = ([statistics.mean(c) for c in cols],
                                   [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols])
            if method != "base":
                hist = files[0].parent / "log_history.json"
                if hist.exists():
                    curves[method] = json.loads(hist.read_text())["log_history"]
            summary[f"{task}/{method}"] = entry
            seeds = ", ".join(f"{v:.3f}" for v in vals)
            nll_text = "{:.3f} ± {:.3f}".format(*_stats(nll)) if nll else "-"
            lines.append(f"| {task} | {method} | {entry['trainable_params']:,d} | {mean:.3f} ± {std:.3f} | "
                         f"{seeds} | {nll_text} | {entry['train_seconds']:.0f} |")
        if routing:
            layer_weights(routing, layers, out / f"routing-{task}.png",
                          title=f"MoDE routing weights, {task} (± std over seeds)")
        if curves:
            loss_curve([], out / f"loss-{task}.png", title=f"{task}: training loss (seed {ms[0]['seed']})",
                       curves=curves)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    sys.exit(main())
