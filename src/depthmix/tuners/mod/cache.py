"""A routed block's (or attention sub-layer's) own KV store: only the tokens the block processed, each sequence with its own length."""
from __future__ import annotations

import torch

from ...generation import KeptState, kept

KEY = "_depthmix_mod"


def store_for(cache, index: int) -> "BlockStore":
    """The store of routed block `index`, kept on the HF cache object (so it lives and dies with the generation)."""
    return kept(cache, KEY).setdefault(index, BlockStore())


class BlockStore(KeptState):
    """K/V of the tokens one routed block processed, packed per sequence: row b holds length[b] tokens (their RoPE
    already applied at their true positions). Buffers grow by doubling; slots past a row's length are scratch."""

    def __init__(self):
        self.keys = self.values = None
        self.length = None  # [B] long
        self.host = None  # the same lengths as a list on the host, None while only the device knows them
        self.written = False  # known on the host: an empty store may take a packed first call (PackedView)

    def start(self, batch: int, device) -> torch.Tensor:
        if self.length is None:
            self.length = torch.zeros(batch, dtype=torch.long, device=device)
            self.host = [0] * batch
        if self.length.shape[0] != batch:
            raise RuntimeError(f"MoD KV store holds {self.length.shape[0]} sequences, this step has {batch} "
                               "(the batch changed without the KV cache's reorder or select methods)")
        return self.length

    def batch_size(self) -> int:
        return 0 if self.length is None else self.length.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        """Beam search: row k becomes the old row rows[k]."""
        if self.length is None:
            return
        rows = rows.to(self.length.device)
        self.length = self.length.index_select(0, rows)
        self.host = None  # read again when next needed (beam search: rows known on the device)
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)

    def crop(self, tokens_to_remove: int) -> None:
        # each sequence's store holds only the tokens it processed: which of the last ones those were is not kept
        raise RuntimeError("MoD KV stores cannot take tokens back (assisted or prompt-lookup decoding); "
                           "generate with use_cache=False")

    def lengths(self) -> list[int]:
        """The row lengths on the host: kept there as the rows grow by counts the host knows (a decoding step's one
        token per processing row), read from the device (a sync) only after a write whose counts it did not know."""
        if self.host is None:
            self.host = self.length.tolist()
        return self.host

    def view(self, count: torch.Tensor, q: int, rows: torch.Tensor | None = None, added: list[int] | None = None,
             picked: list[int] | None = None) -> "StoreView":
        return StoreView(self, count, q, rows, added, picked)

    def _ensure(self, like: torch.Tensor, need: int) -> None:
        _, h, _, d = like.shape
        b = self.length.shape[0]
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

    def write(self, key: torch.Tensor, value: torch.Tensor, count: torch.Tensor, rows: torch.Tensor | None = None,
              added: list[int] | None = None, picked: list[int] | None = None):
        """Append q new slots to each row at its current length (only the first count[b] are kept) and return the
        keys/values up to the longest row, new slots included. rows: the store rows that key/value [r, H, q, D]
        belong to (None: every row), `picked` the same on the host; the others are left as they are. added: count
        on the host where the caller knows it (the host lengths then stay current with no sync)."""
        r, _, q, _ = key.shape
        every = rows is None
        lengths = self.lengths()
        if not every and picked is None:
            picked = rows.tolist()
        end = max(lengths) + q if every else max(lengths[j] for j in picked) + q
        rows = torch.arange(r, device=key.device) if every else rows
        start = self.length if every else self.length.index_select(0, rows)
        self._vdim = value.shape[-1]
        self._ensure(key, end)
        pos = (start.unsqueeze(1) + torch.arange(q, device=key.device)).view(r, 1, q)
        at = rows.view(r, 1, 1)
        self.keys[at, torch.arange(key.shape[1], device=key.device).view(1, -1, 1), pos] = key
        self.values[at, torch.arange(value.shape[1], device=key.device).view(1, -1, 1), pos] = value
        self.length = self.length.index_add(0, rows, count)
        if added is None:
            self.host = None
        else:
            for j, n in zip(range(r) if every else picked, added):
                lengths[j] += n
        self.written = True
        if every:
            return self.keys[:, :, :end], self.values[:, :, :end]
        return self.keys[:, :, :end].index_select(0, rows), self.values[:, :, :end].index_select(0, rows)


class StoreView:
    """Stands in for the HF cache inside one routed block call: the block's attention calls update()."""

    def __init__(self, store: BlockStore, count: torch.Tensor, q: int, rows: torch.Tensor | None = None,
                 added: list[int] | None = None, picked: list[int] | None = None):
        self.store, self.count, self.q, self.rows = store, count, q, rows
        self.added, self.picked = added, picked

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.store.write(key_states, value_states, self.count, self.rows, self.added, self.picked)

    def get_seq_length(self, layer_idx=0) -> int:
        return max(self.store.lengths()) if self.store.length is not None else 0


class PackedView:
    """Stands in for the HF cache inside a routed block's first call on packed rows (layer.pack): the store is
    empty, so this call's keys/values are each sequence's whole context: they go back to the attention as they
    came (packed, under the packed mask) and into each sequence's store row, in order."""

    def __init__(self, store: BlockStore, packed, batch: int):
        self.store, self.packed, self.batch = store, packed, batch

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        self.store.write(self._rows(key_states), self._rows(value_states), self.packed.counts,
                         added=self.packed.host)
        return key_states, value_states

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """[G, H, T, D] packed -> [B, H, K, D]: each sequence's tokens in order, padded to the busiest."""
        g, h, n, d = t.shape
        tokens = t.transpose(1, 2).reshape(g * n, h, d).index_select(0, self.packed.slot)
        rows = t.new_zeros(self.batch, self.packed.most, h, d)
        rows[self.packed.row, self.packed.rank] = tokens
        return rows.transpose(1, 2)

    def get_seq_length(self, layer_idx=0) -> int:
        return 0
