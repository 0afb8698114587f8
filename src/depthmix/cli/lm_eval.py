"""depthmix lm-eval: lm-evaluation-harness tasks on a trained adapter (or a base model)."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError


def register(sub) -> None:
    p = sub.add_parser("lm-eval", help="score an adapter (or a base model) on lm-evaluation-harness tasks",
                       description="Runs lm_eval.simple_evaluate with the model loaded by depthmix (see "
                                   "docs/lm-eval.md). Task names as in lm_eval; --include-path adds task YAMLs.")
    p.add_argument("--adapter", help="folder written by `depthmix train`")
    p.add_argument("--model", help="base model (default: the adapter's); alone: evaluate the base model")
    p.add_argument("--tasks", required=True, help="comma-separated lm_eval task or group names")
    p.add_argument("--include-path", help="folder of extra lm_eval task YAML files")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--limit", type=float, help="examples per task (a fraction when < 1)")
    p.add_argument("--batch-size", default="8", help="an integer, or 'auto'")
    p.add_argument("--max-length", type=int, help="context length (default: the model's)")
    p.add_argument("--bootstrap-iters", type=int, default=0, help="bootstrap samples for standard errors")
    p.add_argument("--log-samples", action="store_true", help="keep per-example outputs in the JSON")
    p.add_argument("--output", help="results JSON (default: ADAPTER/lm-eval.json, or ./lm-eval.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        from lm_eval.utils import make_table
    except ImportError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise ConfigError("lm-eval runs lm-evaluation-harness, which is not installed: pip install 'lm-eval>=0.4' "
                          "(or pip install -e '.[eval]' in a depthmix checkout)") from None

    from ..evaluation.lm_eval import evaluate
    from ..io import write_json
    from ..models import load_model, load_tokenizer
    from ..train import load_trained
    if args.adapter:
        model, tokenizer, _ = load_trained(args.adapter, args.model, head="causal_lm")
    elif args.model:
        model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    else:
        raise ConfigError("pass --adapter (a trained adapter) or --model (a base model)")
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate(model, tokenizer, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                       limit=limit, batch_size=batch, max_length=args.max_length, log_samples=args.log_samples,
                       bootstrap_iters=args.bootstrap_iters)
    out = Path(args.output or (Path(args.adapter) if args.adapter else Path(".")) / "lm-eval.json")
    keep = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples", "samples")
    routing = model.method.eval_routing() if getattr(model, "method", None) is not None else None
    record = {"adapter": args.adapter, "model": args.model, "tasks": tasks, "routing": routing,
              **{k: results[k] for k in keep if k in results}}
    write_json(out, json.loads(json.dumps(record, default=str)))
    print(make_table(results))
    print(f"results: {out}")
    return 0
