"""Batched greedy generation for scoring: left-padded prompts, each continuation cut where the model starts a new
prompt."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..data.instruct.common import STOP
from ..runtime import device_of, evaluating


def left_pad(seqs: list[list[int]], pad_id: int, device):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s):] = torch.tensor(s)
            mask[i, n - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], batch_size: int = 8, max_length: int = 256,
             max_new_tokens: int = 256, progress: bool = True, desc: str = "generating") -> list[str]:
    """Greedy continuations of left-padded prompt batches (prompts longer than max_length keep their end);
    each output is cut at the first STOP."""
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    ids = [s[-max_length:] for s in ids]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: less padding
    texts: list[str] = [""] * len(ids)
    device = device_of(model)
    pad = tokenizer.pad_token_id
    with evaluating(model):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
            chunk = order[start:start + batch_size]
            input_ids, mask = left_pad([ids[i] for i in chunk], pad, device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 stop_strings=[STOP], tokenizer=tokenizer)
            for i, seq in zip(chunk, tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)):
                texts[i] = seq.split(STOP)[0].strip()
    return texts
