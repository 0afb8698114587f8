"""Next-token NLL of text: perplexity over token blocks, the held-out NLL of a pretraining run or a benchmark, and
the NLL of an instruction task's gold responses."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..runtime import device_of, evaluating
from .loglik import LOGITS_BUDGET


@torch.no_grad()
def perplexity(model, seqs: list[list[int]], pad_id: int, batch_size: int = 32, progress: bool = True,
               desc: str = "perplexity", routing: str | None = None) -> dict[str, float]:
    """exp(mean NLL) over every predicted token of every sequence (right-padded batches); routing: a routing mode
    of the model's method (MoD's "causal", "topk-lookahead"), None for its default outside training."""
    method = getattr(model, "method", None)
    if routing is not None and method is not None:
        with method.routing_mode(routing):
            return perplexity(model, seqs, pad_id, batch_size, progress, desc)
    device = device_of(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, min(batch_size, LOGITS_BUDGET // (max(map(len, seqs)) * vocab)))
    total, count = 0.0, 0
    with evaluating(model):
        for start in tqdm(range(0, len(seqs), rows), desc=desc, disable=not progress):
            chunk = seqs[start:start + rows]
            n = max(map(len, chunk))
            ids = torch.tensor([s + [pad_id] * (n - len(s)) for s in chunk], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in chunk], device=device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            keep = mask[:, 1:].bool()
            total += float(nll[keep].sum())
            count += int(keep.sum())
    mean = total / max(count, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": float(count)}


def heldout_nll(model, blocks: torch.Tensor, batch_size: int = 4, routing: str | None = None) -> dict:
    """Mean next-token NLL over held-out blocks of equal length (no padding), in the given routing mode, with the
    method's statistics of these forwards (MoD: realized capacity, predictor accuracy)."""
    method = getattr(model, "method", None)
    if method is not None:
        method.reset_stats()
    out = perplexity(model, blocks.tolist(), 0, batch_size, progress=False, routing=routing)
    return {"nll": out["nll"], **(method.summary() if method is not None else {})}


@torch.no_grad()
def response_nll(task, model, tokenizer, rows, max_length: int = 256, batch_size: int = 16) -> dict:
    """Mean NLL per token of an instruction task's gold responses, teacher forced with the prompt masked out (eval
    mode): a continuous measure of what a short run learned, steadier than accuracy on a few hundred rows."""
    enc = task.encode(rows, tokenizer, max_length)
    if len(enc) == 0:  # a mean over no token would read as a perfect 0.0
        raise ValueError(f"{task.name}: no response token to score in {len(rows)} rows at max_length={max_length}")
    collate = task.collator(tokenizer)
    device = device_of(model)
    total, count = 0.0, 0
    with evaluating(model):
        for start in range(0, len(enc), batch_size):
            batch = collate([enc[i] for i in range(start, min(start + batch_size, len(enc)))])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**{k: v.to(device) for k, v in batch.items()}).loss.item() * n
            count += n
    return {"gold_nll": total / count, "tokens": count, "rows": len(enc)}
