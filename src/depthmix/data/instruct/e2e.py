"""E2E NLG: restaurant meaning representations to text, scored against all references of each MR.

Task: e2e. Local files: e2e/devset.csv trains (the E2E train split is not in the shared data: the dev set
stands in for it) and e2e/testset_w_refs.csv evaluates; both `mr,ref` with one row per reference. From the Hub
(tuetschek/e2e_nlg: meaning_representation, human_reference) the real train split trains and test evaluates.
Evaluation rows group the references of each MR (630 MRs, 1-45 references each, in the test set).

Metrics (the "nlg" scorer of depthmix.evaluation: greedy generation, max_new_tokens default 64, text lowercased,
13a tokenisation):
* bleu: sacrebleu corpus BLEU over all references, 0-100.
* nist: nltk corpus_nist, n=5.
* rouge_l: rouge-score ROUGE-L F1, best reference per MR, averaged, 0-100.
* meteor: nltk meteor_score (best reference per MR, averaged, 0-100) ONLY when nltk's WordNet data is
  installed (`python -m nltk.downloader wordnet` where the network allows). No PyPI package ships the WordNet
  corpus for nltk, and Debian's wordnet-base lacks the `lexnames` file nltk reads, so offline it is left out.
  nltk's METEOR also differs from the official Java METEOR 1.5 used by the E2E scripts.
* cider: CIDEr-D from pycocoevalcap ONLY when that package is installed (`pip install pycocoevalcap`): it
  is the implementation the E2E scripts use, but unmaintained since 2020 and a ~100 MB wheel (bundled Java
  jars), so depthmix does not depend on it. No maintained library provides CIDEr.
A metric that cannot be computed is omitted from the result and named in a warning.
Numbers are close to, not identical with, the official e2e-metrics scripts (tokenisation differs).
"""
from __future__ import annotations

import logging

from ..tasks import hub, locate, register
from .common import InstructTask, prompt, read_records, to_rows

log = logging.getLogger(__name__)
INSTRUCTION = "Write a short restaurant description that expresses every attribute of the meaning representation."


def e2e_row(rec) -> dict | str:
    mr, ref = str(rec["mr"]).strip(), str(rec["ref"]).strip()
    if not mr:
        return "field 'mr' is empty"
    if not ref:
        return "field 'ref' is empty"
    return {"mr": mr, "prompt": prompt(INSTRUCTION, mr), "target": ref}


def group(rows) -> list[dict]:
    refs: dict[str, dict] = {}
    for r in rows:
        entry = refs.setdefault(r["mr"], {"mr": r["mr"], "prompt": r["prompt"], "target": r["target"], "refs": []})
        entry["refs"].append(r["target"])
    return list(refs.values())


class E2E(InstructTask):
    name = "e2e"
    scorer = "nlg"
    metric = "bleu"
    max_new_tokens = 64

    def read(self, split, data_dir):
        file = "devset.csv" if split == "train" else "testset_w_refs.csv"
        path = locate(self.name, data_dir, f"e2e/{file}", file)
        if path is not None:
            rows = to_rows(self.name, read_records(path, ["mr", "ref"]), e2e_row, path)
        else:
            records = hub(self.name, "tuetschek/e2e_nlg", None, "train" if split == "train" else "test")
            rows = to_rows(self.name, ({"mr": r["meaning_representation"], "ref": r["human_reference"]}
                                       for r in records), e2e_row, "tuetschek/e2e_nlg")
        if split == "eval":
            import datasets
            rows = datasets.Dataset.from_list(group(rows))
        return rows


register(E2E())
