"""GLUE: the eight tasks with their official metrics, from the Hub or a local GLUE folder of TSV files."""
from __future__ import annotations

import csv
from dataclasses import dataclass

import datasets

from .tasks import DataError, Task, check_table, data_root, find_file, hub, register, subsample


@dataclass(frozen=True)
class Layout:
    folder: str  # folder name in the GLUE dump
    eval_file: str  # dev.tsv, or dev_matched.tsv for MNLI
    a: str | int  # column of the first text (name in the header, or index when there is no header)
    b: str | int | None
    label: str | int
    header: bool = True


class GlueTask(Task):
    """metrics: what the "classification" scorer reports, the first one the headline metric."""

    head = "sequence_classification"
    scorer = "classification"

    def __init__(self, name, hub_config, hub_fields, layout: Layout, labels, metrics):
        self.name = f"glue/{name}"
        self.hub_config = hub_config
        self.hub_fields = hub_fields  # (text_a, text_b) column names on the Hub
        self.layout = layout
        self.labels = labels  # label strings in file order of class ids, or None for regression
        self.num_labels = len(labels) if labels else 1
        self.metrics = metrics
        self.metric = metrics[0]

    # -- loading ------------------------------------------------------------------------------------------
    def load(self, split, data_dir=None, max_samples=None, seed=0):
        if split not in ("train", "eval"):
            raise ValueError(f"{self.name}: unknown split {split!r} (use 'train' or 'eval')")
        root = data_root(data_dir)
        if root is not None:
            lay = self.layout
            name = "train.tsv" if split == "train" else lay.eval_file
            path = find_file(root, f"glue/{lay.folder}/{name}", f"{lay.folder}/{name}", name)
            if path is None:
                raise DataError(f"{self.name}: no {lay.folder}/{name} under {root} (GLUE TSV layout expected)")
            ds = self._read_tsv(path)
        else:
            hub_split = "train" if split == "train" else ("validation_matched" if self.hub_config == "mnli"
                                                          else "validation")
            raw = hub(self.name, "nyu-mll/glue", self.hub_config, hub_split)
            a, b = self.hub_fields
            ds = raw.map(lambda r: {"text_a": r[a], "text_b": r[b] if b else None, "label": r["label"]},
                         remove_columns=raw.column_names)
        return subsample(ds, max_samples, seed)

    def _read_tsv(self, path) -> datasets.Dataset:
        lay = self.layout
        check_table(path, "\t", lay.header, quoted=False)
        try:
            raw = datasets.load_dataset("csv", data_files=str(path), delimiter="\t", quoting=csv.QUOTE_NONE,
                                        header=0 if lay.header else None, keep_default_na=False,
                                        split="train")
        except Exception as e:  # pandas reports the bad line
            raise DataError(f"{path}: cannot be read as a GLUE TSV file: {e}") from None
        cols = raw.column_names
        wanted = {"text_a": lay.a, "text_b": lay.b, "label": lay.label}
        names = {}
        for field, col in wanted.items():
            if col is None:
                continue
            name = cols[col] if isinstance(col, int) and col < len(cols) else col
            if name not in cols:
                raise DataError(f"{path}: line 1: missing column {col!r} (needed for {field}); found {cols}")
            names[field] = name
        first_line = 2 if lay.header else 1
        labels = []
        for i, value in enumerate(raw[names["label"]]):
            labels.append(self._label(value, path, i + first_line, names["label"]))
        for field in ("text_a", "text_b"):
            if field in names:
                for i, value in enumerate(raw[names[field]]):
                    if value is None:
                        raise DataError(f"{path}: line {i + first_line}: field {names[field]!r} is missing")
        return datasets.Dataset.from_dict({
            "text_a": [str(v) for v in raw[names["text_a"]]],
            "text_b": [str(v) for v in raw[names["text_b"]]] if "text_b" in names else [None] * len(raw),
            "label": labels,
        })

    def _label(self, value, path, line, field):
        if self.labels is None:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise DataError(f"{path}: line {line}: field {field!r} has value {value!r}; expected a number") from None
        if str(value) in self.labels:
            return self.labels.index(str(value))
        raise DataError(f"{path}: line {line}: field {field!r} has value {value!r}; expected one of {self.labels}")

    # -- model inputs -------------------------------------------------------------------------------------
    def encode(self, rows, tokenizer, max_length):
        def enc(batch):
            b = batch["text_b"] if any(x is not None for x in batch["text_b"]) else None
            out = tokenizer(batch["text_a"], b, truncation=True, max_length=max_length)
            out["labels"] = batch["label"]
            return out
        return rows.map(enc, batched=True, remove_columns=rows.column_names, desc=f"tokenizing {self.name}")


NLI = ["entailment", "not_entailment"]
for args in [
    ("sst2", "sst2", ("sentence", None), Layout("SST-2", "dev.tsv", "sentence", None, "label"), ["0", "1"],
     ["accuracy"]),
    ("rte", "rte", ("sentence1", "sentence2"), Layout("RTE", "dev.tsv", "sentence1", "sentence2", "label"), NLI,
     ["accuracy"]),
    ("mrpc", "mrpc", ("sentence1", "sentence2"),
     Layout("MRPC", "dev.tsv", "#1 String", "#2 String", "Quality"), ["0", "1"], ["accuracy", "f1"]),
    ("cola", "cola", ("sentence", None), Layout("CoLA", "dev.tsv", 3, None, 1, header=False), ["0", "1"],
     ["matthews_correlation"]),
    ("stsb", "stsb", ("sentence1", "sentence2"), Layout("STS-B", "dev.tsv", "sentence1", "sentence2", "score"),
     None, ["pearson", "spearman"]),
    ("qnli", "qnli", ("question", "sentence"), Layout("QNLI", "dev.tsv", "question", "sentence", "label"), NLI,
     ["accuracy"]),
    ("qqp", "qqp", ("question1", "question2"),
     Layout("QQP", "dev.tsv", "question1", "question2", "is_duplicate"), ["0", "1"], ["accuracy", "f1"]),
    ("mnli", "mnli", ("premise", "hypothesis"),
     Layout("MNLI", "dev_matched.tsv", "sentence1", "sentence2", "gold_label"),
     ["entailment", "neutral", "contradiction"], ["accuracy"]),
]:
    register(GlueTask(*args))
