"""Log-likelihood of continuations after prompts, as lm-eval scores multiple-choice options."""
from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm

from ..data.instruct.common import pair_ids
from ..runtime import device_of, evaluating
from .generation import left_pad

LOGITS_BUDGET = 2 ** 27  # float32 logits kept per forward (512 MiB): caps the rows per batch of long vocabularies


@torch.no_grad()
def loglik(model, tokenizer, prompts: list[str], continuations: list[str], batch_size: int = 8,
           max_length: int = 256, progress: bool = True, desc: str = "scoring") -> list[tuple[float, int]]:
    """(sum of log p(continuation token | prompt, previous tokens), number of continuation tokens) per pair.

    Pairs whose token sequences differ only in the last token (the options of a question: "... answer1",
    "... answer2") share one forward pass, as lm_eval's logits cache does. Sequences are left-padded with
    position ids counted from the first real token, so padding does not change a score; only the last
    positions' logits are asked for (logits_to_keep) when the model supports it. A model that takes
    `prompt_mask` (a DepthMixModel) is told where each prompt ends, so that routing decided per sequence
    (MoLEx) sees the prompt only, never the continuation it scores."""
    ps, cs = pair_ids(tokenizer, prompts, continuations)
    seqs = []
    for p, c in zip(ps, cs):
        if not c:
            raise ValueError(f"empty continuation for prompt {tokenizer.decode(p)[-60:]!r}")
        seqs.append((p + c)[-max(max_length, len(c) + 1):])
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(tuple(s[:-1]), []).append(i)
    keys = list(groups)
    need = [max(len(cs[i]) for i in groups[key]) for key in keys]  # logits wanted at the end of each key
    order = sorted(range(len(keys)), key=lambda g: -len(keys[g]))
    device = device_of(model)
    params = inspect.signature(model.forward).parameters
    keep_arg, prompt_arg = "logits_to_keep" in params, "prompt_mask" in params
    vocab = model.get_output_embeddings().weight.shape[0]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    with evaluating(model):
        bar = tqdm(total=len(seqs), desc=desc, disable=not progress)
        start = 0
        while start < len(order):
            k = max(need[g] for g in order[start:start + batch_size])
            chunk = order[start:start + max(1, min(batch_size, LOGITS_BUDGET // (k * vocab)))]
            k = max(need[g] for g in chunk)
            ids, mask = left_pad([list(keys[g]) for g in chunk], tokenizer.pad_token_id, device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            extra = {"logits_to_keep": k} if keep_arg else {}
            if prompt_arg:  # a row's prompt runs through its first scored position, column width - need[g]
                ends = ids.shape[1] + 1 - torch.tensor([need[g] for g in chunk], device=device)
                extra["prompt_mask"] = mask.bool() & (torch.arange(ids.shape[1], device=device) < ends[:, None])
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **extra).logits[:, -k:]
            logp = torch.log_softmax(logits.float(), dim=-1)
            for row, g in enumerate(chunk):
                for i in groups[keys[g]]:
                    c = len(cs[i])
                    target = torch.tensor(seqs[i][-c:], device=device)
                    results[i] = (float(logp[row, k - c:].gather(-1, target[:, None]).sum()), c)
                    bar.update(1)
            start += len(chunk)
        bar.close()
    return results
