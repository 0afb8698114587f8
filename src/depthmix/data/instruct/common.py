"""What the instruction-tuning tasks share: the Alpaca prompt, reading and checking local record files and
prompt-masked encoding."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets

from ..tasks import CausalCollator, DataError, Task, check_table, lines, read_text, subsample

log = logging.getLogger(__name__)

# LLM-Adapters' template (Alpaca's), without the stray indentation of their source.
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
STOP = "\n### "  # the model starts a new prompt: the response is over


def prompt(instruction: str, input: str | None = None) -> str:
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


# -- files ------------------------------------------------------------------------------------------------
def where(path, i: int) -> str:
    """How a message names record i of a file: its line in JSON lines and CSV, its index in a JSON list."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return f"{path}: line {i + 1}"
    if path.suffix == ".csv":
        return f"{path}: line {i + 2}"  # after the header
    return f"{path}: record {i}"


def read_records(path, fields: list[str]) -> datasets.Dataset:
    """A JSON list / JSON lines / CSV file through `datasets`, every field present and not null."""
    path = Path(path)
    kind = "csv" if path.suffix == ".csv" else "json"
    if kind == "csv":
        check_table(path, ",", header=True, quoted=True)
    else:
        read_text(path)
    kwargs = {"keep_default_na": False} if kind == "csv" else {}
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as e:
        raise DataError(_diagnose(path, fields) or f"{path}: cannot be read as {kind.upper()}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for field in fields:
        if field not in ds.column_names:
            raise DataError(f"{where(path, 0)}: missing field {field!r} (found {ds.column_names})")
        for i, value in enumerate(ds[field]):
            if value is None:
                raise DataError(f"{where(path, i)}: field {field!r} is missing")
            if not isinstance(value, (str, int, float)):  # datasets keeps mixed-type fields as Json values
                raise DataError(f"{where(path, i)}: field {field!r} is {value!r}; expected a string")
    return ds


def _diagnose(path: Path, fields) -> str | None:
    """Why `datasets` could not read a JSON file, record by record (it reports only a byte offset)."""
    if path.suffix == ".csv":
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix == ".jsonl":
            records = []
            for n, line in enumerate(lines(text)):
                if line.strip():
                    try:
                        records.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        return f"{path}: line {n + 1}: not valid JSON ({e.msg})"
        else:
            records = list(enumerate(json.loads(text)))
    except json.JSONDecodeError as e:
        return f"{path}: line {e.lineno}: not valid JSON ({e.msg})"
    except TypeError:
        return f"{path}: expected a JSON list of records"
    for i, rec in records:
        if not isinstance(rec, dict):
            return f"{where(path, i)}: expected an object, got {type(rec).__name__}"
        for field in fields:
            if field not in rec or rec[field] is None:
                return f"{where(path, i)}: field {field!r} is missing"
            if not isinstance(rec[field], (str, int, float)):
                return f"{where(path, i)}: field {field!r} is {rec[field]!r}; expected a string"
    return None


def to_rows(task: str, records, convert, source) -> datasets.Dataset:
    """Applies convert(record) -> row dict, None (skip it) or an error message to every record; the first
    error is raised naming `source` and the record."""
    out, skipped = [], 0
    for i, rec in enumerate(records):
        row = convert(rec)
        if isinstance(row, str):
            raise DataError(f"{where(source, i) if isinstance(source, Path) else f'{source}: record {i}'}: {row}")
        if row is None:
            skipped += 1
        else:
            out.append(row)
    if skipped:
        log.warning("%s: %d records of %s skipped (empty response)", task, skipped, source)
    if not out:
        raise DataError(f"{task}: {source} holds no records")
    return datasets.Dataset.from_list(out)


# -- model inputs -----------------------------------------------------------------------------------------
def pair_ids(tokenizer, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and response token ids, tokenised apart so the boundary is the same in training and scoring."""
    p = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    r = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return p, r


class InstructTask(Task):
    """Rows carry `prompt` (the full Alpaca prompt) and `target` (the response trained on)."""

    head = "causal_lm"
    max_new_tokens = 256

    def load(self, split, data_dir=None, max_samples=None, seed=0):
        if split not in ("train", "eval"):
            raise ValueError(f"{self.name}: unknown split {split!r} (use 'train' or 'eval')")
        return subsample(self.read(split, data_dir), max_samples, seed)

    def read(self, split: str, data_dir) -> datasets.Dataset:
        raise NotImplementedError

    def encode(self, rows, tokenizer, max_length):
        eos = tokenizer.eos_token_id

        def enc(batch):
            ps, rs = pair_ids(tokenizer, batch["prompt"], batch["target"])
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for p, r in zip(ps, rs):
                r = r + [eos]
                ids = (p + r)[:max_length]
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(([-100] * len(p) + r)[:max_length])
            return out

        enc_rows = rows.map(enc, batched=True, remove_columns=rows.column_names, desc=f"tokenizing {self.name}")
        keep = [i for i, labels in enumerate(enc_rows["labels"]) if any(x != -100 for x in labels)]
        if len(keep) < len(enc_rows):
            log.warning("%s: %d of %d examples dropped: the prompt alone fills max_length=%d",
                        self.name, len(enc_rows) - len(keep), len(enc_rows), max_length)
            enc_rows = enc_rows.select(keep)
        return enc_rows

    def collator(self, tokenizer):
        return CausalCollator(tokenizer.pad_token_id)
