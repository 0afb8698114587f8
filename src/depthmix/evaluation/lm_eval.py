"""lm-evaluation-harness on depthmix models: `hflm()` wraps a loaded model for `lm_eval.simple_evaluate`.

lm_eval's HFLM takes an already-built model as `pretrained` and then uses only `model(input_ids).logits`,
`model.generate(...)`, `.config`, `.device`, `.eval()` and `.tie_weights()`. A DepthMixModel provides all of
them (attributes it lacks come from its base model), so it is passed itself, not its base model: scoring and
generation then run through the method (ensembles, routing) and its generate() (no KV cache for methods
that cannot use one). Plain HF models are passed as they are. See docs/lm-eval.md.
"""
from __future__ import annotations

from pathlib import Path


def hflm(model, tokenizer, batch_size: int | str = 8, max_length: int | None = None, **kwargs):
    """An lm_eval HFLM over a DepthMixModel or a transformers causal LM, in eval mode."""
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedModel

    from ..model import DepthMixModel
    base = model.base_model if isinstance(model, DepthMixModel) else model
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"expected a DepthMixModel or a transformers PreTrainedModel, got {type(model).__name__}")
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                backend="causal", **kwargs)


def task_manager(tasks: list[str], include_path: str | Path | list | None = None):
    """lm_eval's TaskManager; indexing lm_eval's own ~15k task configs takes half a minute, so it is skipped
    when every requested task is found under include_path."""
    from lm_eval.tasks import TaskManager
    if include_path is not None:
        own = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in own.all_tasks for t in tasks):
            return own
    return TaskManager(include_path=include_path)


def evaluate(model, tokenizer, tasks: list[str] | str, include_path=None, num_fewshot: int | None = None,
             limit: int | float | None = None, batch_size: int | str = 8, max_length: int | None = None,
             log_samples: bool = False, bootstrap_iters: int = 0, **kwargs) -> dict:
    """lm_eval.simple_evaluate on a loaded model; returns its results dict ("results", "samples" when logged).

    bootstrap_iters=0 skips the bootstrap standard errors (slow on CPU); pass e.g. 1000 to get them."""
    from lm_eval import simple_evaluate
    tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    return simple_evaluate(model=hflm(model, tokenizer, batch_size, max_length), tasks=tasks,
                           task_manager=task_manager(tasks, include_path), num_fewshot=num_fewshot, limit=limit,
                           log_samples=log_samples, bootstrap_iters=bootstrap_iters, **kwargs)
