"""Plain-text language modelling with perplexity: lm/tinyshakespeare, lm/wikitext-2, lm/pydoc.

Rows are documents (`text`); encode() tokenises them, joins them with the EOS token and cuts the stream into
blocks of max_length tokens (the last one shorter), every token a label. evaluate() cuts the held-out rows
the same way and returns perplexity = exp(total NLL / predicted tokens) over all blocks (the first token of a
block is not predicted), with `nll` (the mean) and `tokens` (the count).

* lm/tinyshakespeare: lm/tinyshakespeare.txt, paragraphs; the first 90% of the characters train, the last 10%
  evaluate (nanoGPT's split). Hub: karpathy/tiny_shakespeare train / test.
* lm/wikitext-2: articles of the tokenised WikiText-2. The shared data has only valid.txt and test.txt, so
  valid trains and test evaluates; from the Hub (Salesforce/wikitext, wikitext-2-v1) train trains, test
  evaluates.
* lm/pydoc: the help topics of `pydoc_data.topics` (ships with Python, no download); every tenth topic (in
  name order) is held out.
max_samples picks documents (seeded) and keeps their order.
"""
from __future__ import annotations

import math
import random
import re

import datasets
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tasks import DataError, Task, read_text, register
from ...runtime import device_of, evaluating
from .common import LOGITS_BUDGET, CausalCollator, hub, locate

HEADING = re.compile(r"^ = [^=].* = $")


def shakespeare(split, data_dir, task):
    path = locate(task, data_dir, "lm/tinyshakespeare.txt", "tinyshakespeare.txt")
    if path is None:
        text = "\n".join(hub(task, "karpathy/tiny_shakespeare", None, "train" if split == "train" else "test")["text"])
        return _paragraphs(text)
    text = read_text(path)
    cut = int(0.9 * len(text))
    return _paragraphs(text[:cut] if split == "train" else text[cut:])


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def wikitext(split, data_dir, task):
    file = "valid.txt" if split == "train" else "test.txt"
    path = locate(task, data_dir, f"lm/wikitext-2/{file}", f"wikitext-2/{file}", file)
    if path is None:
        lines = hub(task, "Salesforce/wikitext", "wikitext-2-v1", "train" if split == "train" else "test")["text"]
    else:
        lines = read_text(path).splitlines(keepends=True)
    articles: list[list[str]] = []
    for line in lines:
        if HEADING.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [t for t in ("".join(a).strip() for a in articles) if t]


def pydoc(split, data_dir, task):
    from pydoc_data.topics import topics
    names = sorted(topics)
    return [topics[n].strip() for i, n in enumerate(names) if (i % 10 == 9) == (split == "eval")]


def blocks(texts: list[str], tokenizer, size: int) -> list[list[int]]:
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tokenizer.eos_token_id])
    return [b for b in (stream[i:i + size] for i in range(0, len(stream), size)) if len(b) > 1]


class TextLM(Task):
    head = "causal_lm"
    metric = "perplexity"

    def __init__(self, name, reader):
        self.name, self.reader = name, reader

    def load(self, split, data_dir=None, max_samples=None, seed=0):
        if split not in ("train", "eval"):
            raise ValueError(f"{self.name}: unknown split {split!r} (use 'train' or 'eval')")
        docs = self.reader(split, data_dir, self.name)
        if not docs:
            raise DataError(f"{self.name}: the {split} split holds no text")
        ds = datasets.Dataset.from_dict({"text": docs})
        if max_samples is not None and max_samples < len(ds):
            ds = ds.select(sorted(random.Random(seed).sample(range(len(ds)), max_samples)))
        return ds

    def encode(self, rows, tokenizer, max_length):
        ids = blocks(rows["text"], tokenizer, max_length)
        return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(b) for b in ids],
                                           "labels": ids})

    def collator(self, tokenizer):
        return CausalCollator(tokenizer.pad_token_id)

    def evaluate(self, model, tokenizer, rows, batch_size=32, max_length=256, progress=True, **kw):
        return perplexity(model, blocks(rows["text"], tokenizer, max_length), tokenizer.pad_token_id,
                          batch_size, progress, desc=f"eval {self.name}")


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


register(TextLM("lm/tinyshakespeare", shakespeare))
register(TextLM("lm/wikitext-2", wikitext))
register(TextLM("lm/pydoc", pydoc))
