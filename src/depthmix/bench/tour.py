"""What `depthmix demo` shows of each method: a bench module's `tour(args, out) -> dict` (its numbers) and
`summary(result) -> str` (what is printed at the end). Here: what the tours share."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

START = [time.perf_counter()]


def step(text: str) -> None:
    """Announce a stage of the tour, with the seconds since it started."""
    print(f"\n== [{time.perf_counter() - START[0]:.0f} s] {text}", flush=True)


def routing_tour(method: str, model: str, task_name: str, args, out: Path, method_config: dict | None = None) -> dict:
    """Train `method` + LoRA for args.train_steps steps and draw what its routers chose on the task's evaluation
    rows (`<out>/<method>-routing.png`)."""
    from ..data.tasks import get_task
    from ..evaluation import routing
    from ..train import TrainOptions, load_trained, train

    run = out / method
    if run.exists():  # the demo owns this folder: start it afresh (also after a demo that was killed)
        shutil.rmtree(run)
    task = get_task(task_name)
    lm = task.head == "causal_lm"
    step(f"{method}: {model} + LoRA on {task_name}, {args.train_steps} steps")
    # a quick run: the routers' rate is raised so that they move within it
    opts = TrainOptions(method=method, model=model, task=task_name, output_dir=str(run), max_steps=args.train_steps,
                        batch_size=2 if lm else 16, lr=1e-3, router_lr=1e-2, max_length=128 if lm else 64,
                        seed=args.seed, max_eval_samples=8 if lm else 64, save_steps=10_000, logging_steps=6,
                        method_config=method_config or {})
    summary = train(opts)
    trained, tok, _ = load_trained(str(run), None, task.head, task.num_labels)
    record = routing.record(trained, tok, task, task.load("eval", max_samples=8 if lm else 64))
    picture = routing.draw(trained, record, out / f"{method}-routing.png",
                           title=f"{trained.method.routing_title}, {task_name}")
    return {"model": model, "task": task_name, "metrics": summary["metrics"], "picture": str(picture),
            "routing": {k: v for k, v in record.items() if k != "picture"}}


def routing_summary(result: dict) -> str:
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items() if isinstance(v, float))
    return f"{result['model']} + LoRA on {result['task']}: {metrics}; routing: {result['picture']}"
