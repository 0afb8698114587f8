"""depthmix plot routing / loss."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw pictures of a trained adapter")
    kinds = p.add_subparsers(dest="kind", required=True)
    r = kinds.add_parser("routing", help="MoLEx layer-choice heat map: how often layer j is chosen at layer t")
    r.add_argument("adapter")
    r.add_argument("--task", help="task whose eval split is routed (default: the training task)")
    r.add_argument("--data-dir")
    r.add_argument("--max-samples", type=int, default=500)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--output", help="PNG path (default: ADAPTER/routing-TASK.png)")
    r.set_defaults(func=run_routing)
    lo = kinds.add_parser("loss", help="training-loss curves of one or more runs")
    lo.add_argument("runs", nargs="+", help="output folders of `depthmix train`")
    lo.add_argument("--output", required=True)
    lo.set_defaults(func=run_loss)


def routing_counts(model, tokenizer, task, rows, batch_size=32):
    """Route a task's rows through a MoLEx model and return the [mixed layers, layers] choice counts."""
    method = model.method
    method.reset_stats()
    method.recording = True
    try:
        task.evaluate(model, tokenizer, rows, batch_size=batch_size, progress=False)
    finally:
        method.recording = False
    return method.counts.clone()


def run_routing(args) -> int:
    from ..data.tasks import get_task
    from ..io import read_json, write_json
    from ..model import CONFIG_NAME
    from ..plots import routing_heatmap
    from ..train import load_trained
    info = read_json(Path(args.adapter) / CONFIG_NAME).get("info", {})
    task = get_task(args.task or info.get("task") or "")
    model, tokenizer, _ = load_trained(args.adapter, None, task.head, task.num_labels)
    if model.method_config is None or model.method_config.method != "molex":
        raise ConfigError(f"{args.adapter}: routing heat maps are drawn for MoLEx adapters")
    rows = task.load("eval", args.data_dir, args.max_samples, 0)
    counts = routing_counts(model, tokenizer, task, rows, args.batch_size)
    out = Path(args.output or Path(args.adapter) / f"routing-{task.name.replace('/', '_')}.png")
    routing_heatmap(counts.numpy(), model.method.layers, out, title=f"MoLEx layer choice, {task.name}")
    write_json(out.with_suffix(".json"), {"task": task.name, "layers": model.method.layers,
                                          "counts": counts.tolist()})
    print(f"wrote {out}")
    return 0


def run_loss(args) -> int:
    from ..plots import loss_curve
    curves = {}
    for run in args.runs:
        path = Path(run) / "log_history.json"
        if not path.exists():
            raise ConfigError(f"{path}: not found (is {run} a `depthmix train` output folder?)")
        curves[Path(run).name] = json.loads(path.read_text())["log_history"]
    print(f"wrote {loss_curve([], args.output, curves=curves)}")
    return 0
