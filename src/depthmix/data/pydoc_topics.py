"""A classification task that needs no download: which part of the Python reference a passage comes from.

The text is `pydoc_data.topics`, which ships with every CPython. Passages of ~40 words are labelled with the
group of their help topic; every fifth passage of each topic is held out for evaluation.
"""
from __future__ import annotations

import re

import datasets

from .glue import GlueTask, Layout
from .tasks import register, subsample

GROUPS = {
    "data model": ["specialnames", "customization", "attribute-access", "sequence-types", "numeric-types",
                   "objects", "context-managers"],
    "statements": ["compound", "assignment", "import", "try", "with", "raise", "for", "function", "class",
                   "async", "augassign", "naming", "execmodel"],
    "built-in types": ["types", "typesseq", "string-methods", "typesmapping", "typesseq-mutable", "formatstrings",
                       "typesmethods", "dict"],
    "expressions": ["comparisons", "calls", "binary", "subscriptions", "slicings", "operator-summary", "strings",
                    "identifiers", "id-classes", "in", "exceptions"],
}
WORDS = 40


def passages(split: str) -> dict[str, list]:
    from pydoc_data.topics import topics
    text, label = [], []
    for gid, names in enumerate(GROUPS.values()):
        for name in names:
            words = re.sub(r"\s+", " ", topics[name]).split(" ")
            chunks = [" ".join(words[i:i + WORDS]) for i in range(0, len(words) - WORDS // 2, WORDS)]
            for k, chunk in enumerate(chunks):
                if (k % 5 == 4) == (split == "eval"):
                    text.append(chunk)
                    label.append(gid)
    return {"text_a": text, "text_b": [None] * len(text), "label": label}


class PydocTopics(GlueTask):
    def __init__(self):
        super().__init__("", None, ("text_a", None), Layout("", "", "", None, ""), list(GROUPS), ["accuracy"])
        self.name = "pydoc/topics"

    def load(self, split, data_dir=None, max_samples=None, seed=0):
        if split not in ("train", "eval"):
            raise ValueError(f"{self.name}: unknown split {split!r} (use 'train' or 'eval')")
        return subsample(datasets.Dataset.from_dict(passages(split)), max_samples, seed)


register(PydocTopics())
