"""The premise MoDE rests on, measured: how well each ensembled layer predicts through its own norm and the shared
head (a logit lens), and how often a shallower layer is right where the final one is wrong."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def layer_lens(model, batches) -> dict:
    """Per ensembled layer of a MoDE model (`model`: a DepthMixModel), over the labelled tokens of `batches` (dicts of
    input_ids, attention_mask, labels with -100 where unscored, as a causal LM takes them):
    nll (mean per token), accuracy (top-1), right_where_final_wrong (share of tokens this layer gets right and the
    final layer wrong: the paper's complementarity), and oracle_accuracy (share some ensembled layer gets right).
    The shallower layers go through MoDE's norms (as trained, or copies of the final norm before training), the
    final layer through the model's own; the model runs with MoDE bypassed, so nothing is mixed."""
    method = model.method
    arch, k = method.arch, len(method.layers)
    device = next(model.parameters()).device
    outputs: dict[int, torch.Tensor] = {}
    hooks = [arch.blocks[t].register_forward_hook(
        lambda mod, args, out, i=i: outputs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i, t in enumerate(method.layers)]
    nll, right = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    beyond, oracle, count = torch.zeros(k, dtype=torch.float64), 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with method.bypassed():
            for batch in batches:
                batch = {key: v.to(device) for key, v in batch.items()}
                labels = batch.pop("labels")
                model.base_model(**batch)
                target = labels[:, 1:]
                scored = target != -100
                target = target[scored]
                correct = []
                for i in range(k):
                    hidden = outputs[i][:, :-1][scored].float()
                    norm = method.norms[i] if i < k - 1 else arch.norm
                    logits = arch.head(norm(hidden.to(_dtype(norm))).to(_dtype(arch.head))).float()
                    nll[i] += F.cross_entropy(logits, target, reduction="sum").double().cpu()
                    correct.append((logits.argmax(-1) == target).cpu())
                final = correct[-1]
                for i, c in enumerate(correct):
                    right[i] += c.sum()
                    beyond[i] += (c & ~final).sum()
                oracle += torch.stack(correct).any(0).sum().item()
                count += int(target.numel())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = max(count, 1)
    return {"layers": list(method.layers), "tokens": count, "nll": (nll / n).tolist(),
            "accuracy": (right / n).tolist(), "right_where_final_wrong": (beyond / n).tolist(),
            "oracle_accuracy": oracle / n}


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype
