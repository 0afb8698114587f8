"""Router tuning of a retrofit MoD model (update="retrofit") on plain text, with the dense model as teacher.

The teacher is the same model with routing bypassed (Method.bypassed: every routed block runs as it was), under
no_grad: no second copy of the weights. The loss ("distill") is the per-token KL(dense || routed) over the
vocabulary, averaged over real tokens, plus MoD's predictor BCE (its auxiliary loss); "lm" is the plain LM loss
(+ the same BCE). Only the method's parameters (routers, predictors) are meant to train.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...runtime import device_of

LOSSES = ("distill", "lm")


def method_of(model):
    """The MoD method of a DepthMixModel, also inside a DDP/FSDP wrapper."""
    return getattr(model, "module", model).method


def token_kl(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens of KL(softmax(teacher) || softmax(student)), logits [B, S, V]."""
    t = F.log_softmax(teacher.float(), dim=-1)
    s = F.log_softmax(student.float(), dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if mask is None:
        return kl.mean()
    w = mask.to(kl.dtype)
    return (kl * w).sum() / w.sum().clamp(min=1)


def retrofit_loss(model, inputs: dict, kind: str = "distill"):
    """(loss, outputs) of one training batch (input_ids, attention_mask[, labels])."""
    if kind not in LOSSES:
        raise ValueError(f"retrofit loss {kind!r}: expected one of {LOSSES}")
    if kind == "lm":
        out = model(**inputs)
        return out.loss, out
    method = method_of(model)
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    with torch.no_grad(), method.bypassed():
        teacher = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    loss = token_kl(teacher, out.logits, mask)
    for aux in method.aux:  # the predictor's BCE (added to outputs.loss only when there are labels)
        loss = loss + aux.to(loss.dtype)
    out.loss = loss
    return loss, out


def tune(model, blocks: torch.Tensor, steps: int, batch: int = 4, lr: float = 1e-2, loss: str = "distill",
         seed: int = 0, progress: bool = True) -> list[float]:
    """`steps` AdamW steps on the routers and predictors only, on random batches of `blocks` [N, S]; the losses."""
    from tqdm.auto import tqdm
    method = method_of(model)
    device = device_of(model)
    g = torch.Generator().manual_seed(seed)
    params = list(method.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=f"tuning routers ({loss})", disable=not progress):
        ids = blocks[torch.randint(len(blocks), (batch,), generator=g)].to(device)
        value, _ = retrofit_loss(model, {"input_ids": ids, "labels": ids}, loss)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    for p in params:
        p.requires_grad_(False)
    model.eval()
    return losses


def fit_predictors(model, blocks: torch.Tensor, batches: int, batch: int = 4, seed: int = 0, progress: bool = True,
                   epochs: int = 30, lr: float = 3e-3) -> None:
    """Fit each causal predictor to its block's top-k membership (the sink rule included) on the block inputs of
    `batches` forward passes (top-k routing, no gradients): the targets of training, for a fraction of its cost."""
    from tqdm.auto import tqdm
    method = method_of(model)
    device = device_of(model)
    g = torch.Generator().manual_seed(seed)
    seen = collect_inputs(model, blocks, batches, batch, g, progress)
    for i in tqdm(range(len(method.layers)), desc="fitting predictors", disable=not progress):
        x = torch.cat(seen.pop(i)).float().to(device)
        y = topk_targets(method, i, x)
        fit(method.predictors[i], x.flatten(0, 1), y.flatten(), epochs, lr, g)


def collect_inputs(model, blocks, batches, batch, g, progress) -> dict[int, list[torch.Tensor]]:
    """{routed block i: [its input hidden states, one [b, S, d] tensor per forward]} under top-k routing."""
    from tqdm.auto import tqdm
    method = method_of(model)
    device = device_of(model)
    seen = {i: [] for i in range(len(method.layers))}
    hooks = [routed(model, i).register_forward_pre_hook(
        lambda m, a, kw, i=i: seen[i].append((a[0] if a else kw["hidden_states"]).detach().cpu()) and None,
        with_kwargs=True) for i in range(len(method.layers))]
    model.eval()
    try:
        with torch.no_grad(), method.routing_mode("topk"):
            for _ in tqdm(range(batches), desc="collecting hidden states", disable=not progress):
                model(input_ids=blocks[torch.randint(len(blocks), (batch,), generator=g)].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def routed(model, i: int):
    """The module MoD routes as its i-th routed block (the block, or its sub-layer with MoDConfig.skip): its input
    is what the router and predictor read."""
    return method_of(model).routed_module(i)


def topk_targets(method, i: int, x: torch.Tensor) -> torch.Tensor:
    from .layer import first_real, topk_membership
    with torch.no_grad():
        r = method.routers[i](x).squeeze(-1)
        valid = torch.ones_like(r, dtype=torch.bool)
        keep = first_real(valid) if method.config.keeps_first else None
        return topk_membership(r, valid, method.config.capacity, keep).float()


def fit(predictor, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, g: torch.Generator) -> None:
    """BCE of predictor(x) against y, minibatches of 512, AdamW."""
    for p in predictor.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(512):
                loss = F.binary_cross_entropy_with_logits(predictor(x[idx]).squeeze(-1), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    for p in predictor.parameters():
        p.requires_grad_(False)
