"""The task registry: every task knows how to load its data and encode it for a model, and names the scorer that
measures a model on it (depthmix.evaluation.scorers). Importing depthmix.data registers every task."""
from __future__ import annotations

import os
import re
from pathlib import Path

import datasets
import torch

from ..io import not_utf8


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, line and field."""


LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what ends a line for pandas and the csv module; str.splitlines also
# splits on VT, FF, NEL, U+2028..., which are text inside a field


class Task:
    """Subclasses set the class attributes and implement load/encode.

    head: the model head the task needs: "sequence_classification" or "causal_lm".
    num_labels: classes for classification tasks (1 = regression); None for causal LM tasks.
    scorer: the name of the scorer in depthmix.evaluation.scorers that measures a model on the task.
    metric: the headline metric in the scorer's result, used for summaries and model selection.
    """

    name: str = ""
    head: str = "causal_lm"
    num_labels: int | None = None
    scorer: str = ""
    metric: str = ""

    def load(self, split: str, data_dir: str | None = None, max_samples: int | None = None,
             seed: int = 0) -> datasets.Dataset:
        """Raw rows of split "train" or "eval" (dev/test as the task defines), optionally a seeded subsample."""
        raise NotImplementedError

    def encode(self, rows: datasets.Dataset, tokenizer, max_length: int) -> datasets.Dataset:
        """Model inputs for training: input_ids, attention_mask, labels (prompt tokens -100 for causal LMs)."""
        raise NotImplementedError

    def collator(self, tokenizer):
        """Pads a list of encoded rows into a batch."""
        from transformers import DataCollatorWithPadding
        return DataCollatorWithPadding(tokenizer)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def data_root(data_dir: str | None) -> Path | None:
    """--data-dir, else $DEPTHMIX_DATA, else None (load from the Hub)."""
    root = data_dir or os.environ.get("DEPTHMIX_DATA")
    return Path(root) if root else None


def find_file(root: Path, *candidates: str) -> Path | None:
    """The first candidate relative path that exists under root (callers pass layouts with and without a
    leading folder, so both `--data-dir shared/data` and `--data-dir shared/data/glue` work)."""
    for c in candidates:
        if (root / c).exists():
            return root / c
    return None


def read_text(path: Path) -> str:
    """A data file's text; an empty or non-UTF-8 file is a DataError naming the file and the line."""
    data = Path(path).read_bytes()
    if not data.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(not_utf8(path, e)) from None


def check_table(path: Path, delimiter: str, header: bool, quoted: bool) -> None:
    """Every line of a TSV/CSV file has as many fields as the first one (pandas reports a ragged line without
    its file, or reads a missing field as empty), and a file with a header has a row under it."""
    import csv
    import io
    text = read_text(path)
    if quoted:
        reader = csv.reader(io.StringIO(text), delimiter=delimiter)
        rows = [(reader.line_num, len(fields)) for fields in reader if fields]
    else:
        rows = [(n + 1, line.count(delimiter) + 1) for n, line in enumerate(lines(text)) if line.strip()]
    first, width = rows[0]
    for line, count in rows[1:]:
        if count != width:
            raise DataError(f"{path}: line {line}: {count} fields, but line {first} has {width}"
                            f"{' (the header)' if header else ''}")
    if header and len(rows) < 2:
        raise DataError(f"{path}: only a header line, no rows")


def lines(text: str) -> list[str]:
    """The lines of a data file's text, split where pandas and the csv module split them."""
    return LINE_BREAK.split(text)


def locate(task: str, data_dir, *candidates: str) -> Path | None:
    """The local file of a task, None when no data folder is given (load from the Hub)."""
    root = data_root(data_dir)
    if root is None:
        return None
    path = find_file(root, *candidates)
    if path is None:
        raise DataError(f"{task}: none of {list(candidates)} under {root}")
    return path


def hub(task: str, repo: str, config: str | None, split: str, **kwargs) -> datasets.Dataset:
    try:
        return datasets.load_dataset(repo, config, split=split, **kwargs)
    except Exception as e:
        raise DataError(f"{task}: cannot load {repo}{'/' + config if config else ''} ({split}) from the Hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "pass --data-dir or set DEPTHMIX_DATA to read local files") from None


class CausalCollator:
    """Right-pads input_ids with the pad id, attention_mask with 0 and labels with -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        n = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            k = n - len(f["input_ids"])
            out["input_ids"].append(list(f["input_ids"]) + [self.pad_id] * k)
            out["attention_mask"].append(list(f.get("attention_mask") or [1] * len(f["input_ids"])) + [0] * k)
            out["labels"].append(list(f.get("labels", f["input_ids"])) + [-100] * k)
        return {key: torch.tensor(v, dtype=torch.long) for key, v in out.items()}


def subsample(ds: datasets.Dataset, max_samples: int | None, seed: int) -> datasets.Dataset:
    if max_samples is None or max_samples >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(max_samples))
