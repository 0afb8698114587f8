"""Swapping a block's class for a subclass that keeps its name, and slicing block arguments by batch rows."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}


def _cache_arg() -> str:
    from transformers.modeling_outputs import BaseModelOutputWithPast
    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


# transformers 5.24 renamed the KV cache of block calls and model outputs from `past_key_values` to `cache`;
# routed block calls read and replace it under this name.
CACHE_ARG = _cache_arg()


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give `module` the class `(mixin, original)`, named like the original.

    Keeping the name keeps `_no_split_modules`, FSDP auto-wrap policies and gradient checkpointing working.
    """
    cls = type(module)
    if getattr(cls, "_depthmix_mixin_of", None) is not None:
        raise RuntimeError(f"{cls.__name__} already carries a depthmix method; remove it first")
    module.__class__ = swapped_class(mixin, cls)


def swapped_class(mixin: type, cls: type) -> type:
    """The class `(mixin, cls)` named like `cls`, made once per pair."""
    key = (mixin, cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(cls.__name__, (mixin, cls), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "_depthmix_mixin_of": cls,
            "_depthmix_mixin": mixin, "__reduce_ex__": _reduce_swapped})
    return _CLASSES[key]


def _reduce_swapped(module: nn.Module, protocol: int):
    """Pickle (torch.save of a whole model) and deepcopy name a class by its module and name, which find the
    original class, not the swapped one: record the pair instead, and rebuild the swapped class from it."""
    cls = type(module)
    return _new_swapped, (cls._depthmix_mixin, cls._depthmix_mixin_of), module.__getstate__()


def _new_swapped(mixin: type, cls: type) -> nn.Module:
    swapped = swapped_class(mixin, cls)
    return swapped.__new__(swapped)


def restore_class(module: nn.Module) -> None:
    orig = getattr(type(module), "_depthmix_mixin_of", None)
    if orig is not None:
        module.__class__ = orig


def take_rows(value, rows: torch.Tensor | None, batch: int):
    """Select batch rows from a block argument: batch-first tensors (ndim >= 2) and tuples of them.

    Tensors with a leading dimension of 1 broadcast over the batch and are kept; 1-D tensors are never
    batch-first in HF block calls (cache positions), so they are kept too.
    """
    if rows is None:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim >= 2 and value.shape[0] == batch and batch > 1:
            return value.index_select(0, rows)
        return value
    if isinstance(value, tuple):
        return tuple(take_rows(v, rows, batch) for v in value)
    return value


def take_rows_all(kwargs: dict, rows: torch.Tensor | None, batch: int) -> dict:
    return {k: take_rows(v, rows, batch) for k, v in kwargs.items()}


@contextmanager
def unrecorded():
    """Hide extra block calls (MoLEx experts) from transformers' output_hidden_states/attentions recording,
    which hooks every call of a block class. The call still goes through the module (FSDP hooks run)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # other transformers versions record outputs differently
        yield
        return
    token = _active_collector.set(None)
    try:
        yield
    finally:
        _active_collector.reset(token)
