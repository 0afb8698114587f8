"""Sharded weights (FSDP, DeepSpeed ZeRO-3): calling a module gathers its weights with a collective that every rank
must make, in the same order, whatever its own data routed to. A method that would skip a module on some ranks
(MoD with no token to process, MoLEx with no row for an expert) calls it on a spare input instead; the spare
output is thrown away but kept in the autograd graph, so the backward pass reduces that module's gradients on
this rank as on the others."""
from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_sharded(module) -> bool:
    """Whether calling `module` gathers weights: it or a module under it is an FSDP unit, or its parameters are
    partitioned by ZeRO-3."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    p = next(module.parameters(), None)
    if p is not None and hasattr(p, "ds_id"):  # ZeRO-3 converts every parameter (small ones stay whole, but tagged)
        return True
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules())


def must_call(modules) -> bool:
    """Whether every rank must call these modules as the others do. Replicated modules (DDP) need not, so a
    forward on one rank alone (sampling on rank 0, say) still runs."""
    return distributed() and any(is_sharded(m) for m in modules)


class _Attach(torch.autograd.Function):
    """x as it is; in the backward pass a zero gradient for each spare output, so autograd still runs through the
    modules that made them."""

    @staticmethod
    def forward(ctx, x, *spare):
        ctx.spare = [(s.shape, s.dtype, s.device) for s in spare]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.spare))


def attach_spares(x: torch.Tensor, spare: list[torch.Tensor]) -> torch.Tensor:
    """x, with the spare outputs attached to its autograd graph (where there is one)."""
    if not spare or not torch.is_grad_enabled() or not any(s.requires_grad for s in spare):
        return x
    return _Attach.apply(x, *spare)
