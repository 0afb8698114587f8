"""A routed block's own KV store: only the tokens the block processed, each sequence with its own length."""
from __future__ import annotations

import torch

KEY = "_depthmix_mod"


def store_for(cache, index: int) -> "BlockStore":
    """The store of routed block `index`, kept on the HF cache object (so it lives and dies with the generation)."""
    return cache.__dict__.setdefault(KEY, {}).setdefault(index, BlockStore())


class BlockStore:
    """K/V of the tokens one routed block processed, packed per sequence: row b holds length[b] tokens (their RoPE
    already applied at their true positions). Buffers grow by doubling; slots past a row's length are scratch."""

    def __init__(self):
        self.keys = self.values = None
        self.length = None  # [B] long

    def start(self, batch: int, device) -> torch.Tensor:
        if self.length is None:
            self.length = torch.zeros(batch, dtype=torch.long, device=device)
        if self.length.shape[0] != batch:
            raise RuntimeError(f"MoD KV store holds {self.length.shape[0]} sequences, this step has {batch} "
                               "(beam search and batch reordering are not supported with MoD caches)")
        return self.length

    def view(self, count: torch.Tensor, q: int) -> "StoreView":
        return StoreView(self, count, q)

    def _ensure(self, like: torch.Tensor, need: int) -> None:
        b, h, _, d = like.shape
        have = 0 if self.keys is None else self.keys.shape[2]
        if need <= have:
            return
        size = max(need, 2 * have, 16)
        keys = like.new_zeros(b, h, size, d)
        values = like.new_zeros(b, h, size, self._vdim)
        if have:
            keys[:, :, :have] = self.keys
            values[:, :, :have] = self.values
        self.keys, self.values = keys, values

    def write(self, key: torch.Tensor, value: torch.Tensor, count: torch.Tensor):
        """Append q new slots per row at its current length (only the first count[b] are kept) and return the
        keys/values of every row up to the longest one, new slots included."""
        b, h, q, _ = key.shape
        start = self.length
        end = int((start + q).max())
        self._vdim = value.shape[-1]
        self._ensure(key, end)
        pos = (start.unsqueeze(1) + torch.arange(q, device=key.device)).view(b, 1, q, 1)
        self.keys.scatter_(2, pos.expand(b, h, q, key.shape[-1]), key)
        self.values.scatter_(2, pos.expand(b, value.shape[1], q, value.shape[-1]), value)
        self.length = start + count
        return self.keys[:, :, :end], self.values[:, :, :end]


class StoreView:
    """Stands in for the HF cache inside one routed block call: the block's attention calls update()."""

    def __init__(self, store: BlockStore, count: torch.Tensor, q: int):
        self.store, self.count, self.q = store, count, q

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.store.write(key_states, value_states, self.count)

    def get_seq_length(self, layer_idx=0) -> int:
        return int(self.store.length.max()) if self.store.length is not None else 0
