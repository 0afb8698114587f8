"""MoDE at the level of modules: the swapped-in block and norm classes, and the chunked distillation term."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class MoDECapture:
    """Mixed into block t + 1 for each ensembled block t before the final one: its input is block t's output.

    Taking the input of the next block, which comes from outside any gradient-checkpointed call, keeps the
    autograd link to block t under gradient checkpointing too (an output taken inside a checkpointed block is
    computed without a graph)."""

    def forward(self, *args, **kwargs):
        method, index = self._depthmix
        method.capture(index, args[0] if args else next(iter(method.arch.bind(self, args, kwargs).values())))
        return super().forward(*args, **kwargs)


class MoDENorm:
    """Mixed into the final norm: returns sum_l w_l norm_l(h_l), so the LM head (one matmul), HF's loss and
    generate() all see the ensemble."""

    def forward(self, hidden):
        method, _ = self._depthmix
        return method.ensemble(hidden, super().forward(hidden))


def distill_sum(teacher: torch.Tensor, students: list[torch.Tensor], head: nn.Module, tau: float,
                chunk: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum over rows and students of w_row * tau^2 * KL(softmax(head(teacher)/tau) || softmax(head(student)/tau)).

    teacher: [N, H] (no gradient flows to it); students: [N, H] each; weight: [N] row weights (None: all 1).
    Never holds more than `chunk` rows of
    vocabulary-sized logits. A frozen plain linear head takes a fused path that computes the students'
    gradients chunk by chunk in the forward pass (no logits kept for backward, no recomputation); any other
    head (trainable, LoRA-wrapped) recomputes each chunk in the backward pass (activation checkpointing).
    """
    teacher = teacher.detach()
    if isinstance(head, nn.Linear) and not any(p.requires_grad for p in head.parameters()):
        return _FusedDistill.apply(teacher, head.weight, head.bias, weight, float(tau), int(chunk), *students)
    total = teacher.new_zeros((), dtype=torch.float32)
    for start in range(0, teacher.shape[0], chunk):
        rows = slice(start, start + chunk)
        part = [s[rows] for s in students]
        w = None if weight is None else weight[rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_kl, head, tau, w, teacher[rows], *part, use_reentrant=False)
        else:
            total = total + _chunk_kl(head, tau, w, teacher[rows], *part)
    return total


def _chunk_kl(head, tau, weight, teacher, *students):
    with torch.no_grad():  # stop-gradient on the teacher, the head's own trainable weights included
        log_pt = (head(teacher).float() / tau).log_softmax(-1)
        pt = log_pt.exp()
    total = 0.0
    for s in students:
        log_ps = (head(s.to(teacher.dtype)).float() / tau).log_softmax(-1)
        per_row = (pt * (log_pt - log_ps)).sum(-1)
        total = total + (per_row.sum() if weight is None else per_row @ weight)
    return total * tau ** 2


ROWS = 8  # rows of vocabulary-sized logits per elementwise step: ~1.5 MiB for a 49k vocabulary, cache-resident


class _FusedDistill(torch.autograd.Function):
    """Forward: the summed distillation term and, chunk by chunk, d(term)/d(student) = tau (p_s - p_t) W.

    Each chunk's logits come from one GEMM per layer; the softmax arithmetic then runs over ROWS rows at a time,
    so it reads cache instead of memory (a third of the term's time otherwise, on a CPU)."""

    @staticmethod
    def forward(ctx, teacher, weight, bias, row_weight, tau, chunk, *students):
        need = ctx.needs_input_grad[6:]
        grads = [torch.empty_like(s) if n else None for s, n in zip(students, need)]
        total = torch.zeros((), dtype=torch.float32, device=teacher.device)
        for start in range(0, teacher.shape[0], chunk):
            rows = slice(start, start + chunk)
            zt = F.linear(teacher[rows].to(weight.dtype), weight, bias).float()
            for s, g in zip(students, grads):
                zs = F.linear(s[rows].to(weight.dtype), weight, bias).float()
                for r in range(0, zs.shape[0], ROWS):
                    log_pt = (zt[r:r + ROWS] / tau).log_softmax(-1)
                    pt = log_pt.exp()
                    log_ps = (zs[r:r + ROWS] / tau).log_softmax(-1)
                    if row_weight is None:
                        total += torch.dot(pt.flatten(), log_pt.sub_(log_ps).flatten())
                    else:
                        w = row_weight[start + r:start + min(r + ROWS, zs.shape[0])]
                        total += (pt * log_pt.sub_(log_ps)).sum(-1) @ w
                    if g is not None:
                        zs[r:r + ROWS] = log_ps.exp_().sub_(pt)  # p_s - p_t, in place of the logits
                        if row_weight is not None:
                            zs[r:r + ROWS] *= w.unsqueeze(-1)
                if g is not None:
                    g[rows] = (zs.to(weight.dtype) @ weight).to(g.dtype).mul_(tau)
                del zs
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.need = need
        return total * tau ** 2

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_out.to(torch.float32) if n else None for n in ctx.need]
        return (None, None, None, None, None, None, *grads)
