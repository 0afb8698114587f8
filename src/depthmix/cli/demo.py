"""depthmix demo: a short tour of the three methods on the embedded models and text, no Hub needed.

MoD on SmolLM2-135M: held-out NLL, FLOPs and decoding speed against the dense model and against dropping blocks.
MoLEx on MiniLM-L6 (pydoc/topics): what its gate chose, as a picture. MoDE on SmolLM2-135M (lm/pydoc): its mixing
weights, as a picture. --compare runs the longer job instead: LoRA against MoLEx + LoRA, side by side.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..flags import at_least

DESCRIPTION = __doc__ + """
Everything runs on the CPU in about two to three minutes (2 cores). The MoD model here has routers tuned for a few
steps only, so it shows what MoD does to speed and quality, not what a tuned retrofit reaches: for that, train one
(`depthmix train --method mod --update gated ...`) and pass it with --mod-adapter."""

def register(sub) -> None:
    p = sub.add_parser("demo", help="a short tour of MoD, MoLEx and MoDE on embedded models (no download)",
                       description=DESCRIPTION)
    p.add_argument("--output-dir", default="out/demo", help="folder of the runs and pictures (started afresh)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run")
    p.add_argument("--mod-adapter", help="a trained MoD adapter of smollm2-135m to show instead of the briefly "
                   "tuned one")
    p.add_argument("--tune-steps", type=at_least(0), default=6, help="MoD router-tuning steps (batch 2 x 128)")
    p.add_argument("--new-tokens", type=at_least(2), default=32, help="MoD: tokens each timed generate decodes")
    p.add_argument("--repeats", type=at_least(1), default=3, help="MoD: timing rounds (dense, drop and MoD in turn)")
    p.add_argument("--train-steps", type=at_least(1), default=12, help="MoLEx and MoDE training steps (batch 16 x "
                   "64 and 2 x 128)")
    p.add_argument("--compare", action="store_true", help="instead of the tour: LoRA against MoLEx + LoRA on "
                   "pydoc/topics, trained for --epochs each (several minutes)")
    p.add_argument("--model", default="minilm-l6", help="--compare: base model (an embedded name, a folder or a "
                   "Hub id)")
    p.add_argument("--epochs", type=float, default=2.0, help="--compare: training epochs of each run")
    p.add_argument("--max-train-samples", type=int, help="--compare: train on a random subset (default: all)")
    p.add_argument("--max-eval-samples", type=int, help="--compare: evaluate on a random subset (default: all)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from ..bench import TOURS
    from ..bench.tour import START
    from ..io import write_json
    out = Path(args.output_dir)
    START[0] = time.perf_counter()
    if args.compare:
        return compare(args, out)
    out.mkdir(parents=True, exist_ok=True)
    results = {name: module.tour(args, out) for name, module in TOURS.items()}
    write_json(out / "demo.json", results)
    for name, module in TOURS.items():
        print(f"\n{module.summary(results[name])}")
    print(f"\nevery number: {out / 'demo.json'}")
    return 0


def compare(args, out: Path) -> int:
    """The longer job: LoRA and MoLEx + LoRA on pydoc/topics, their accuracies side by side, losses and routing."""
    from ..data.tasks import get_task
    from ..evaluation import routing
    from ..plots import loss_curve
    from ..train import TrainOptions, load_trained, train
    from ..tuners import DEMO, METHODS

    summaries, histories = {}, {}
    # a loss every 5 steps, but at least 4 points on a short run (one per step when it has fewer than 8)
    steps = -(-len(get_task("pydoc/topics").load("train", max_samples=args.max_train_samples)) // 16) * args.epochs
    logging_steps = max(1, min(5, int(steps) // 4))
    for method in ("lora", DEMO):
        run = out / method
        if run.exists():
            shutil.rmtree(run)
        opts = TrainOptions(method=method, model=args.model, task="pydoc/topics", output_dir=str(run),
                            epochs=args.epochs, batch_size=16, lr=1e-3, max_length=64, seed=args.seed,
                            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                            save_steps=10_000, logging_steps=logging_steps)
        print(f"\n== {method}: {args.model} on pydoc/topics", flush=True)
        summaries[method] = train(opts)
        histories[method] = json.loads((run / "log_history.json").read_text())["log_history"]

    pictures = [loss_curve([], out / "loss.png", title="pydoc/topics training loss", curves=histories)]
    task = get_task("pydoc/topics")
    model, tok, _ = load_trained(str(out / DEMO), None, task.head, task.num_labels)
    summary = routing.record(model, tok, task, task.load("eval", max_samples=args.max_eval_samples))
    pictures.append(routing.draw(model, summary, out / "routing.png",
                                 title=f"{model.method.routing_title}, pydoc/topics"))

    print("\n" + "method".ljust(14) + "accuracy  trainable params  train s")
    for method, s in summaries.items():
        name = "LoRA" if method == "lora" else f"{METHODS[DEMO][1].__name__} + LoRA"
        print(f"{name:<14}{s['metrics']['accuracy']:.4f}    {s['trainable_params']:>12,d}  {s['train_seconds']:>7.1f}")
    print(f"\npictures: {', '.join(str(p) for p in pictures if p is not None)}")
    return 0
