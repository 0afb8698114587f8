"""Plain-text language modelling with perplexity: lm/tinyshakespeare, lm/wikitext-2, lm/pydoc.

Rows are documents (`text`); encode() tokenises them, joins them with the EOS token and cuts the stream into
blocks of max_length tokens (the last one shorter), every token a label. The "perplexity" scorer
(depthmix.evaluation) cuts the held-out rows the same way and returns perplexity = exp(total NLL / predicted
tokens) over all blocks (the first token of a block is not predicted), with `nll` (the mean) and `tokens`.

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

import random
import re

import datasets

from .tasks import CausalCollator, DataError, Task, hub, locate, read_text, register

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
    scorer = "perplexity"
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


register(TextLM("lm/tinyshakespeare", shakespeare))
register(TextLM("lm/wikitext-2", wikitext))
register(TextLM("lm/pydoc", pydoc))
