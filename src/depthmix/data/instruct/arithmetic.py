"""Arithmetic reasoning: GSM8K and LLM-Adapters' test sets, scored by generation + answer extraction.

Tasks: gsm8k, svamp, addsub, multiarith, singleeq, mawps, aqua, reasoning/math.

* gsm8k trains on GSM8K train (gsm8k/train.jsonl or openai/gsm8k) and evaluates on GSM8K test. The worked
  answers lose their calculator annotations (<<48/2=24>>) and end with "The answer is N." instead of "#### N",
  the form of LLM-Adapters' targets.
* svamp ... aqua evaluate on LLM-Adapters' reasoning/<name>_test.json and train on reasoning/math_train.json
  (LLM-Adapters' recipe: one arithmetic training set, every test set), as does reasoning/math, which evaluates
  on GSM8K test.
* Scoring (the "answer" scorer of depthmix.evaluation) follows LLM-Adapters' evaluate.py: greedy generation
  (max_new_tokens, default 256) after the Alpaca prompt, the response cut at the first "\\n### ", the last
  number in it (commas removed) compared with the answer within 0.001; no number counts as wrong. For AQuA the
  option letter: the last "answer is (X)" or "(X)", else (LLM-Adapters' rule) the first capital A-E in the
  response.
* Hub sources: openai/gsm8k, ChilleD/SVAMP (train+test = the 1,000 problems), ChilleD/MultiArith (train+test),
  deepmind/aqua_rat (raw, test). AddSub, SingleEq, MAWPS and math_train have no Hub copy in this form: they need
  --data-dir / $DEPTHMIX_DATA.
"""
from __future__ import annotations

import re

from ..tasks import DataError, hub, locate, register
from .common import InstructTask, prompt, read_records, to_rows

CALC = re.compile(r"<<[^>]*>>")


def parse_number(text) -> float | None:
    try:
        return float(str(text).replace(",", "").strip())
    except ValueError:
        return None


# -- rows -------------------------------------------------------------------------------------------------
def gsm8k_row(rec) -> dict | str:
    answer = str(rec["answer"])
    if "####" not in answer:
        return "field 'answer' has no final '#### <number>'"
    body, final = answer.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if parse_number(final) is None:
        return f"field 'answer' ends with {final!r} after '####'; expected a number"
    target = CALC.sub("", body).strip() + f"\nThe answer is {final}."
    return {"prompt": prompt(str(rec["question"]).strip()), "target": target, "answer": final}


def adapters_row(letter: bool | None, need_output: bool):
    """A record of LLM-Adapters' json form: instruction, input, output, answer (a number, an option letter
    when `letter`, either when `letter` is None: the training set mixes AQuA problems in)."""
    def convert(rec) -> dict | str:
        answer = str(rec["answer"]).strip()
        is_letter, is_number = answer in ("A", "B", "C", "D", "E"), parse_number(answer) is not None
        if letter and not is_letter:
            return f"field 'answer' is {answer!r}; expected an option letter A-E"
        if letter is False and not is_number:
            return f"field 'answer' is {answer!r}; expected a number"
        if letter is None and not (is_letter or is_number):
            return f"field 'answer' is {answer!r}; expected a number or an option letter A-E"
        output = str(rec.get("output") or "").strip()
        if need_output and not output:
            return None  # a few records of the real math_train.json have no worked answer: nothing to learn
        return {"prompt": prompt(str(rec["instruction"]).strip(), str(rec.get("input") or "").strip()),
                "target": output, "answer": answer}
    return convert


def svamp_hub(rec):
    return {"instruction": f"{rec['Body'].strip()} {rec['Question'].strip()}", "answer": str(rec["Answer"])}


def multiarith_hub(rec):
    return {"instruction": rec["question"].strip(), "answer": str(rec["final_ans"])}


def aqua_hub(rec):
    options = " ".join(f"({o.split(')', 1)[0].strip()}) {o.split(')', 1)[-1].strip()}" for o in rec["options"])
    return {"instruction": f"{rec['question'].strip()} Answer Choices: {options}", "answer": rec["correct"].strip()}


HUB = {  # name: (repo, config, split, record -> LLM-Adapters record)
    "svamp": ("ChilleD/SVAMP", None, "train+test", svamp_hub),
    "multiarith": ("ChilleD/MultiArith", None, "train+test", multiarith_hub),
    "aqua": ("deepmind/aqua_rat", "raw", "test", aqua_hub),
}


def read_gsm8k(task: str, split: str, data_dir):
    file = "train.jsonl" if split == "train" else "test.jsonl"
    path = locate(task, data_dir, f"gsm8k/{file}", file)
    if path is None:
        records, source = hub(task, "openai/gsm8k", "main", "train" if split == "train" else "test"), "openai/gsm8k"
    else:
        records, source = read_records(path, ["question", "answer"]), path
    return to_rows(task, records, gsm8k_row, source)


def read_math_train(task: str, data_dir):
    path = locate(task, data_dir, "reasoning/math_train.json", "math_train.json")
    if path is None:
        raise DataError(f"{task}: the arithmetic training set (LLM-Adapters' math_train.json) has no Hub copy; "
                        "pass --data-dir or set DEPTHMIX_DATA (or train on --task gsm8k)")
    return to_rows(task, read_records(path, ["instruction", "output", "answer"]), adapters_row(None, True), path)


# -- tasks ------------------------------------------------------------------------------------------------
class Arithmetic(InstructTask):
    """letter: the answer is an option letter (AQuA), not a number."""

    scorer = "answer"
    metric = "accuracy"
    max_new_tokens = 256

    def __init__(self, name: str, stem: str, letter: bool = False):
        self.name, self.stem, self.letter = name, stem, letter

    def read(self, split, data_dir):
        if split == "train":
            return read_math_train(self.name, data_dir)
        path = locate(self.name, data_dir, f"reasoning/{self.stem}_test.json", f"{self.stem}_test.json")
        convert = adapters_row(self.letter, False)
        if path is not None:
            return to_rows(self.name, read_records(path, ["instruction", "answer"]), convert, path)
        if self.name not in HUB:
            raise DataError(f"{self.name}: no Hub copy of LLM-Adapters' {self.stem}_test.json is known; "
                            "pass --data-dir or set DEPTHMIX_DATA")
        repo, config, hub_split, to_record = HUB[self.name]
        records = hub(self.name, repo, config, hub_split)
        return to_rows(self.name, (to_record(r) for r in records), convert, repo)


class GSM8K(Arithmetic):
    def __init__(self):
        super().__init__("gsm8k", "gsm8k")

    def read(self, split, data_dir):
        return read_gsm8k(self.name, split, data_dir)


class MathTrain(Arithmetic):
    """reasoning/math: LLM-Adapters' arithmetic training set; evaluated on GSM8K test (other test sets:
    `depthmix eval --adapter DIR --task svamp`)."""

    def __init__(self):
        super().__init__("reasoning/math", "math")

    def read(self, split, data_dir):
        if split == "train":
            return read_math_train(self.name, data_dir)
        return read_gsm8k(self.name, "eval", data_dir)


register(GSM8K())
register(MathTrain())
for _name, _stem in [("svamp", "SVAMP"), ("addsub", "AddSub"), ("multiarith", "MultiArith"),
                     ("singleeq", "SingleEq"), ("mawps", "mawps"), ("aqua", "AQuA")]:
    register(Arithmetic(_name, _stem, letter=_name == "aqua"))
