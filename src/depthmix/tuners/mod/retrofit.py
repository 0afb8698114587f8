"""Router tuning of a retrofit MoD model (update="retrofit") on plain text, with the dense model as teacher.

The teacher is the same model with routing bypassed and any LoRA layers off (DepthMixModel.disable_adapter: every
routed block runs as it was), under no_grad: no second copy of the weights. The loss ("distill") is the per-token
KL(dense || routed) over the vocabulary, averaged over real tokens, plus MoD's auxiliary losses (the predictor's
BCE; update="gated": the budget loss); "lm" is the plain LM loss (+ the same auxiliary losses), "both" their sum.
The method's parameters (routers, predictors) train, and LoRA's where the model has them (healing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...runtime import device_of
from .config import RETROFIT_LOSSES as LOSSES


def method_of(model):
    """The MoD method of a DepthMixModel, also inside a DDP/FSDP wrapper."""
    return getattr(model, "module", model).method


def dense_teacher(model):
    """A context in which `model` runs as the dense base model: routing bypassed, LoRA layers off."""
    inner = getattr(model, "module", model)
    return inner.disable_adapter() if hasattr(inner, "disable_adapter") else inner.method.bypassed()


def token_kl(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens of KL(softmax(teacher) || softmax(student)), logits [B, S, V]."""
    t = F.log_softmax(teacher.float(), dim=-1)
    s = F.log_softmax(student.float(), dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    if mask is None:
        return kl.mean()
    w = mask.to(kl.dtype)
    return (kl * w).sum() / w.sum().clamp(min=1)


def retrofit_loss(model, inputs: dict, kind: str = "distill", progress: float | None = None):
    """(loss, outputs) of one training batch (input_ids, attention_mask[, labels]; "lm" and "both" need labels).
    progress: the fraction of training done (anneals update="gated"'s temperature)."""
    if kind not in LOSSES:
        raise ValueError(f"retrofit loss {kind!r}: expected one of {LOSSES}")
    method = method_of(model)
    if progress is not None:
        method.progress = progress
    if kind == "lm":
        out = model(**inputs)
        return out.loss, out
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    with torch.no_grad(), dense_teacher(model):
        teacher = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if kind == "both":  # the LM loss (auxiliary losses included) + the KL
        out = model(**inputs, use_cache=False)
        loss = out.loss + token_kl(teacher, out.logits, mask).to(out.loss.dtype)
    else:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        loss = token_kl(teacher, out.logits, mask)
        for aux in method.aux:  # added to outputs.loss only when there are labels
            loss = loss + aux.to(loss.dtype)
    out.loss = loss
    return loss, out


def tune(model, blocks: torch.Tensor, steps: int, batch: int = 4, lr: float = 1e-2, loss: str = "distill",
         seed: int = 0, progress: bool = True, lora_lr: float = 2e-4, every: int = 0, callback=None) -> list[float]:
    """`steps` AdamW steps on the routers and predictors (lr), and on LoRA's weights where the model has them
    (lora_lr: healing), on random batches of `blocks` [N, S]; the losses. callback(steps done) is called every
    `every` steps (the model in eval mode, e.g. for a held-out curve; training goes on after it)."""
    from tqdm.auto import tqdm
    method = method_of(model)
    device = device_of(model)
    g = torch.Generator().manual_seed(seed)
    params = list(method.parameters())
    for p in params:
        p.requires_grad_(True)
    mine = {id(p) for p in params}
    lora = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
    groups = [{"params": params, "lr": lr}] + ([{"params": lora, "lr": lora_lr}] if lora else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=f"tuning routers ({loss})", disable=not progress):
        ids = blocks[torch.randint(len(blocks), (batch,), generator=g)].to(device)
        value, _ = retrofit_loss(model, {"input_ids": ids, "labels": ids}, loss, progress=step / max(steps - 1, 1))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
        if callback is not None and every and (step + 1) % every == 0:
            model.eval()
            callback(step + 1)
            model.train()
    for p in params:
        p.requires_grad_(False)
    model.eval()
    return losses


def fit_predictors(model, blocks: torch.Tensor, batches: int, batch: int = 4, seed: int = 0, progress: bool = True,
                   epochs: int = 30, lr: float = 3e-3) -> None:
    """Fit each causal predictor to its block's top-k membership (the sink rule included) on the block inputs of
    `batches` forward passes (top-k routing, no gradients): the targets of training, for a fraction of its cost."""
    from tqdm.auto import tqdm
    from ...config import ConfigError
    method = method_of(model)
    if not hasattr(method, "predictors"):
        raise ConfigError(f"fit_predictors: this MoD model decides with causal={method.config.causal!r}, "
                          "it has no predictors to fit")
    device = device_of(model)
    g = torch.Generator().manual_seed(seed)
    seen = collect_inputs(model, blocks, batches, batch, g, progress)
    for i in tqdm(range(len(method.units)), desc="fitting predictors", disable=not progress):
        x = torch.cat(seen.pop(i)).float().to(device)
        y = topk_targets(method, i, x)
        fit(method.predictors[i], x.flatten(0, 1), y.flatten(), epochs, lr, g)


def collect_inputs(model, blocks, batches, batch, g, progress) -> dict[int, list[torch.Tensor]]:
    """{routed block i: [its input hidden states, one [b, S, d] tensor per forward]} under top-k routing."""
    from tqdm.auto import tqdm
    method = method_of(model)
    device = device_of(model)
    seen = {i: [] for i in range(len(method.units))}
    hooks = [routed(model, i).register_forward_pre_hook(
        lambda m, a, kw, i=i: seen[i].append((a[0] if a else kw["hidden_states"]).detach().cpu()) and None,
        with_kwargs=True) for i in range(len(method.units))]
    model.eval()
    try:
        with torch.no_grad(), method.routing_mode("topk-lookahead"):
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
        r = method.router(i, x)
        valid = torch.ones_like(r, dtype=torch.bool)
        first = first_real(valid) if method.config.keeps_first else None
        return topk_membership(r, valid, method.config.capacity, first).float()


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


@torch.no_grad()
def calibrate_gates(model, blocks: torch.Tensor) -> dict:
    """update="gated": shift each router's bias so that, on `blocks` [N, S] (one forward, causal routing), unit i
    executes its target fraction: `capacity` (budget="unit"), or with budget="global" its own realised fraction
    rescaled so that the parameter-weighted fraction is `capacity` (the allocation training chose is kept). A budget
    loss pulls the fraction toward the target only as hard as its weight; this makes it exact on the calibration
    text, one unit after the other within a single forward (a unit's shift changes what the later units see).
    Returns method.summary() of a second forward with the calibrated gates."""
    method = method_of(model)
    config = method.config
    device = device_of(model)
    ids = blocks.to(device)
    model.eval()
    if config.budget == "global":
        method.reset_stats()
        model(input_ids=ids, use_cache=False)
        s = method.stats.cpu().double()
        got = s[:, 0] / s[:, 1]
        costs = torch.tensor(method._costs, dtype=torch.float64)
        mean = float((got * costs).sum() / costs.sum())
        targets = (got * config.capacity / max(mean, 1e-9)).clamp(max=1.0).tolist()
    else:
        targets = [config.capacity] * len(method.units)
    sink = method._first(0, torch.ones(ids.shape, dtype=torch.bool, device=device), None) \
        if config.keeps_first else torch.zeros(ids.shape, dtype=torch.bool, device=device)

    def shift(i):
        def hook(module, args, out):
            r = out.squeeze(-1)
            free = r[~sink]  # the tokens the router decides (the attention sink always passes)
            want = (targets[i] * r.numel() - int(sink.sum())) / max(free.numel(), 1)
            want = min(max(want, 0.0), 1.0)
            # r - t > 0 for a fraction `want` of the free tokens
            t = torch.quantile(free.float(), 1.0 - want) if 0 < want < 1 else free.max() + 1 if want == 0 else \
                free.min() - 1
            module.bias -= t.to(module.bias.dtype)
            return out - t
        return hook

    hooks = [r.register_forward_hook(shift(i)) for i, r in enumerate(method.routers)]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    method.reset_stats()
    model(input_ids=ids, use_cache=False)
    return method.summary()
