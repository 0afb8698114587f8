"""Scoring a model on a task's evaluation rows. A task names its scorer (`Task.scorer`); the scorer runs the model
and computes the task's metrics: `evaluate(task, model, tokenizer, rows)`.

* classification: the argmax (or, with one label, the value) of a classification head; the task's `metrics`.
* answer: greedy generation, then LLM-Adapters' answer extraction (the last number, or an option letter).
* choice: mode "loglik" (default) ranks "the correct answer is <label>" for every label by log-likelihood
  (accuracy: highest sum of token log-probs, accuracy_norm: highest mean per token); "loglik-text" ranks each
  option's own text (as lm-eval scores ARC/OBQA/PIQA); "generate" takes the first label named in a greedy response.
* nlg: greedy generation against every reference of each input (E2E: BLEU, NIST, ROUGE-L, METEOR, CIDEr).
* perplexity: exp(mean NLL) over the task's token blocks.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.instruct.choice import response
from ..runtime import device_of, evaluating
from .generation import generate
from .loglik import loglik
from .metrics import accuracy, e2e_metrics, extract_letter, extract_number, glue_metrics, is_correct
from .perplexity import perplexity

SCORERS: dict = {}
CHOICE_MODES = ("loglik", "loglik-text", "generate")


def scorer(name: str):
    """Registers fn(task, model, tokenizer, rows, batch_size, max_length, progress, **options) -> metrics."""
    def add(fn):
        SCORERS[name] = fn
        return fn
    return add


def generates(task, mode: str | None = None) -> bool:
    """Whether scoring the task (in this choice mode) decodes with the model: greedy generation, a KV cache."""
    return task.scorer in ("answer", "nlg") or (task.scorer == "choice" and mode == "generate")


def evaluate(task, model, tokenizer, rows, batch_size: int = 32, max_length: int = 256, progress: bool = True,
             **options) -> dict[str, float]:
    """The task's metrics of the model on `rows` (from task.load("eval", ...)). options: mode (choice tasks),
    max_new_tokens (generating tasks; default the task's)."""
    if task.scorer not in SCORERS:
        raise KeyError(f"task {task.name!r} names the scorer {task.scorer!r}; known scorers: {', '.join(SCORERS)}")
    return SCORERS[task.scorer](task, model, tokenizer, rows, batch_size, max_length, progress, **options)


@torch.no_grad()
def predict(task, model, tokenizer, rows, batch_size: int = 32, max_length: int = 256, progress: bool = True):
    """A classification head's predictions on the rows: class ids, or values for a regression task."""
    enc = task.encode(rows, tokenizer, max_length).remove_columns(["labels"])
    collate = task.collator(tokenizer)
    device = device_of(model)
    preds = []
    with evaluating(model):
        for start in tqdm(range(0, len(enc), batch_size), desc=f"eval {task.name}", disable=not progress):
            batch = collate([enc[i] for i in range(start, min(start + batch_size, len(enc)))])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            preds.append(logits.squeeze(-1) if task.num_labels == 1 else logits.argmax(-1))
    return torch.cat(preds).cpu().numpy()


@scorer("classification")
def classification(task, model, tokenizer, rows, batch_size, max_length, progress, **options):
    preds = predict(task, model, tokenizer, rows, batch_size, max_length, progress)
    return glue_metrics(task.metrics, preds, np.asarray(rows["label"]))


def responses(task, model, tokenizer, rows, batch_size, max_length, progress, max_new_tokens=None):
    return generate(model, tokenizer, rows["prompt"], batch_size, max_length, max_new_tokens or task.max_new_tokens,
                    progress, desc=f"eval {task.name}")


@scorer("answer")
def answer(task, model, tokenizer, rows, batch_size, max_length, progress, max_new_tokens=None, **options):
    outputs = responses(task, model, tokenizer, rows, batch_size, max_length, progress, max_new_tokens)
    extract = extract_letter if task.letter else extract_number
    preds = [extract(o) for o in outputs]
    return {"accuracy": accuracy([is_correct(p, a, task.letter) for p, a in zip(preds, rows["answer"])]),
            "answered": accuracy([p is not None for p in preds])}


@scorer("choice")
def choice(task, model, tokenizer, rows, batch_size, max_length, progress, mode="loglik", max_new_tokens=None,
           **options):
    if mode not in CHOICE_MODES:
        raise ValueError(f"{task.name}: mode {mode!r}; expected one of {CHOICE_MODES}")
    answers = rows["answer"]
    if mode == "generate":
        outputs = responses(task, model, tokenizer, rows, batch_size, max_length, progress, max_new_tokens)
        preds = []
        for out, labels in zip(outputs, rows["labels"]):
            found = re.findall("|".join(re.escape(x) for x in labels), out)
            preds.append(found[0] if found else None)
        return {"accuracy": accuracy([p == a for p, a in zip(preds, answers)]),
                "answered": accuracy([p is not None for p in preds])}
    prompts, conts, owner = [], [], []
    for i, (p, labels, texts) in enumerate(zip(rows["prompt"], rows["labels"], rows["texts"])):
        for label, text in zip(labels, texts):
            prompts.append(p)
            conts.append(response(label) if mode == "loglik" else text)
            owner.append((i, label))
    scores = loglik(model, tokenizer, prompts, conts, batch_size, max_length, progress, desc=f"eval {task.name}")
    best: dict[int, tuple] = {}
    best_norm: dict[int, tuple] = {}
    for (i, label), (total, n) in zip(owner, scores):
        if i not in best or total > best[i][0]:
            best[i] = (total, label)
        if i not in best_norm or total / n > best_norm[i][0]:
            best_norm[i] = (total / n, label)
    return {"accuracy": accuracy([best[i][1] == a for i, a in enumerate(answers)]),
            "accuracy_norm": accuracy([best_norm[i][1] == a for i, a in enumerate(answers)])}


@scorer("nlg")
def nlg(task, model, tokenizer, rows, batch_size, max_length, progress, max_new_tokens=None, **options):
    refs = rows["refs"] if "refs" in rows.column_names else [[t] for t in rows["target"]]
    outputs = responses(task, model, tokenizer, rows, batch_size, max_length, progress, max_new_tokens)
    return e2e_metrics(outputs, refs)


@scorer("perplexity")
def text_perplexity(task, model, tokenizer, rows, batch_size, max_length, progress, **options):
    blocks = task.encode(rows, tokenizer, max_length)["input_ids"]
    return perplexity(model, blocks, tokenizer.pad_token_id, batch_size, progress, desc=f"eval {task.name}")
