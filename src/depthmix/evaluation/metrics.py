"""Metrics computed from a model's outputs: GLUE's official ones, E2E NLG's, and LLM-Adapters' answer extraction."""
from __future__ import annotations

import re
import warnings

import numpy as np

NUMBER = re.compile(r"-?\d+\.?\d*")
TOLERANCE = 1e-3


def accuracy(correct: list[bool]) -> float:
    return float(sum(correct) / len(correct)) if correct else 0.0


def glue_metrics(names, preds, labels) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef
    fns = {
        "accuracy": lambda: float((preds == labels).mean()),
        "f1": lambda: float(f1_score(labels, preds)),
        "matthews_correlation": lambda: float(matthews_corrcoef(labels, preds)),
        "pearson": lambda: float(pearsonr(preds, labels)[0]),
        "spearman": lambda: float(spearmanr(preds, labels)[0]),
    }
    return {n: fns[n]() for n in names}


# -- arithmetic answers (LLM-Adapters' evaluate.py) ---------------------------------------------------------------
def extract_number(text: str) -> float | None:
    """LLM-Adapters: the last number of the response, commas removed."""
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def extract_letter(text: str) -> str | None:
    for pattern in (r"answer is:?\s*\(?([A-E])\b", r"\(([A-E])\)"):
        found = re.findall(pattern, text)
        if found:
            return found[-1]
    found = re.findall(r"A|B|C|D|E", text)  # LLM-Adapters' rule
    return found[0] if found else None


def is_correct(pred, answer: str, letter: bool) -> bool:
    if pred is None:
        return False
    if letter:
        return pred == answer
    return abs(pred - float(answer.replace(",", ""))) <= TOLERANCE


# -- E2E NLG ------------------------------------------------------------------------------------------------------
def e2e_metrics(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """BLEU, NIST, ROUGE-L (and METEOR, CIDEr where their data / package is installed) of hypotheses against every
    reference of their meaning representation; text lowercased, 13a tokenisation."""
    import sacrebleu
    from nltk.translate.nist_score import corpus_nist
    from rouge_score import rouge_scorer
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tok = Tokenizer13a()

    def words(s: str) -> list[str]:
        return tok(s.lower().strip()).split()

    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(max(len(r) for r in refs))]
    out = {"bleu": float(sacrebleu.corpus_bleu(hyps, streams, lowercase=True).score)}
    hyp_words, ref_words = [words(h) for h in hyps], [[words(x) for x in r] for r in refs]
    try:
        out["nist"] = float(corpus_nist(ref_words, hyp_words, n=5))
    except ZeroDivisionError:  # every hypothesis empty
        out["nist"] = 0.0
    meteor = _meteor(hyp_words, ref_words)
    if meteor is not None:
        out["meteor"] = meteor
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    out["rouge_l"] = 100 * float(np.mean([scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]))
    cider = _cider(hyp_words, ref_words)
    if cider is not None:
        out["cider"] = cider
    return out


def _meteor(hyp_words, ref_words) -> float | None:
    from nltk.translate.meteor_score import meteor_score
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
    except Exception:  # LookupError, or nltk refusing a path
        warnings.warn("e2e: METEOR left out: nltk's WordNet data is not installed "
                      "(python -m nltk.downloader wordnet)", stacklevel=3)
        return None
    return 100 * float(np.mean([meteor_score(r, h) for h, r in zip(hyp_words, ref_words)]))


def _cider(hyp_words, ref_words) -> float | None:
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        warnings.warn("e2e: CIDEr left out: pycocoevalcap is not installed (pip install pycocoevalcap)",
                      stacklevel=3)
        return None
    gts = {i: [" ".join(x) for x in r] for i, r in enumerate(ref_words)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyp_words)}
    return float(Cider().compute_score(gts, res)[0])
