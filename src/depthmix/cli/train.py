"""depthmix train / eval."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import ConfigError
from ..evaluation.scorers import CHOICE_MODES
from ..tuners import METHODS
from ..flags import add_dataclass_flags, pick

OPTION_NAMES: list[str] = []
METHOD_FLAGS: dict[str, list[str]] = {}


def register(sub) -> None:
    from ..train.options import TrainOptions
    p = sub.add_parser("train", help="fine-tune a model with LoRA and/or a depth-mixing method on a task",
                       description="Options come from --config (YAML or JSON), then from flags. Method options "
                                   "(e.g. --alpha for molex) may also sit under `method_config` in the file.")
    p.add_argument("--config", help="YAML or JSON file of training options")
    OPTION_NAMES[:] = add_dataclass_flags(p, TrainOptions, skip=("method_config",), choices=train_choices())
    for name, (cfg_cls, _) in METHODS.items():
        METHOD_FLAGS[name] = add_dataclass_flags(p, cfg_cls, group=f"{name} options")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="score a trained adapter on a task")
    e.add_argument("--adapter", required=True, help="folder written by `depthmix train`")
    e.add_argument("--task", help="task (default: the one it was trained on)")
    e.add_argument("--model", help="base model (default: the one it was trained on)")
    e.add_argument("--data-dir", help="local data folder (default: the one the adapter was trained "
                   "with, recorded in its run_options.json; else $DEPTHMIX_DATA, else the Hub)")
    e.add_argument("--max-eval-samples", type=int, help="score a random subset of this many examples (default: all)")
    e.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    e.add_argument("--max-length", type=int, default=256, help="tokens per example; longer ones are cut")
    e.add_argument("--output", help="metrics JSON (default: ADAPTER/eval-TASK.json)")
    e.add_argument("--mode", choices=CHOICE_MODES,
                   help="multiple-choice tasks: loglik scores each answer label by log-likelihood (default), "
                   "loglik-text each option's own text, generate generates an answer (choices: %(choices)s)")
    e.add_argument("--max-new-tokens", type=int, help="generation tasks: tokens to generate (default: the task's)")
    e.add_argument("--routing", choices=("causal", "topk-lookahead"),
                   help="MoD adapters: causal routing (default: each token decides from its own hidden state, as "
                        "in generation) or topk-lookahead (top-k over the whole sequence, as in training: a "
                        "token's routing sees the tokens after it; for studies only)")
    e.add_argument("--layer-lens", action="store_true",
                   help="also measure how well each layer the method mixes predicts on its own over the task's gold "
                        "tokens (MoDE: NLL and top-1 accuracy through each layer's norm and the shared head, and how "
                        "often a shallower layer is right where the final one is wrong); written under 'layer_lens'")
    e.set_defaults(func=run_eval)


def train_choices() -> dict[str, str]:
    from ..data.tasks import task_names
    from ..models import EMBEDDED
    from ..train.options import METHOD_NAMES
    return {"method": ", ".join(METHOD_NAMES), "task": ", ".join(task_names()),
            "model": f"{', '.join(EMBEDDED)} (embedded: no Hub needed), or a folder or Hub id",
            "eval_mode": ", ".join(CHOICE_MODES)}


def train_options(args):
    from ..train.options import TrainOptions, load_options_file
    values = load_options_file(args.config) if args.config else {}
    values.update(pick(args, OPTION_NAMES))
    values = resumed(values)
    method = values.get("method", "lora")
    method_config = dict(values.get("method_config") or {})
    if method in METHODS:  # a file's old option names (MethodConfig.renamed), before the flags override it
        method_config = METHODS[method][0].upgrade(method_config, args.config or "method_config")
    given = {n for names in METHOD_FLAGS.values() for n in names if hasattr(args, n)}
    own = {f.name for f in dataclasses.fields(METHODS[method][0])} if method in METHODS else set()
    stray = sorted(given - own)
    if stray:
        raise ConfigError(f"--{stray[0].replace('_', '-')} is not an option of method {method!r}")
    method_config.update({n: getattr(args, n) for n in given})
    values["method_config"] = method_config
    return TrainOptions(**values)


def resumed(values: dict) -> dict:
    """--resume continues a run as it started: options not given come from its record, not from the defaults
    (given ones that change what the run is are refused by `train`)."""
    from ..train.options import TrainOptions
    from ..train.runs import recorded_options
    if not values.get("resume"):
        return values
    default = next(f.default for f in dataclasses.fields(TrainOptions) if f.name == "output_dir")
    old = recorded_options(values.get("output_dir", default))
    if old is None:
        return values
    names = {f.name for f in dataclasses.fields(TrainOptions)} - {"output_dir"}  # the folder may have moved
    merged = {**{k: v for k, v in old.items() if k in names}, **values}
    same_method = merged.get("method") == old.get("method")
    merged["method_config"] = {**(old.get("method_config") or {} if same_method else {}),
                               **(values.get("method_config") or {})}
    return merged


def run_train(args) -> int:
    import sys

    from ..train import train
    from ..train.runs import disk_full, resume_hint
    opts = train_options(args)
    try:
        summary = train(opts)
    except KeyboardInterrupt:
        if getattr(args, "verbose", False):
            raise
        print(f"depthmix train: interrupted; {resume_hint(opts.output_dir)}", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "verbose", False) or not disk_full(e, opts.output_dir):
            raise
        print(f"depthmix train: error: the disk is full ({type(e).__name__}: {str(e).strip().splitlines()[-1]}) "
              f"while writing in {opts.output_dir}; the files saved before are intact (saves are atomic). Free "
              f"some space; {resume_hint(opts.output_dir)}", file=sys.stderr)
        return 1
    if summary:
        print(json.dumps({"task": summary["task"], "method": summary["method"], **summary["metrics"],
                          "examples": summary["examples"]}, indent=2))
        print(f"{summary['task']}: {summary['examples']} examples evaluated; adapter and metrics.json in "
              f"{opts.output_dir}")
    return 0


def check_eval_args(args) -> None:
    """What can be refused before the model is loaded."""
    from ..train.preflight import check_data_dir
    for name in ("max_eval_samples", "batch_size", "max_length", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: expected an integer >= 1")
    check_data_dir(args.data_dir)


def adapter_task(adapter: str, name: str | None):
    """The task an adapter is scored or routed on: `name`, else the one it was trained on. One that needs another
    head than the adapter's (an SST-2 classifier on gsm8k) is refused here, naming both, not as missing tensors."""
    from ..data.tasks import TASKS, get_task
    from ..depthmix_model import read_adapter_config
    trained = read_adapter_config(adapter).get("info", {}).get("task")
    name = name or trained
    if name is None:
        raise ConfigError(f"{adapter}: the adapter does not name its task; pass --task")
    task = get_task(name)
    if trained in TASKS and trained != name:
        old = TASKS[trained]
        if (old.head, old.num_labels) != (task.head, task.num_labels):
            raise ConfigError(f"--task {name}: the adapter in {adapter} was trained on {trained}, {_head(old)}; "
                              f"{name} needs {_head(task)}. Score it on a task with the same head, or train an "
                              f"adapter on {name}")
    return task


