"""Keeping the ranks of a distributed run in step: every rank calls the same experts in the same order.

Ranks route different data, so they would pick different experts; where the blocks are sharded they agree on the
union of their experts first, and a rank with no rows for an agreed expert calls it on a spare row
(`depthmix.sharding`)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def agree(local: list[int], num: int, device) -> list[int]:
    """The sorted union over all ranks of each rank's `local` experts (one all_reduce; every rank makes it)."""
    mask = torch.zeros(num, dtype=torch.int32, device=device)
    mask[local] = 1
    dist.all_reduce(mask)
    return mask.nonzero().flatten().tolist()
