"""depthmix demo: the main job on embedded defaults, no Hub needed.

Fine-tunes the embedded MiniLM-L6 with LoRA and with MoLEx + LoRA on a task built from the Python reference that
ships with CPython (pydoc_data), prints both results side by side, and draws the loss curves and MoLEx routing.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="LoRA vs MoLEx + LoRA on an embedded model and data (no download)")
    p.add_argument("--model", default="minilm-l6", help="base model (an embedded name, a folder or a Hub id)")
    p.add_argument("--output-dir", default="out/demo", help="folder of both runs and the pictures (started afresh)")
    p.add_argument("--epochs", type=float, default=2.0, help="training epochs of each run")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs")
    p.add_argument("--max-train-samples", type=int, help="train on a random subset (default: all)")
    p.add_argument("--max-eval-samples", type=int, help="evaluate on a random subset (default: all)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from ..tuners import DEMO, METHODS
    from ..data.tasks import get_task
    from ..evaluation import routing
    from ..plots import loss_curve
    from ..train import TrainOptions, train

    out = Path(args.output_dir)
    summaries, histories = {}, {}
    # a loss every 5 steps, but at least 4 points on a short run (one per step when it has fewer than 8)
    steps = -(-len(get_task("pydoc/topics").load("train", max_samples=args.max_train_samples)) // 16) * args.epochs
    logging_steps = max(1, min(5, int(steps) // 4))
    for method in ("lora", DEMO):
        run = out / method
        if run.exists():  # the demo owns this folder: start it afresh (also after a demo that was killed)
            shutil.rmtree(run)
        opts = TrainOptions(method=method, model=args.model, task="pydoc/topics", output_dir=str(run),
                            epochs=args.epochs, batch_size=16, lr=1e-3, max_length=64, seed=args.seed,
                            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                            save_steps=10_000, logging_steps=logging_steps)
        print(f"\n== {method}: {args.model} on pydoc/topics ==", flush=True)
        summaries[method] = train(opts)
        import json
        histories[method] = json.loads((run / "log_history.json").read_text())["log_history"]

    pictures = [loss_curve([], out / "loss.png", title="pydoc/topics training loss", curves=histories)]
    from ..train import load_trained
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