def _head(task) -> str:
    if task.head == "causal_lm":
        return "a causal language model"
    return "a regression head" if task.num_labels == 1 else f"a classifier with {task.num_labels} labels"


def data_dir(adapter: str, given: str | None) -> str | None:
    """--data-dir, else the one the adapter's run was trained with (its run_options.json), else None
    ($DEPTHMIX_DATA, else the Hub). A recorded folder that is gone is said, not used."""
    import os
    import sys

    from ..train.runs import RUN_NAME, recorded_options
    if given:
        return given
    recorded = (recorded_options(adapter) or {}).get("data_dir")
    if not recorded:
        return None
    if not Path(recorded).is_dir():
        print(f"depthmix: the data folder {adapter}/{RUN_NAME} records ({recorded}) is not there; reading "
              f"{os.environ.get('DEPTHMIX_DATA') or 'the Hub'} instead", file=sys.stderr)
        return None
    return recorded


def check_output(output: str | None) -> None:
    if output and Path(output).is_dir():
        raise ConfigError(f"--output {output}: a folder; give a file path, e.g. {Path(output) / 'eval.json'}")


def layer_lens(model, task, tokenizer, rows, args) -> dict:
    if model.method is None:
        raise ConfigError(f"--layer-lens: {args.adapter} is LoRA alone; it mixes no layers")
    enc = task.encode(rows, tokenizer, args.max_length)
    collate = task.collator(tokenizer)
    size = args.batch_size
    return model.method.layer_lens(model, (collate([enc[i] for i in range(s, min(s + size, len(enc)))])
                                           for s in range(0, len(enc), size)))


def run_eval(args) -> int:
    from ..evaluation import evaluate
    from ..io import write_json
    from ..train import load_trained
    check_eval_args(args)
    check_output(args.output)
    task = adapter_task(args.adapter, args.task)
    task_name = task.name
    rows = task.load("eval", data_dir(args.adapter, args.data_dir), args.max_eval_samples, 0)  # before the model
    model, tokenizer, info = load_trained(args.adapter, args.model, task.head, task.num_labels)
    if args.routing:
        if model.method is None or not model.method.routings:
            raise ConfigError(f"--routing is for MoD adapters (with routing modes); {args.adapter} is not one")
        model.method.routing = args.routing
    if model.method is not None:
        model.method.reset_stats()
    kw = {k: getattr(args, k) for k in ("mode", "max_new_tokens") if getattr(args, k, None) is not None}
    metrics = evaluate(task, model, tokenizer, rows, batch_size=args.batch_size, max_length=args.max_length, **kw)
    if args.layer_lens:
        kw["layer_lens"] = layer_lens(model, task, tokenizer, rows, args)
    out = Path(args.output or Path(args.adapter) / f"eval-{task_name.replace('/', '_')}.json")
    state = model.method.summary() if model.method is not None else {}
    kw["routing"] = model.method.eval_routing() if model.method is not None else None
    write_json(out, {"task": task_name, "adapter": str(args.adapter), "examples": len(rows), **kw, "metrics": metrics,
                     "method_state": state})
    print(json.dumps({"task": task_name, **metrics, **{k: v for k, v in state.items() if "/" not in k}}, indent=2))
    print(f"{task_name}: {len(rows)} examples evaluated; wrote {out}")
    return 0
