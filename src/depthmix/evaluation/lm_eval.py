"""lm-evaluation-harness on depthmix models: `hflm()` wraps a loaded model for `lm_eval.simple_evaluate`.

lm_eval's HFLM takes an already-built model as `pretrained` and then uses only `model(input_ids).logits`,
`model.generate(...)`, `.config`, `.device`, `.eval()` and `.tie_weights()`. A DepthMixModel provides all of
them (attributes it lacks come from its base model), so it is passed itself, not its base model: scoring and
generation then run through the method (ensembles, routing) and its generate() (no KV cache for methods
that cannot use one). Plain HF models are passed as they are. See docs/lm-eval.md.

HFLM scores a request by running context + continuation (less its last token) and calls the model with the
token ids alone; a DepthMixModel is wrapped in `DepthMixLM`, which also passes where each row's context ends
(`prompt_mask`), so that MoLEx's per-sequence routing is decided by the context, never by the continuation.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch


def hflm(model, tokenizer, batch_size: int | str = 8, max_length: int | None = None, **kwargs):
    """An lm_eval HFLM over a DepthMixModel or a transformers causal LM, in eval mode."""
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedModel

    from ..depthmix_model import DepthMixModel
    base = model.base_model if isinstance(model, DepthMixModel) else model
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"expected a DepthMixModel or a transformers PreTrainedModel, got {type(model).__name__}")
    model.eval()
    cls = lm_class() if isinstance(model, DepthMixModel) else HFLM
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                backend="causal", **kwargs)


@functools.cache
def lm_class():
    """HFLM that tells the model, per scored row, where the context ends (lm_eval is imported on first use)."""
    from lm_eval.models.huggingface import HFLM

    class DepthMixLM(HFLM):
        _prompts: dict = {}

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            self._prompts = prompt_lengths(requests, self.max_length)
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                self._prompts = {}

        def _model_call(self, inps, attn_mask=None, labels=None):
            if not self._prompts or attn_mask is not None or labels is not None:
                return super()._model_call(inps, attn_mask, labels)
            dtype = getattr(self, "mixed_precision_dtype", None)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None):
                return self.model(inps, prompt_mask=prompt_mask(inps, self._prompts)).logits

    return DepthMixLM


def prompt_lengths(requests, max_length: int) -> dict[tuple, int]:
    """For each input row HFLM will build (context + continuation, cut as it cuts them, less the last token):
    how many of its tokens precede the first scored position's target, i.e. the context the row may decide on.
    A row built by two requests keeps the shorter context, which is safe for both."""
    out: dict[tuple, int] = {}
    for _, context, continuation in requests:
        row = tuple((list(context) + list(continuation))[-(max_length + 1):][:-1])
        n = len(row) - len(continuation) + 1
        out[row] = min(n, out.get(row, n))
    return out


def prompt_mask(inps: torch.Tensor, prompts: dict[tuple, int]) -> torch.Tensor:
    """[B, W] bool from HFLM's right-padded (with 0) batch: True on each row's context. The pad id may also be a
    real token, so every length from the unpadded one up is looked up; a row found under several lengths keeps
    the shortest context; a row not found gets none (the model then decides on its first token)."""
    rows = inps.tolist()
    width = inps.shape[1]
    ends = []
    for row in rows:
        n = len(row)
        while n > 0 and row[n - 1] == 0:
            n -= 1
        found = [prompts[key] for key in (tuple(row[:m]) for m in range(n, width + 1)) if key in prompts]
        ends.append(min(found, default=0))
    return torch.arange(width, device=inps.device)[None] < torch.tensor(ends, device=inps.device)[:, None]


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
