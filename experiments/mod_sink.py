"""What the attention-sink rule does to a retrofit with untrained routers (issue 8, part 2).

    OMP_NUM_THREADS=2 nice -n 10 python experiments/mod_sink.py --data-dir ../shared/data

SmolLM2-135M (embedded: SmolLM2-135M-Instruct de-quantised from Q4_1), MoD on every other block,
update="retrofit", zero routers, no training. Held-out NLL (nats/token) on a seeded subsample of the
lm/tinyshakespeare held-out paragraphs, computed by the task's own evaluate() (what `depthmix eval` runs), for
the dense model and for each sink rule (keep_first on/off) under:
- top-k-lookahead routing at each capacity (what the earlier 5.81 / 11.07 numbers used), with today's tie rule
  (the earlier position wins) and with the one those numbers were measured with (torch.topk's own order, which
  drops the earliest of equal scores), so that the sink rule and the tie rule are seen apart;
- causal routing with the default predictor (untrained, seeded init) and with causal="aux_loss" (the zero
  router decides: every token skips). Causal decisions do not depend on capacity, so they are run once.
Writes docs/results/mod-sink.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import depthmix
import depthmix.tuners.mod.model as mod_model
from depthmix.data.tasks import get_task
from depthmix.evaluation import evaluate
from depthmix.models import load_model, load_tokenizer
from depthmix.tuners.mod.layer import capacity_k

MODEL = "smollm2-135m"
TASK = "lm/tinyshakespeare"


def heldout_nll(model, tokenizer, rows, max_length) -> dict:
    """The task's NLL over rows, with MoD's routing and realized capacity when the model has a method."""
    method = getattr(model, "method", None)
    if method is not None:
        method.reset_stats()
    start = time.time()
    metrics = evaluate(get_task(TASK), model, tokenizer, rows, max_length=max_length, progress=False)
    if method is not None:
        metrics["routing"] = method.eval_routing()
        metrics["realized_capacity"] = method.summary().get("realized_capacity")
    metrics["seconds"] = round(time.time() - start, 1)
    print(json.dumps(metrics), flush=True)
    return metrics


def torch_topk_ties(scores, valid, capacity, keep=None):
    """The selection before issue 8 (torch.topk, whose CPU kernel drops the earliest of equal scores), with the
    sink rule where `keep` is given. Only for the "torch.topk" rows."""
    k = capacity_k(valid, capacity)
    top = int(k.max())
    scores = scores.masked_fill(~valid, float("-inf"))
    if keep is not None:
        scores = scores.masked_fill(keep, float("inf"))
    idx = scores.topk(top, dim=1).indices
    take = torch.arange(top, device=valid.device) < k.unsqueeze(1)
    return torch.zeros_like(valid).scatter(1, idx, take)


def retrofit(capacity, keep_first, causal, routing, seed):
    torch.manual_seed(seed)  # the untrained predictor's init
    model = depthmix.apply(load_model(MODEL), depthmix.MoDConfig(
        capacity=capacity, layers="every_other", update="retrofit", keep_first=keep_first, causal=causal))
    model.method.routing = routing
    return model.eval()


def settings(capacities):
    """(capacity or None, causal, routing): top-k-lookahead per capacity, causal once (capacity plays no part)."""
    for capacity in capacities:
        yield capacity, "predictor", "topk-lookahead"
    for causal in ("predictor", "aux_loss"):
        yield None, causal, "causal"


def table(record: dict) -> str:
    """The Markdown table of docs/results-mod.md, from the JSON record."""
    lines = ["| routing | capacity | causal decision | ties | first token kept | realized capacity | NLL |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| dense | | | | | | {record['dense']['nll']:.2f} |"]
    for p in record["points"]:
        topk = p["routing"] == "topk-lookahead"
        lines.append(f"| {p['routing']} | {p['capacity'] if topk else 'any (unused)'} | "
                     f"{'' if topk else p['causal']} | {p['ties'] if topk else ''} | "
                     f"{'on' if p['keep_first'] else 'off'} | {p['realized_capacity']:.3f} | {p['nll']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir")
    p.add_argument("--max-samples", type=int, default=40, help="held-out paragraphs (seeded subsample)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per block, as `depthmix eval`'s default")
    p.add_argument("--capacities", type=float, nargs="+", default=[0.9, 0.5])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/mod-sink.json")
    p.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    args = p.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    tokenizer = load_tokenizer(MODEL)
    rows = get_task(TASK).load("eval", args.data_dir, args.max_samples, args.seed)
    dense = heldout_nll(load_model(MODEL).eval(), tokenizer, rows, args.max_length)
    points = []
    current = mod_model.topk_membership
    mod_model.topk_membership = torch_topk_ties
    for capacity in args.capacities:
        for keep_first in (True, False):
            m = heldout_nll(retrofit(capacity, keep_first, "predictor", "topk-lookahead", args.seed), tokenizer,
                            rows, args.max_length)
            points.append({"capacity": capacity, "keep_first": keep_first, "causal": "predictor",
                           "ties": "torch.topk: earliest dropped (old)", **m})
    mod_model.topk_membership = current
    for capacity, causal, routing in settings(args.capacities):
        for keep_first in (True, False):
            # causal routing ignores capacity; the model is built at capacity 1.0 so nothing else reads one
            model = retrofit(capacity or 1.0, keep_first, causal, routing, args.seed)
            m = heldout_nll(model, tokenizer, rows, args.max_length)
            points.append({"capacity": capacity, "keep_first": keep_first, "causal": causal,
                           "ties": "earlier position wins", **m})
    record = {"model": f"{MODEL} (SmolLM2-135M-Instruct, de-quantised from Q4_1)",
              "data": f"{TASK} held-out: {len(rows)} of its paragraphs (seeded subsample, seed {args.seed}), "
                      f"blocks of {args.max_length} tokens",
              "tokens": dense["tokens"],
              "mod": {"layers": "every_other", "update": "retrofit", "routers": "zero (untrained)",
                      "predictor": "untrained (torch seed %d)" % args.seed},
              "dense": dense, "points": points}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    print(table(record))


if __name__ == "__main__":
    main()
