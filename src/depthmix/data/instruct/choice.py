"""Commonsense multiple choice in LLM-Adapters' form: boolq, arc-easy, openbookqa, piqa.

Each record's `instruction` holds the question, the options ("Answer1: ... Answer2: ...", "Solution1: ...")
and an "Answer format: answer1/answer2/..." line; `answer` is one of those labels (true/false for BoolQ).
The model is trained to answer "the correct answer is <label>" (the records' `output`). The rows keep each
option's label and text for the "choice" scorer of depthmix.evaluation, whose modes are:
* "loglik" (default): the log-likelihood of "the correct answer is <label>" after the prompt, for every
  label; accuracy picks the highest sum of token log-probs, accuracy_norm the highest mean per token.
* "loglik-text": the same over each option's own text (as lm-eval scores ARC/OBQA/PIQA): meaningful for a
  model not tuned on the label format.
* "generate": LLM-Adapters' commonsense_evaluate.py: greedy generation (max_new_tokens, default 32), the
  first label named in the response is the prediction (none: wrong).

Local files: reasoning/<name>_{train,test}.json. PIQA has only a test file there, so `train --task piqa`
with local data is refused: train on boolq / arc-easy / openbookqa and evaluate with `eval --task piqa`.
Hub sources (converted to the same form): google/boolq (train / validation), allenai/ai2_arc ARC-Easy and
allenai/openbookqa main (train / test), baber/piqa (train / validation).
"""
from __future__ import annotations

import re

from ..tasks import DataError, hub, locate, register
from .common import InstructTask, prompt, read_records, to_rows

FORMAT = "\n\nAnswer format:"
OPTION = re.compile(r"(?:Answer|Solution|Option|Ending)\s*(\d+)\s*:\s*", re.IGNORECASE)


def response(label: str) -> str:
    return f"the correct answer is {label}"


def choice_row(rec) -> dict | str:
    instruction, answer = str(rec["instruction"]), str(rec["answer"]).strip()
    if FORMAT not in instruction:
        return "field 'instruction' has no 'Answer format: a/b/...' line"
    body, fmt = instruction.rsplit(FORMAT, 1)
    labels = [x.strip() for x in fmt.strip().split("/") if x.strip()]
    if len(labels) < 2:
        return f"field 'instruction' lists the answer format {fmt.strip()!r}; expected at least two labels"
    if answer not in labels:
        return f"field 'answer' is {answer!r}; expected one of {labels}"
    if labels == ["true", "false"]:
        texts = labels
    else:
        parts = OPTION.split(body)
        texts = [t.strip() for t in parts[2::2]]
        if len(texts) != len(labels):
            return f"field 'instruction' holds {len(texts)} options, its answer format {len(labels)} labels"
    output = str(rec.get("output") or "").strip() or response(answer)
    return {"prompt": prompt(instruction.strip(), str(rec.get("input") or "").strip()), "target": output,
            "answer": answer, "labels": labels, "texts": texts}


def _options(prefix: str, texts: list[str], sep: str) -> tuple[str, str]:
    shown = sep.join(f"{prefix.capitalize()}{i + 1}: {t.strip()}" for i, t in enumerate(texts))
    return shown, "/".join(f"{prefix}{i + 1}" for i in range(len(texts)))


def boolq_hub(rec):
    q = rec["question"].strip()
    return {"instruction": f"Please answer the following question with true or false, question: {q}?"
                           f"{FORMAT} true/false", "answer": "true" if rec["answer"] else "false"}


def arc_hub(rec, question="question"):
    shown, fmt = _options("answer", rec["choices"]["text"], " ")
    key = rec["answerKey"].strip()
    labels = [x.strip() for x in rec["choices"]["label"]]
    return {"instruction": f"Please choose the correct answer to the question: {rec[question].strip()}\n\n"
                           f"{shown}{FORMAT} {fmt}",
            "answer": f"answer{labels.index(key) + 1}" if key in labels else key}


def piqa_hub(rec):
    shown, fmt = _options("solution", [rec["sol1"], rec["sol2"]], "\n\n")
    return {"instruction": f"Please choose the correct solution to the question: {rec['goal'].strip()}\n\n"
                           f"{shown}{FORMAT} {fmt}", "answer": f"solution{int(rec['label']) + 1}"}


class Choice(InstructTask):
    scorer = "choice"
    metric = "accuracy"
    max_new_tokens = 32

    def __init__(self, name, stem, hub_source, has_train=True):
        self.name, self.stem, self.hub_source, self.has_train = name, stem, hub_source, has_train

    def read(self, split, data_dir):
        file = f"{self.stem}_{'train' if split == 'train' else 'test'}.json"
        try:
            path = locate(self.name, data_dir, f"reasoning/{file}", file)
        except DataError:
            if split == "train" and not self.has_train:
                raise DataError(f"{self.name}: the local data has only {self.stem}_test.json, no training file; "
                                "train on boolq, arc-easy or openbookqa and evaluate with `depthmix eval --task "
                                f"{self.name}` (or train from the Hub: no --data-dir)") from None
            raise
        if path is not None:
            return to_rows(self.name, read_records(path, ["instruction", "answer"]), choice_row, path)
        repo, config, splits, to_record = self.hub_source
        records = hub(self.name, repo, config, splits[0 if split == "train" else 1])
        return to_rows(self.name, (to_record(r) for r in records), choice_row, repo)


register(Choice("boolq", "boolq", ("google/boolq", None, ("train", "validation"), boolq_hub)))
register(Choice("arc-easy", "ARC-Easy", ("allenai/ai2_arc", "ARC-Easy", ("train", "test"), arc_hub)))
register(Choice("openbookqa", "openbookqa", ("allenai/openbookqa", "main", ("train", "test"),
                                             lambda r: arc_hub(r, "question_stem"))))
register(Choice("piqa", "piqa", ("baber/piqa", None, ("train", "validation"), piqa_hub), has_train=False))
