"""depthmix demo: a short tour of the three methods on the embedded models and text, no Hub needed.

MoD on SmolLM2-135M: held-out NLL, FLOPs and decoding speed against the dense model and against dropping blocks.
MoLEx on MiniLM-L6 (pydoc/topics): what its gate chose, as a picture. MoDE on SmolLM2-135M (lm/pydoc): its mixing
weights, as a picture. --compare runs the longer job instead: LoRA against MoLEx + LoRA, side by side.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

from ..flags import at_least

DESCRIPTION = __doc__ + """
Everything runs on the CPU in about two to three minutes (2 cores). The MoD model here has routers tuned for a few
steps only, so it shows what MoD does to speed and quality, not what a tuned retrofit reaches: for that, train one
(`depthmix train --method mod --update gated ...`) and pass it with --mod-adapter."""

TEXT = "lm/pydoc"  # the help topics of CPython's pydoc_data: ships with Python


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


START = [time.perf_counter()]


def run_demo(args) -> int:
    out = Path(args.output_dir)
    START[0] = time.perf_counter()
    if args.compare:
        return compare(args, out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"mod": mod_tour(args, out)}
    results["molex"] = routing_tour("molex", "minilm-l6", "pydoc/topics", args, out)
    results["mode"] = routing_tour("mode", "smollm2-135m", TEXT, args, out)
    (out / "demo.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + mod_table(results["mod"]))
    print(f"\npictures: {', '.join(r['picture'] for r in (results['molex'], results['mode']))}; numbers: "
          f"{out / 'demo.json'}")
    return 0


def step(text: str) -> None:
    print(f"\n== [{time.perf_counter() - START[0]:.0f} s] {text}", flush=True)


def mod_tour(args, out: Path) -> dict:
    """Dense SmolLM2, the same with its least influential blocks dropped, and MoD on the blocks around them with
    threshold routing at a matched FLOP budget: held-out NLL, counted FLOPs and decoding tokens/s side by side."""
    import torch

    from .. import apply
    from ..bench.common import interleaved_times
    from ..bench.mod import text_blocks
    from ..evaluation.perplexity import heldout_nll
    from ..flops import forward_flops
    from ..models import load_model, load_tokenizer
    from ..train import load_trained
    from ..tuners.mod import MoDConfig
    from ..tuners.mod.importance import block_influence, drop_blocks, least_important
    from ..tuners.mod.retrofit import calibrate_gates, tune

    step("MoD on SmolLM2-135M: loading the model and the text (pydoc help topics)")
    torch.manual_seed(args.seed)
    dense = load_model("smollm2-135m").eval()
    tok = load_tokenizer("smollm2-135m")
    train = text_blocks(TEXT, "train", tok, 128, None, limit=64)
    held = text_blocks(TEXT, "eval", tok, 128, None, limit=16)
    scores = block_influence(dense, train[:8])
    n_drop = 4
    dropped = least_important(scores, n_drop)
    drop = drop_blocks(copy.deepcopy(dense), dropped).eval()
    if args.mod_adapter:
        mod, _, _ = load_trained(args.mod_adapter, None, "causal_lm", None)
        how = f"adapter {args.mod_adapter}"
    else:
        # the blocks the drop removes, and as many of the next least influential, each run by half of the tokens:
        # the same share of block compute as the drop
        layers = sorted(least_important(scores, 2 * n_drop))
        config = MoDConfig(layers=layers, capacity=0.5, update="gated", causal="threshold")
        mod = apply(copy.deepcopy(dense), config)
        step(f"MoD: tuning the routers of blocks {layers} ({args.tune_steps} steps, distilled from the dense model)")
        tune(mod, train, args.tune_steps, batch=2, loss="distill", seed=args.seed)
        calibrate_gates(mod, train[:8])
        how = f"blocks {layers} at capacity 0.5, routers tuned {args.tune_steps} steps"
    mod.eval()
    step("MoD: held-out NLL and counted FLOPs")
    models = {"dense": dense, f"drop {n_drop} blocks": drop, "MoD": mod}
    rows = {}
    for name, m in models.items():
        nll = heldout_nll(m, held, routing="causal" if name == "MoD" else None)
        rows[name] = {"nll": round(nll["nll"], 4), "flops": forward_flops(m, 1, 128, "causal", ids=held[:1])}
        if name == "MoD":
            rows[name]["realized_capacity"] = nll.get("realized_capacity")
    n = args.new_tokens
    step(f"MoD: decoding speed, batch 1, {n} new tokens from a 64-token prompt (the three timed in turns)")
    prompt = held[:1, :64]

    def decoder(m):
        return lambda: m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    with torch.no_grad():
        rounds = interleaved_times({name: decoder(m) for name, m in models.items()}, repeats=args.repeats, warmup=1)
    for name in models:
        rows[name]["flop_ratio"] = round(rows[name]["flops"] / rows["dense"]["flops"], 4)
        rows[name]["decode_speedup"] = rounds.ratio("dense", name)
        rows[name]["tokens_per_s"] = round(n / rounds.median(name), 1)
    return {"model": "smollm2-135m", "text": TEXT, "held_out": f"{len(held)} x 128 tokens", "mod": how,
            "dropped": dropped, "rows": rows}


def mod_table(result: dict) -> str:
    lines = [f"MoD on {result['model']} ({result['mod']}); held-out NLL on {result['held_out']} of {result['text']}",
             "model             held-out NLL  FLOP ratio  decode tokens/s  speed-up (IQR)"]
    for name, r in result["rows"].items():
        s = r["decode_speedup"]
        lines.append(f"{name:<18}{r['nll']:>12.3f}{r['flop_ratio']:>12.3f}{r['tokens_per_s']:>17.1f}  "
                     f"{s['median']:.2f}x ({s['iqr'][0]:.2f}-{s['iqr'][1]:.2f})")
    drop, mod = (result["rows"][k] for k in list(result["rows"])[1:])
    nll = "lower" if mod["nll"] < drop["nll"] else "higher"
    speed = "faster" if mod["decode_speedup"]["median"] > drop["decode_speedup"]["median"] else "slower"
    lines.append(f"At about the same FLOPs, this MoD has a {nll} held-out NLL than dropping blocks and decodes {speed} "
                 "(docs/results-mod.md has the full study).")
    return "\n".join(lines)


def routing_tour(method: str, model: str, task_name: str, args, out: Path) -> dict:
    """Train `method` + LoRA for a few steps and draw what its routers chose on the task's evaluation rows."""
    from ..data.tasks import get_task
    from ..evaluation import routing
    from ..train import TrainOptions, load_trained, train

    run = out / method
    if run.exists():  # the demo owns this folder: start it afresh (also after a demo that was killed)
        shutil.rmtree(run)
    lm = get_task(task_name).head == "causal_lm"
    step(f"{method}: {model} + LoRA on {task_name}, {args.train_steps} steps")
    # a quick run: the routers' rate is raised so that they move within it (MoDE starts its ensemble even)
    extra = {"init_final_weight": 1 / 3} if method == "mode" else {}
    opts = TrainOptions(method=method, model=model, task=task_name, output_dir=str(run), max_steps=args.train_steps,
                        batch_size=2 if lm else 16, lr=1e-3, router_lr=1e-2, max_length=128 if lm else 64,
                        seed=args.seed, max_eval_samples=8 if lm else 64, save_steps=10_000, logging_steps=6,
                        method_config=extra)
    summary = train(opts)
    task = get_task(task_name)
    trained, tok, _ = load_trained(str(run), None, task.head, task.num_labels)
    record = routing.record(trained, tok, task, task.load("eval", max_samples=8 if lm else 64))
    picture = routing.draw(trained, record, out / f"{method}-routing.png",
                           title=f"{trained.method.routing_title}, {task_name}")
    return {"model": model, "task": task_name, "metrics": summary["metrics"], "picture": str(picture),
            "routing": {k: v for k, v in record.items() if k != "picture"}}


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
        step(f"{method}: {args.model} on pydoc/topics")
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
