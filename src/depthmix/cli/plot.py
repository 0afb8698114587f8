"""depthmix plot routing / loss / compare."""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw pictures of a trained adapter")
    kinds = p.add_subparsers(dest="kind", required=True)
    r = kinds.add_parser("routing", help="what the routers learned: MoLEx layer-choice heat map (how often layer j "
                                         "is chosen at layer t) or MoDE mean routing weight per ensembled layer")
    r.add_argument("adapter", help="folder written by `depthmix train`")
    r.add_argument("--task", help="task whose eval split is routed (default: the training task)")
    r.add_argument("--data-dir", help="local data folder (default: the one the adapter was trained "
                   "with, recorded in its run_options.json; else $DEPTHMIX_DATA, else the Hub)")
    r.add_argument("--max-samples", type=int, default=500, help="eval examples routed")
    r.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    r.add_argument("--output", help="PNG path (default: ADAPTER/routing-TASK.png)")
    r.set_defaults(func=run_routing)
    lo = kinds.add_parser("loss", help="training-loss curves of one or more runs")
    lo.add_argument("runs", nargs="+", help="output folders of `depthmix train`")
    lo.add_argument("--output", required=True, help="PNG path")
    lo.set_defaults(func=run_loss)
    c = kinds.add_parser("compare", help="a comparison over paired seeds (a results JSON of depthmix.evaluation."
                                         "compare, e.g. docs/results/molex-sst2.json): every run by arm and seed, and "
                                         "each arm's paired difference from the baseline with its 95%% CI and the "
                                         "smallest difference the seeds could detect")
    c.add_argument("result", help="results JSON")
    c.add_argument("--output", help="PNG path (default: the JSON's path with .png)")
    c.set_defaults(func=run_compare)


def run_routing(args) -> int:
    from ..io import write_json
    from ..evaluation import routing
    from ..train import load_trained
    from .train import adapter_task, check_output, data_dir
    for name in ("max_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    check_output(args.output)
    task = adapter_task(args.adapter, args.task)
    rows = task.load("eval", data_dir(args.adapter, args.data_dir), args.max_samples, 0)  # before the model
    model, tokenizer, _ = load_trained(args.adapter, None, task.head, task.num_labels)
    out = Path(args.output or Path(args.adapter) / f"routing-{task.name.replace('/', '_')}.png")
    summary = routing.record(model, tokenizer, task, rows, args.batch_size)
    routing.draw(model, summary, out, f"{model.method.routing_title}, {task.name}", label=Path(args.adapter).name)
    write_json(out.with_suffix(".json"), {"task": task.name, **summary})
    print(f"wrote {out}")
    return 0


def run_loss(args) -> int:
    from ..io import read_json
    from ..plots import loss_curve
    curves = {}
    for run in args.runs:
        path = Path(run) / "log_history.json"
        if not path.exists():
            raise ConfigError(f"{path}: not found (is {run} a `depthmix train` output folder?)")
        history = read_json(path).get("log_history")
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise ConfigError(f"{path}: expected {{\"log_history\": [{{...}}, ...]}} (a Trainer's log history)")
        curves[Path(run).name] = history
    written = loss_curve([], args.output, curves=curves)  # None (and a message) when no loss was logged
    if written is not None:
        print(f"wrote {written}")
    return 0


COMPARISON = ("task", "metric", "higher_is_better", "baseline", "runs", "summary", "paired")


def run_compare(args) -> int:
    from ..io import read_json
    from ..plots import paired
    result = read_json(args.result)
    missing = [k for k in COMPARISON if k not in result] if isinstance(result, dict) else list(COMPARISON)
    if missing:
        raise ConfigError(f"{args.result}: not a comparison over paired seeds (missing: {', '.join(missing)})")
    bad = [r for r in result["runs"] if not {"arm", "seed", "value"} <= set(r)]
    if bad:
        raise ConfigError(f"{args.result}: a run without arm, seed and value: {bad[0]}")
    print(f"wrote {paired(result, args.output or Path(args.result).with_suffix('.png'))}")
    return 0
