"""MoD vs dense from scratch at equal training FLOPs (isoFLOP), byte-level, tiny Llama models, on a CPU.

SUPERSEDED by experiments/mod_isoflop_sizes.py (issue 11): this study has one seed and two shapes per family,
3-12x larger than compute-optimal for its budgets (sqrt(C/120) is about 0.3M parameters at 1e13), so the cheapest
model per step won by construction. Kept to reproduce the first table of docs/results-mod.md.

    OMP_NUM_THREADS=1 nice -n 5 python experiments/mod_isoflop.py --data ../shared/data --out runs/mod_isoflop

Runs one after the other; finished runs (metrics.json present) are skipped. Writes summary.json and a Markdown
table (held-out loss with causal routing, FLOPs per forward pass) and a loss-curve picture per corpus.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from isoflop_curves import heldout_nll  # beside this script

CORPORA = {  # name: (train file, held-out file or None = last 10% of the train file)
    "tinyshakespeare": ("lm/tinyshakespeare.txt", None),
    "wikitext-2": ("lm/wikitext-2/valid.txt", "lm/wikitext-2/test.txt"),
}
MODELS = {  # name: flags; every MoD model routes every other block at capacity 12.5% (paper update)
    "dense-L4": ["--method", "dense", "--layers", "4"],
    "dense-L2": ["--method", "dense", "--layers", "2"],  # control: about MoD-L4's FLOPs per step, dense
    "mod-L4": ["--method", "mod", "--layers", "4", "--capacity", "0.125"],
    "mod-L8": ["--method", "mod", "--layers", "8", "--capacity", "0.125"],
}
COMMON = ["--arch", "llama", "--hidden", "192", "--seq-len", "256", "--batch-size", "8", "--lr", "2e-3",
          "--tokenizer", "bytes", "--eval-blocks", "128", "--no-progress", "--logging-steps", "10"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="runs/mod_isoflop")
    p.add_argument("--flops", default="1e13")  # the wikitext-2 runs reported used 6e12
    p.add_argument("--corpora", nargs="+", default=list(CORPORA))
    p.add_argument("--models", nargs="+", default=list(MODELS))
    args = p.parse_args()
    out = Path(args.out)
    for corpus in args.corpora:
        train, held = CORPORA[corpus]
        for name in args.models:
            run = out / corpus / name
            if (run / "metrics.json").exists():
                continue
            cmd = [sys.executable, "-m", "depthmix.cli.main", "pretrain", *COMMON, *MODELS[name],
                   "--corpus", str(Path(args.data) / train), "--flops", args.flops, "--output-dir", str(run)]
            if held:
                cmd += ["--eval-corpus", str(Path(args.data) / held)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    summarize(out, args.corpora, args.models)


def recount(run: Path, m: dict) -> dict:
    """Forward FLOPs on held-out text, for runs whose metrics counted them on random tokens (causal routing
    decides per token, so random tokens overstate what it processes on text)."""
    from transformers import AutoModelForCausalLM

    from depthmix.depthmix_model import DepthMixModel, apply
    from depthmix.train.pretrain import PretrainOptions, heldout_forward_flops, read_corpus, tokenizer_for
    opts = PretrainOptions(**m["options"])
    _, blocks = read_corpus(opts, tokenizer_for(opts.tokenizer))
    base = AutoModelForCausalLM.from_pretrained(run / "model")
    model = DepthMixModel.from_pretrained(base, run / "mod") if (run / "mod").exists() else apply(base)
    fwd = heldout_forward_flops(model, blocks[:8])
    m["forward_flops_heldout"] = fwd
    (run / "metrics.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return fwd


def summarize(out: Path, corpora, models) -> None:
    from depthmix.plots import loss_curve
    rows, summary = [], {}
    for corpus in corpora:
        curves = {}
        for name in models:
            path = out / corpus / name / "metrics.json"
            if not path.exists():
                continue
            m = json.loads(path.read_text())
            curves[name] = json.loads((out / corpus / name / "log_history.json").read_text())["log_history"]
            held = m["heldout"]
            causal = held.get("causal", held.get("dense"))
            topk = held.get("topk-lookahead", held.get("topk"))  # "topk": its name in older runs
            fwd = m.get("forward_flops_heldout") or recount(out / corpus / name, m)
            summary.setdefault(corpus, {})[name] = {
                "params": m["params"], "train_steps": m["train_steps"], "train_flops": m["train_flops"],
                "train_seconds": m["train_seconds"], "heldout_loss_causal": heldout_nll(causal),
                "heldout_loss_topk": heldout_nll(topk) if topk is not None else None,
                "forward_flops_causal": fwd.get("causal", fwd.get("dense")),
                "forward_flops_topk": fwd.get("topk-lookahead", fwd.get("topk")),
                "realized_capacity": causal.get("realized_capacity"),
                "predictor_accuracy": causal.get("predictor_accuracy"),
            }
        dense = summary.get(corpus, {}).get("dense-L4")
        for name, s in summary.get(corpus, {}).items():
            rel = s["forward_flops_causal"] / dense["forward_flops_causal"] if dense else float("nan")
            topk = "" if s["heldout_loss_topk"] is None else f"{s['heldout_loss_topk']:.4f}"
            rows.append(f"| {corpus} | {name} | {s['params']:,d} | {s['train_steps']} | {s['train_flops']:.2e} | "
                        f"{s['heldout_loss_causal']:.4f} | {topk} | {s['forward_flops_causal']:.3e} ({rel:.2f}x) | "
                        f"{s['realized_capacity'] if s['realized_capacity'] is not None else ''} | "
                        f"{s['predictor_accuracy'] if s['predictor_accuracy'] is not None else ''} | "
                        f"{s['train_seconds']:.0f} |")
        if curves:
            loss_curve([], out / f"loss-{corpus}.png", title=f"isoFLOP training loss, {corpus}", curves=curves)
    table = ["| corpus | model | params | steps | train FLOPs | held-out loss (causal) | held-out loss (top-k) | "
             "FLOPs / forward (causal, 256 tokens) | realized capacity | predictor acc. | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
