"""Evaluation beyond the task registry: lm-evaluation-harness tasks on depthmix models (lm_eval.py)."""
