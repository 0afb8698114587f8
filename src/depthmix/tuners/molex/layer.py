"""MoLEx at the level of one block: the routing decision and the swapped-in block class."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MoLExBlock:
    """Mixed into a block's class. `depthmix_plain=True` runs the block as it was (used for expert calls)."""

    def forward(self, *args, depthmix_plain: bool = False, **kwargs):
        if depthmix_plain:
            return super().forward(*args, **kwargs)
        method, index = self._depthmix
        return method.mix(self, index, super().forward, args, kwargs)


class CosineGate(nn.Module):
    """The public code's cosine gate: logit_j = <W z / |W z|, e_j / |e_j|> / tau, with the projection W, one
    embedding e_j per layer and the temperature tau all learned. dim and temperature start at X-MoE's (16, 0.07)
    unless given (the public GLUE scripts: proj_dim per task, tau from 0.5). norm "sequence" is the public code's
    normalisation: over dim 1 of [B, S, dim], i.e. each feature over the positions of its sequence, not a cosine."""

    def __init__(self, hidden_size: int, num: int, dim: int = 16, temperature: float = 0.07, norm: str = "token"):
        super().__init__()
        self.proj = nn.Linear(hidden_size, dim, bias=False, dtype=torch.float32)
        self.embeddings = nn.Parameter(torch.empty(num, dim, dtype=torch.float32))
        nn.init.orthogonal_(self.embeddings)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature), dtype=torch.float32))
        self.norm_dim = -1 if norm == "token" else 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cos = F.normalize(self.proj(z), dim=self.norm_dim) @ F.normalize(self.embeddings, dim=-1).t()
        return cos / self.log_temperature.exp().clamp(min=0.01)  # a floor, so the logits stay finite


def route(logits: torch.Tensor, units: torch.Tensor, granularity: str):
    """Top-1 expert choice with a straight-through factor.

    logits: [B, S, T] float32 gate logits; units: [B, S] bool, the tokens that decide (valid, and for causal
    LMs in sequence routing, the prompt). Returns (choice, factor, probs) with choice [B] or [B, S]; factor is
    p_j / stopgrad(p_j): exactly 1 in the forward pass, the gate's gradient path in the backward pass.
    "batch" (the public code): the most frequent top-1 choice over the positions `units` marks, of every row
    (padding votes too); choice [B] (all equal), factor None, probs per token.
    """
    if granularity == "batch":
        probs = logits.softmax(-1)
        vote = torch.mode(probs.argmax(-1)[units]).values
        return vote.expand(logits.shape[0]), None, probs
    if granularity == "sequence":
        w = units.to(logits.dtype).unsqueeze(-1)
        logits = (logits * w).sum(1) / w.sum(1).clamp(min=1.0)  # [B, T]
    probs = logits.softmax(-1)
    choice = probs.argmax(-1)
    p = probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return choice, p / p.detach(), probs


def balance_loss(probs: torch.Tensor, choice: torch.Tensor, units: torch.Tensor | None) -> torch.Tensor:
    """Switch-Transformer load balancing: T * sum_j f_j * P_j over the routing units."""
    num = probs.shape[-1]
    probs = probs.reshape(-1, num)
    choice = choice.reshape(-1)
    if units is not None:
        keep = units.reshape(-1)
        probs, choice = probs[keep], choice[keep]
    if choice.numel() == 0:
        return probs.sum() * 0.0
    frac = torch.bincount(choice, minlength=num).to(probs.dtype) / choice.numel()
    return num * (frac * probs.mean(0)).sum()
