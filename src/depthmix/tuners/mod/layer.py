"""MoD at the level of one block: which tokens a routed block processes, and the subset's attention mask."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class MoDBlock:
    """Mixed into a routed block's class: the block runs on the routed subset of tokens only."""

    def forward(self, *args, **kwargs):
        method, index = self._depthmix
        return method.route(self, index, super().forward, args, kwargs)


def capacity_k(valid: torch.Tensor, capacity: float) -> torch.Tensor:
    """[B] tokens each sequence sends through a routed block: ceil(capacity * its real length), at least 1 (0 for
    an all-padding row). The small tolerance keeps ceil(0.1 * 30) at 3 despite floating point."""
    n = valid.sum(1)
    k = torch.ceil(n.double() * capacity - 1e-9).long().clamp(min=1)
    return torch.minimum(k, n)


def first_real(valid: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the first real (non-padding) token of each sequence."""
    return valid & (valid.cumsum(1) == 1)


def topk_slots(scores: torch.Tensor, valid: torch.Tensor, capacity: float, first: torch.Tensor | None = None,
               full: bool = False):
    """Top-k routing with static shapes (no device->host sync): K = ceil(capacity * S) slots per row, S the padded
    length (a Python int), whatever the rows' real lengths.

    Returns idx [B, K], count [B] and K, as selected_slots() does: slot j < count[b] holds the j-th selected
    position of row b in increasing (causal) order, and the remaining slots hold unselected positions, after every
    selected one.
    Row b selects its own k = ceil(capacity * its real length) best tokens, padding never (it scores -inf); tokens
    in `first` [B, S] (the first real tokens, where MoDConfig.keeps_first) always win one of the k slots; equal
    scores go to the earlier position (a stable sort: torch.topk leaves ties to the kernel, and on CPU it dropped
    the earliest ones). full: the caller knows that no row has padding, so every row fills all K slots (the same
    slots, in fewer operations)."""
    b, s = valid.shape
    top = max(1, math.ceil(s * capacity - 1e-9)) if s else 0
    if top == 0:
        return None, capacity_k(valid, capacity), 0
    if not full:
        scores = scores.masked_fill(~valid, float("-inf"))
    if first is not None:
        scores = scores.masked_fill(first, float("inf"))
    best = scores.sort(dim=1, descending=True, stable=True).indices[:, :top]
    if full:
        return best.sort(dim=1).values, torch.full((b,), top, device=valid.device), top
    count = capacity_k(valid, capacity)
    chosen = torch.arange(top, device=valid.device) < count.unsqueeze(1)
    order = torch.where(chosen, best, best + s).sort(dim=1).indices  # selected first, each part by position
    return best.gather(1, order), count, top


def topk_membership(scores: torch.Tensor, valid: torch.Tensor, capacity: float,
                    first: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] bool: the tokens topk_slots selects."""
    idx, count, top = topk_slots(scores, valid, capacity, first)
    return membership(idx, count, top, valid)


def membership(idx, count, top, like: torch.Tensor, full: bool = False) -> torch.Tensor:
    """[B, S] bool: the selected positions of slots idx [B, K] (those before count [B]; all of them where full)."""
    if top == 0:
        return torch.zeros_like(like, dtype=torch.bool)
    zeros = torch.zeros(like.shape[:2], dtype=torch.bool, device=like.device)
    if full:
        return zeros.scatter_(1, idx, True)
    take = torch.arange(top, device=like.device) < count.unsqueeze(1)
    return zeros.scatter(1, idx, take)


def selected_slots(sel: torch.Tensor):
    """Selected positions packed to the front of each row, in increasing (causal) order.

    Returns idx [B, K] (a prefix of a stable permutation, so positions are distinct), count [B] (slots < count
    are selected) and K = the largest count. Rows with fewer selected tokens fill their last slots with
    unselected positions: those slots come after every selected one, so a causal mask in slot order never
    lets a selected token see them, and their outputs are thrown away."""
    count = sel.sum(1)
    top = int(count.max()) if count.numel() else 0
    if top == 0:
        return None, count, 0
    order = torch.sort((~sel).to(torch.uint8), dim=1, stable=True).indices[:, :top]
    return order, count, top


class Packed(NamedTuple):
    idx: torch.Tensor  # [G, T] positions in the flattened [B * S]
    seg: torch.Tensor  # [G, T] the row each slot belongs to, -1 for unused slots
    flat: torch.Tensor  # [N] the flattened positions of the selected tokens, row by row, in order
    slot: torch.Tensor  # [N] where each of them sits in the flattened [G * T]
    row: torch.Tensor  # [N] the row of each, and its rank among that row's selected tokens
    rank: torch.Tensor
    counts: torch.Tensor  # [B] selected tokens per row, and the largest of them (a Python int)
    most: int
    host: list[int]  # counts on the host


def pack(sel: torch.Tensor) -> Packed | None:
    """The selected tokens of every row packed into G rows of at most S slots each (whole rows placed in order,
    a new packed row started when the next one does not fit), instead of every row padded to the busiest: the
    work follows the realized capacity. Causal routing at inference only (the row counts are read on the host).
    None where nothing is selected."""
    b, s = sel.shape
    counts = sel.sum(1)
    group, offset, fill = [], [], []
    host = counts.tolist()
    for c in host:
        if not fill or fill[-1] + c > s:
            fill.append(0)
        group.append(len(fill) - 1)
        offset.append(fill[-1])
        fill[-1] += c
    t = max(fill)
    if t == 0:
        return None
    dev = sel.device
    flat = sel.reshape(-1).nonzero().squeeze(1)
    row = flat // s
    first = counts.cumsum(0) - counts  # each row's first index in flat
    rank = torch.arange(flat.numel(), device=dev) - first[row]
    slot = (torch.tensor(group, device=dev) * t + torch.tensor(offset, device=dev))[row] + rank
    idx = torch.zeros(len(fill) * t, dtype=torch.long, device=dev).index_copy(0, slot, flat)
    seg = torch.full((len(fill) * t,), -1, dtype=torch.long, device=dev).index_copy(0, slot, row)
    return Packed(idx.view(-1, t), seg.view(-1, t), flat, slot, row, rank, counts, max(host), host)


def packed_mask(seg: torch.Tensor, impl: str, dtype):
    """[G, 1, T, T] attention mask of packed rows: causal within each original row, nothing across rows (unused
    slots see only unused slots, themselves included, so no query row is fully masked). None where SDPA's own
    causal rule is exactly that (one row, no unused slot)."""
    t = seg.shape[1]
    if impl != "eager" and seg.shape[0] == 1 and bool((seg == seg[0, 0]).all()):
        return None
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    allowed = ((seg.unsqueeze(2) == seg.unsqueeze(1)) & causal).unsqueeze(1)
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def take_packed(t: torch.Tensor, idx: torch.Tensor, batch: int) -> torch.Tensor:
    """t [B or 1, S, ...] -> [G, T, ...] at the flattened positions idx [G, T] of [batch * S]."""
    if t.shape[0] == 1 and batch > 1:  # shared by the rows: index it, rather than copy it out to every row first
        return t[0][idx % t.shape[1]]
    return t.reshape(-1, *t.shape[2:])[idx]


def flat_positions(idx: torch.Tensor, s: int) -> torch.Tensor:
    """Positions idx [B, K] in rows of length s -> [B * K] positions in the flattened [B * s]."""
    if idx.shape[0] == 1:
        return idx.view(-1)
    return (idx + torch.arange(0, idx.shape[0] * s, s, device=idx.device).unsqueeze(1)).view(-1)


def take_slots(t: torch.Tensor, idx: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """t [B or 1, S, ...] -> [B, K, ...] at positions idx [B, K] (flat: flat_positions(idx, S)), in one
    index_select (a gather needs its index expanded over every feature first)."""
    if t.shape[0] == 1 and idx.shape[0] > 1:  # shared by the rows (position embeddings)
        return t[0].index_select(0, flat.remainder(t.shape[1])).view(*idx.shape, *t.shape[2:])
    return t.reshape(-1, *t.shape[2:]).index_select(0, flat).view(*idx.shape, *t.shape[2:])


def subset_mask(start: torch.Tensor | None, q: int, kv: int, impl: str, dtype, device, host: list[int] | None = None):
    """The attention mask of a routed block's subset: query slot j of row b sits at cache position start[b] + j and
    sees the cache positions up to its own (start None: no cache, start 0). Returns None where the attention
    kernel's own causal rule gives exactly that (SDPA's is_causal for a fresh square block; one query seeing
    every key). host: start as a list, where the caller has it (no device read then)."""
    if host is not None:
        same = len(set(host)) <= 1
        first = same and host[0] == 0
    else:
        same = start is None or start.numel() == 1 or bool((start == start[0]).all())
        first = start is None or (same and int(start[0]) == 0)
    if impl != "eager" and ((first and q == kv) or (q == 1 and same)):
        return None
    base = torch.zeros(1, dtype=torch.long, device=device) if start is None else start
    allowed = (torch.arange(kv, device=device).view(1, 1, kv)
               <= (base.view(-1, 1, 1) + torch.arange(q, device=device).view(1, q, 1)))
    allowed = allowed.unsqueeze(1)  # [B, 1, q, kv]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def attn_impl(module) -> str:
    """The attention implementation of a routed block, or of a routed attention sub-layer itself."""
    for name in ("", "self_attn", "attn", "attention"):
        sub = getattr(module, name, None) if name else module
        if sub is not None and getattr(sub, "config", None) is not None:
            return sub.config._attn_implementation or "eager"
    return "eager"


def predictor_hidden(d: int) -> int:
    return max(1, math.ceil(d / 8))
