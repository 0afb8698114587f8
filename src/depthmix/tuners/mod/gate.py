"""update="gated": router tuning that sees every token. While training, a routed unit runs on every token and a
hard per-token gate z in {0, 1} keeps its update or not; the gradient reaches the router through a
straight-through estimate, so a skipped token tells it what skipping cost. Outside training the gate is the
router's own causal decision r > 0, and a skipped token skips the compute (MoD's causal routing)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import float32_linear


def new_router(config, hidden_size: int) -> torch.nn.Linear:
    """A router Linear(d, 1). Retrofit: zero (Router-Tuning). Gated: it reads the RMS-normalised hidden state, so
    weights ~ N(0, 1/d) give scores of spread ~1, and its bias starts where about `capacity` of the tokens pass
    (P(N(b, 1) > 0) = capacity): training starts at the target, every token's decision near its threshold."""
    if config.update != "gated":
        return float32_linear(hidden_size, 1, zero=config.update == "retrofit")
    layer = float32_linear(hidden_size, 1)
    with torch.no_grad():
        layer.weight.normal_(0.0, hidden_size ** -0.5)
        layer.bias.fill_(float(torch.special.ndtri(torch.tensor(min(config.capacity, 0.99)))))
    return layer


def router_input(config, x: torch.Tensor) -> torch.Tensor:
    """What a router reads: the hidden state in float32; RMS-normalised for update="gated" (hidden states of
    pretrained models span orders of magnitude between blocks and tokens, the attention sink above all)."""
    x = x.float()
    return F.rms_norm(x, x.shape[-1:]) if config.update == "gated" else x


def temperature(config, progress: float) -> float:
    """The gate's temperature at `progress` (0 to 1) of training: linear from gate_temperature to _end."""
    p = min(max(float(progress), 0.0), 1.0)
    return config.gate_temperature + p * (config.gate_temperature_end - config.gate_temperature)


def gate_values(config, r: torch.Tensor, progress: float, first: torch.Tensor | None):
    """(z, hard) of router scores r [B, S]: hard [B, S] bool, the kept tokens; z = hard + s - stopgrad(s), equal
    to hard in the forward pass, with the gradient of s = sigmoid(score / T). "sigmoid": score = r; "gumbel":
    score = r + L, L logistic noise (the binary Gumbel-softmax). Tokens in `first` (the attention sink) are always
    kept, and their z carries no gradient."""
    score = r
    if config.hard_gate == "gumbel":
        u = torch.rand_like(r).clamp(1e-6, 1 - 1e-6)
        score = r + torch.log(u) - torch.log1p(-u)
    hard = score > 0
    s = torch.sigmoid(score / temperature(config, progress))
    z = hard.to(s.dtype) + s - s.detach()
    if first is not None:
        hard = hard | first
        z = torch.where(first, torch.ones_like(z), z)
    return z, hard


def executed_fraction(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The fraction of real tokens the gate keeps (differentiable through z)."""
    w = valid.to(z.dtype)
    return (z * w).sum() / w.sum().clamp(min=1)


def budget_loss(config, executed: list, costs: list[int]) -> torch.Tensor:
    """budget_weight * |executed fraction - capacity|: per unit, averaged over units (budget="unit"), or of the
    one fraction over all units, each weighted by its parameter count (budget="global"). `executed`: (fraction,
    unit index) of this forward's gated units."""
    fractions = torch.stack([f for f, _ in executed])
    if config.budget == "global":
        w = torch.tensor([float(costs[i]) for _, i in executed], device=fractions.device)
        gap = ((fractions * w).sum() / w.sum() - config.capacity).abs()
    else:
        gap = (fractions - config.capacity).abs().mean()
    return config.budget_weight * gap
