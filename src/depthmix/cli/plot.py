"""depthmix plot routing / loss."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw pictures of a trained adapter")
    kinds = p.add_subparsers(dest="kind", required=True)
    r = kinds.add_parser("routing", help="what the routers learned: MoLEx layer-choice heat map (how often layer j "
                                         "is chosen at layer t) or MoDE mean routing weight per ensembled layer")
    r.add_argument("adapter", help="folder written by `depthmix train`")
    r.add_argument("--task", help="task whose eval split is routed (default: the training task)")
    r.add_argument("--data-dir", help="local data folder (default: $DEPTHMIX_DATA, else the Hub)")
    r.add_argument("--max-samples", type=int, default=500, help="eval examples routed")
    r.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    r.add_argument("--output", help="PNG path (default: ADAPTER/routing-TASK.png)")
    r.set_defaults(func=run_routing)
    lo = kinds.add_parser("loss", help="training-loss curves of one or more runs")
    lo.add_argument("runs", nargs="+", help="output folders of `depthmix train`")
    lo.add_argument("--output", required=True, help="PNG path")
    lo.set_defaults(func=run_loss)


def route(model, tokenizer, task, rows, batch_size=32) -> None:
    """Run a task's evaluation rows through the model with the method's routing statistics recorded."""
    method = model.method
    method.reset_stats()
    was, method.recording = method.recording, True
    try:
        task.evaluate(model, tokenizer, rows, batch_size=batch_size, progress=False)
    finally:
        method.recording = was


def routing_counts(model, tokenizer, task, rows, batch_size=32):
    """The [mixed layers, layers] choice counts of a MoLEx model on a task's rows."""
    route(model, tokenizer, task, rows, batch_size)
    return model.method.counts.clone()


def run_routing(args) -> int:
    from ..data.tasks import get_task
    from ..io import read_json, write_json
    from ..model import CONFIG_NAME
    from ..plots import layer_weights, routing_heatmap
    from ..train import load_trained
    info = read_json(Path(args.adapter) / CONFIG_NAME).get("info", {})
    task = get_task(args.task or info.get("task") or "")
    model, tokenizer, _ = load_trained(args.adapter, None, task.head, task.num_labels)
    kind = model.method_config.method if model.method_config is not None else "lora"
    if kind not in ("molex", "mode"):
        raise ConfigError(f"{args.adapter}: routing pictures are drawn for MoLEx and MoDE adapters, not {kind}")
    rows = task.load("eval", args.data_dir, args.max_samples, 0)
    out = Path(args.output or Path(args.adapter) / f"routing-{task.name.replace('/', '_')}.png")
    method = model.method
    route(model, tokenizer, task, rows, args.batch_size)
    if kind == "molex":
        routing_heatmap(method.counts.numpy(), method.layers, out, title=f"MoLEx layer choice, {task.name}")
        record = {"counts": method.counts.tolist()}
    else:
        record = {"mean_weights": method.mean_weights(), "weight_std": method.weight_std(),
                  "tokens": method.weight_count}
        layer_weights({Path(args.adapter).name: (record["mean_weights"], record["weight_std"])}, method.layers, out,
                      title=f"MoDE routing weights, {task.name} (± std over tokens)")
    write_json(out.with_suffix(".json"), {"task": task.name, "method": kind, "layers": method.layers, **record})
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
    written = loss_curve([], args.output, curves=curves)  # None (and a message) when no loss was logged
    if written is not None:
        print(f"wrote {written}")
    return 0
