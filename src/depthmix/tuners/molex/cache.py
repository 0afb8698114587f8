"""What one mixed layer keeps beside the model's KV cache while decoding: the prompt's expert choice and the
experts' own KV caches."""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ...generation import KeptState, kept

KEY = "_depthmix_molex"


def experts_for(cache, index: int) -> "ExpertCaches":
    """Mixed layer `index`'s state, kept on the HF cache object (so it lives and dies with the generation)."""
    return kept(cache, KEY).setdefault(index, ExpertCaches())


class ExpertCaches(KeptState):
    """choice [B]: each sequence's expert, decided on the prompt. Expert j at layer t attends over z_t, not z_j,
    so it has a cache of its own holding only the rows that chose it, a cache layer of the kind layer t has (full,
    sliding window, static) so that layer t's attention mask fits its keys."""

    def __init__(self):
        self.choice = None
        self.experts: dict[int, tuple[torch.Tensor, object]] = {}  # j -> (its rows, sorted; its cache layer)

    def view(self, j: int, rows: torch.Tensor, cache, t: int) -> "ExpertView":
        """Expert j's cache at layer t for `rows` (the rows whose choice is j); `cache`: the model's."""
        if j not in self.experts:
            layers = getattr(cache, "layers", None)
            self.experts[j] = (rows, fresh_like(layers[t] if layers is not None and t < len(layers) else None))
        return ExpertView(self.experts[j][1])

    def batch_size(self) -> int:
        return self.choice.shape[0]

    def select(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.choice.device)
        choice = self.choice.index_select(0, rows)
        for j, (had, layer) in self.experts.items():
            now = (choice == j).nonzero().flatten()
            # a row keeps its choice (the prompt decided it), so each new row of j came from an old row of j
            layer.reorder_cache(torch.searchsorted(had, rows.index_select(0, now)))
            self.experts[j] = (now, layer)
        self.choice = choice

    def crop(self, tokens_to_remove: int) -> None:
        for _, layer in self.experts.values():
            layer.crop(tokens_to_remove)

    def activate_past_recording(self) -> None:
        for _, layer in self.experts.values():
            if hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording()


def fresh_like(layer):
    """An empty cache layer of the same kind (and window, length, recording) as `layer`; a plain one without it."""
    if layer is None:
        return DynamicLayer()
    sizes = {}
    if hasattr(layer, "max_cache_len"):  # a static sliding-window layer keeps only min(window, length) as its length
        sizes["max_cache_len"] = sizes["sliding_window"] = layer.max_cache_len
    if hasattr(layer, "sliding_window"):
        sizes["sliding_window"] = layer.sliding_window
    new = type(layer)(**sizes)
    for flag in ("record_past", "_is_croppable"):
        if hasattr(layer, flag):
            setattr(new, flag, getattr(layer, flag))
    return new


class ExpertView:
    """Stands in for the HF cache inside an expert's block call: its attention calls update()."""

    def __init__(self, layer):
        self.layer = layer

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.layer.update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self, layer_idx=0) -> int:
        return int(self.layer.get_seq_length())
