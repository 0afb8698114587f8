"""The PEFT LoRA/DoRA layers depthmix injects into a base model: checked before, switched off, removed again."""
from __future__ import annotations

import contextlib

from torch import nn

from .config import ConfigError


def config(model: nn.Module, targets=None, **kw):
    """A LoraConfig for `model`: `targets`, else PEFT's default target modules for its model type (a Llama-like type
    PEFT does not list, such as smollm3, gets the entry of its architecture family). PEFT itself switches
    fan_in_fan_out on for GPT-2's Conv1D layers."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    from .architectures import family_of
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = DEFAULTS.get(model_type) or DEFAULTS.get(family_of(model).name)
    return LoraConfig(target_modules=list(targets), **kw)


def check(lora, model: nn.Module) -> None:
    """Refuse a LoraConfig that cannot fit the model, before anything is injected."""
    r = getattr(lora, "r", None)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"LoraConfig.r = {r!r}: expected a positive integer")
    names = [n for n, _ in model.named_modules() if n]
    for field in ("target_modules", "modules_to_save"):
        wanted = getattr(lora, field, None)
        if not wanted or isinstance(wanted, str):  # a regex or "all-linear": peft matches it
            continue
        missing = sorted(t for t in wanted if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            raise ConfigError(f"LoraConfig.{field} = {sorted(wanted)}: {missing} name no module of "
                              f"{type(model).__name__}; its leaf modules are named {_leaf_names(model)}")


def _leaf_names(model: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    return sorted(n for n in names if not n.isdigit())[:16]


def carried(model: nn.Module) -> str | None:
    """The name of a PEFT adapter layer already in the model, if any."""
    for name, module in model.named_modules():
        if _is_layer(module):
            return name
    return None


def _is_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper
    return isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Every adapter layer passes its input to the base layer only, for the duration of the block.
    (enable_adapters also flips requires_grad: the caller restores the flags.)"""
    layers = [(m, bool(getattr(m, "_disable_adapters", False))) for m in model.modules() if _is_layer(m)]
    for m, _ in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, was_disabled in layers:
            m.enable_adapters(not was_disabled)


def remove(model: nn.Module, merge: bool = False) -> None:
    """Put each adapter layer's base layer back in its place: its LoRA weights are discarded, or first merged into
    the base weights (merge=True; a modules_to_save copy then replaces the original module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    for name, module in list(model.named_modules()):
        if not name or not _is_layer(module) or any(name.startswith(p + ".") for p in layers):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _unwrapped(module, merge))
    model.__dict__.pop("peft_config", None)


def _unwrapped(module: nn.Module, merge: bool) -> nn.Module:
    if hasattr(module, "unload_and_optionally_merge_module"):  # modules_to_save, trainable tokens
        if not merge and hasattr(module, "original_module"):
            return module.original_module
        return module.unload_and_optionally_merge_module(merge=merge, safe_merge=False, adapter_names=None)
    if merge:
        module.merge()
    return module.get_base_layer()
