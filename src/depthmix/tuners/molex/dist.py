"""Keeping the ranks of a distributed run in step: every rank calls the same experts in the same order.

Under FSDP or ZeRO-3 each expert call gathers that block's weights (and its backward reduces its gradients) with a
collective that every rank must make, in the same order. Ranks route different data, so they would pick different
experts; they agree on the union of their experts first, and a rank with no rows for an agreed expert calls it on
a spare row whose output is thrown away but kept in the autograd graph."""
from __future__ import annotations

import torch
import torch.distributed as dist


def must_agree(blocks) -> bool:
    """Whether the ranks must call the same experts: distributed, with block weights gathered at each call.
    Replicated blocks (DDP) need no agreement, so a forward on one rank alone (sampling on rank 0, say) still runs."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(_sharded(block) for block in blocks)


def _sharded(block) -> bool:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    if isinstance(block, (FSDPModule, FullyShardedDataParallel)):
        return True
    p = next(block.parameters(), None)
    return p is not None and hasattr(p, "ds_id")  # DeepSpeed ZeRO-3 (a partitioned parameter)


def agree(local: list[int], num: int, device) -> list[int]:
    """The sorted union over all ranks of each rank's `local` experts (one all_reduce; every rank makes it)."""
    mask = torch.zeros(num, dtype=torch.int32, device=device)
    mask[local] = 1
    dist.all_reduce(mask)
    return mask.nonzero().flatten().tolist()


class _Keep(torch.autograd.Function):
    """x as it is; in the backward pass a zero gradient for each spare output, so autograd still runs through the
    blocks that made them (FSDP/ZeRO-3 then gather and reduce their weights on this rank as on the others)."""

    @staticmethod
    def forward(ctx, x, *spare):
        ctx.spare = [(s.shape, s.dtype, s.device) for s in spare]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.spare))


def keep(x: torch.Tensor, spare: list[torch.Tensor]) -> torch.Tensor:
    """x, with the spare expert outputs attached to its autograd graph (where there is one)."""
    if not spare or not torch.is_grad_enabled() or not any(s.requires_grad for s in spare):
        return x
    return _Keep.apply(x, *spare)
