"""Scoring models: a task's metrics (scorers.py: generation, log-likelihood, classification, perplexity), held-out
NLL, lm-evaluation-harness tasks (lm_eval.py), routing statistics (routing.py), comparing arms (compare.py)."""
from .perplexity import heldout_nll, perplexity, response_nll
from .scorers import SCORERS, evaluate, scorer

__all__ = ["SCORERS", "evaluate", "heldout_nll", "perplexity", "response_nll", "scorer"]
