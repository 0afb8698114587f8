"""What generate() means for a method: the decoding a call asks for, resolved as transformers resolves it, and the
caches a method keeps beside the model's KV cache, carried through what generate() does to that cache."""
from __future__ import annotations

import torch
from transformers.generation import GenerationMode
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

from .blocks import swap_class
from .config import ConfigError

# decodings that feed each row one new token per step and never take tokens back
STEPWISE = frozenset({GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE, GenerationMode.BEAM_SEARCH,
                      GenerationMode.BEAM_SAMPLE})
# generate()'s own arguments, none of them a generation-config field
_NAMED = ("inputs", "generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
          "synced_gpus", "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
          "custom_generate")


class Decoding:
    """The decoding one generate() call runs: its effective GenerationConfig (the call's keywords over its
    `generation_config` over `model.generation_config` over the defaults, as transformers merges them) and mode."""

    def __init__(self, model, args: tuple, kwargs: dict):
        named = dict(zip(_NAMED, args))
        named.update(kwargs)
        rest = {k: v for k, v in named.items() if k not in _NAMED}
        self.config, _ = model._prepare_generation_config(named.get("generation_config"), **rest)
        self.mode = self.config.get_generation_mode(named.get("assistant_model"))
        passed = named.get("cache", named.get("past_key_values"))
        # a static cache (asked for, or passed in) makes generate() hand the model prepared 4D masks, not the 2D one
        self.static = (self.config.cache_implementation in ALL_STATIC_CACHE_IMPLEMENTATIONS
                       or bool(getattr(passed, "is_compileable", False)))

    def describe(self) -> str:
        c = self.config
        if self.mode == GenerationMode.ASSISTED_GENERATION:
            return ("prompt-lookup decoding (prompt_lookup_num_tokens)" if c.prompt_lookup_num_tokens is not None
                    else "assisted decoding (assistant_model / assistant_early_exit)")
        if "beam" in self.mode:
            return f"{self.mode.value.replace('_', ' ')} (num_beams={c.num_beams})"
        return self.mode.value.replace("_", " ")

    def refuse(self, method: str, why: str) -> None:
        """Refuse a decoding that is not stepwise (assisted and prompt-lookup decoding, which need a KV cache)."""
        if self.mode not in STEPWISE:
            raise ConfigError(f"{method} generate(): {self.describe()} is not supported ({why}); "
                              "use greedy decoding, sampling or beam search")


class KeptState:
    """State a method keeps beside a KV cache for one generation, one row per sequence. generate() reorders,
    selects and repeats the cache's rows (beam search) or crops its last tokens (assisted decoding): the same
    happens here through select() and crop()."""

    def select(self, rows: torch.Tensor) -> None:
        """Row k becomes the old row rows[k]."""
        raise NotImplementedError

    def batch_size(self) -> int:
        raise NotImplementedError

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError

    def activate_past_recording(self) -> None:
        """Assisted decoding asks sliding-window layers to keep the tokens it may crop."""

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices.nonzero().flatten() if indices.dtype == torch.bool else indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select(torch.arange(self.batch_size()).repeat_interleave(repeats))


class KeptStates(dict):
    """Index (a routed or mixed layer) -> its KeptState: what reaches the container reaches each of them."""

    def _each(self, name: str, *args) -> None:
        for state in self.values():
            getattr(state, name)(*args)

    def reorder_cache(self, beam_idx):
        self._each("reorder_cache", beam_idx)

    def batch_select_indices(self, indices):
        self._each("batch_select_indices", indices)

    def batch_repeat_interleave(self, repeats):
        self._each("batch_repeat_interleave", repeats)

    def crop(self, tokens_to_remove):
        self._each("crop", tokens_to_remove)

    def activate_past_recording(self):
        self._each("activate_past_recording")


class KeepsState:
    """Mixed into the class of a KV cache object that carries KeptStates: each operation generate() applies to
    the cache reaches them too; reset() (a static cache reused by the next generate()) drops them."""

    def _depthmix_each(self, name: str, *args) -> None:
        for key in self.__dict__.get("_depthmix_kept", ()):
            getattr(self.__dict__[key], name)(*args)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._depthmix_each("reorder_cache", beam_idx)

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._depthmix_each("batch_select_indices", indices)

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        self._depthmix_each("batch_repeat_interleave", repeats)

    def crop(self, tokens_to_remove):
        super().crop(tokens_to_remove)
        self._depthmix_each("crop", tokens_to_remove)

    def activate_past_recording(self):
        super().activate_past_recording()
        self._depthmix_each("activate_past_recording")

    def reset(self):
        super().reset()
        for key in self.__dict__.pop("_depthmix_kept", ()):
            del self.__dict__[key]


def kept(cache, key: str) -> KeptStates:
    """The states kept beside `cache` under `key` (an attribute of the cache object, made on first use)."""
    if not isinstance(cache, KeepsState):
        swap_class(cache, KeepsState)
    state = cache.__dict__.get(key)
    if state is None:
        state = cache.__dict__[key] = KeptStates()
        cache.__dict__.setdefault("_depthmix_kept", []).append(key)
    return state
