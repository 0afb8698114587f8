"""Where each model family keeps its blocks, final norm and head, and how its blocks are called."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: tuple[str, ...]  # candidate paths of the block ModuleList, first match wins
    norm: tuple[str, ...]  # candidate paths of the final norm ("" = none, e.g. BERT)
    heads: tuple[str, ...]  # LM head or classifier, first match wins
    causal: bool


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm3"),
           ("model.layers", "layers"), ("model.norm", "norm"), ("lm_head", "score"), True),
    Family("gpt2", ("gpt2",), ("transformer.h", "h"), ("transformer.ln_f", "ln_f"), ("lm_head", "score"), True),
    Family("bert", ("bert",), ("bert.encoder.layer", "encoder.layer"), (), ("classifier", "cls"), False),
    Family("roberta", ("roberta",), ("roberta.encoder.layer", "encoder.layer"), (), ("classifier", "lm_head"), False),
)


class UnsupportedModelError(ValueError):
    pass


def _get(module: nn.Module, path: str):
    for name in path.split("."):
        if not hasattr(module, name):
            return None
        module = getattr(module, name)
    return module


@dataclass
class Arch:
    """A resolved model: the family plus the actual modules found in it."""

    family: Family
    blocks: nn.ModuleList
    blocks_path: str
    norm: nn.Module | None
    norm_path: str | None
    head: nn.Module | None
    head_path: str | None

    @property
    def causal(self) -> bool:
        return self.family.causal

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def bind(self, block: nn.Module, args: tuple, kwargs: dict) -> dict:
        """Name every argument of a block call, whatever mix of positional and keyword the model used."""
        sig = _block_signature(type(block))
        bound = sig.bind(*args, **kwargs)
        named = dict(bound.arguments)
        extra = named.pop(_var_kw_name(sig), None) or {}
        named.update(extra)
        return named


_SIGS: dict[type, inspect.Signature] = {}


def _block_signature(cls: type) -> inspect.Signature:
    if cls not in _SIGS:
        # The original class's forward: swapped-in subclasses take (*args, **kwargs).
        orig = getattr(cls, "_depthmix_mixin_of", None) or cls
        sig = inspect.signature(orig.forward)
        params = list(sig.parameters.values())[1:]  # drop self
        _SIGS[cls] = sig.replace(parameters=params)
    return _SIGS[cls]


def _var_kw_name(sig: inspect.Signature) -> str:
    return next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), "kwargs")


def family_of(model: nn.Module) -> Family:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    # Anything shaped like Llama (a `layers` list and a final `norm`) is treated as the Llama family.
    llama = FAMILIES[0]
    if any(isinstance(_get(model, p), nn.ModuleList) for p in llama.blocks) and any(_get(model, p) for p in llama.norm):
        return llama
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise UnsupportedModelError(
        f"depthmix does not support {type(model).__name__} (model_type={model_type!r}). "
        f"Supported families: {supported}, and any Llama-like model with `model.layers` and `model.norm`."
    )


def resolve(model: nn.Module) -> Arch:
    fam = family_of(model)
    blocks_path = next((p for p in fam.blocks if isinstance(_get(model, p), nn.ModuleList)), None)
    if blocks_path is None:
        raise UnsupportedModelError(f"{type(model).__name__}: no block list found at any of {fam.blocks}")
    norm_path = next((p for p in fam.norm if _get(model, p) is not None), None)
    head_path = next((p for p in fam.heads if isinstance(_get(model, p), nn.Module)), None)
    return Arch(fam, _get(model, blocks_path), blocks_path, _get(model, norm_path) if norm_path else None,
                norm_path, _get(model, head_path) if head_path else None, head_path)


def fingerprint(model: nn.Module) -> dict:
    """What an adapter records about its base model, to refuse loading onto another one."""
    arch = resolve(model)
    cfg = model.config
    return {
        "family": arch.family.name,
        "model_type": cfg.model_type,
        "model_class": type(model).__name__,
        "num_layers": arch.num_layers,
        "hidden_size": getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None),
        "num_heads": _first(cfg, "num_attention_heads", "n_head"),
        "num_kv_heads": _first(cfg, "num_key_value_heads"),
        "intermediate_size": _first(cfg, "intermediate_size", "n_inner"),
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


def _first(cfg, *names):
    return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)
