"""The public entry point: apply a method (and optionally a PEFT LoRA/DoRA adapter) to a HF model."""
from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path

import torch
from torch import nn

from . import io
from . import lora as lora_layers
from .config import MethodConfig
from .io import AdapterError
from .architectures import fingerprint, resolve
from .generation import Decoding
from .tuners import METHODS
from .tuners.base import detach_all
from .runtime import device_of

CONFIG_NAME = "depthmix_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "depthmix-adapter/1"
_ABSENT = object()


class DepthMixModel(nn.Module):
    """A HF model with a depth-mixing method and/or a LoRA adapter. Forward, outputs and generate() are the
    base model's; auxiliary losses are added to `outputs.loss`."""

    def __init__(self, model: nn.Module, config: MethodConfig | None = None, lora=None,
                 train_head: bool | None = None, train_pooler: bool = False):
        super().__init__()
        if isinstance(model, DepthMixModel):
            raise TypeError("this model already carries depthmix; apply to the plain base model")
        if config is not None and not isinstance(config, MethodConfig):
            raise TypeError(f"config must be a depthmix method config (MoLExConfig, ...), got {type(config).__name__}")
        refuse_carried(model)
        refuse_meta(model)
        arch = resolve(model)
        if lora is not None:
            lora_layers.check(lora, model)
        self.fingerprint = fingerprint(model)
        self.method_config = config
        self.lora_config = lora
        self.base_model = model
        self.arch = arch
        self.method = None
        self._hooks = []
        self._bypassed = False
        # What teardown() puts back: every parameter's requires_grad, a trained head's weights, peft's model attribute
        self._grad_flags = [(p, p.requires_grad) for p in model.parameters()]
        self._head_backup = []
        self._peft_config = model.__dict__.get("peft_config", _ABSENT)
        try:
            self._attach(model, config, lora, train_head, train_pooler)
        except BaseException:
            self._teardown()
            raise
        self._base_signature = inspect.signature(model.forward)
        # Trainer keeps the dataset columns that forward() names: show the base model's signature.
        self.forward = Forward(self, _with_prompt_mask(self._base_signature))

    def _attach(self, model, config, lora, train_head, train_pooler) -> None:
        arch = self.arch
        if lora is not None:
            from peft import inject_adapter_in_model
            inject_adapter_in_model(lora, model)
            arch = self.arch = resolve(model)  # LoRA may have wrapped the head or norm: find the modules as they are now
        for name, p in model.named_parameters():
            p.requires_grad_(lora is not None and "lora_" in name)
        self.train_head = type(model).__name__.endswith("ForSequenceClassification") if train_head is None else train_head
        if self.train_head and arch.head is not None:
            # The head is trained in place: keep its weights, for unload() and disable_adapter()
            self._head_backup = [(p, p.detach().clone()) for p in arch.head.parameters()]
            arch.head.requires_grad_(True)
        self.train_pooler = train_pooler
        if train_pooler:
            self._train_pooler(model)
        if config is not None:
            method_cls = METHODS[config.method][1]
            self.method = method_cls(config, arch, self.fingerprint["hidden_size"])
            self.method.to(device_of(model))
        # the method's own tensors always belong to the adapter, also frozen ones (MoLEx's frozen-gate control)
        self.adapter_names = [n for n, p in self.named_parameters() if p.requires_grad or n.startswith("method.")]
        self._hooks = [model.register_forward_pre_hook(self._begin, with_kwargs=True),
                       model.register_forward_hook(self._finish, with_kwargs=True)]

    def _train_pooler(self, model) -> None:
        """The encoder's pooler (BERT: dense + tanh on [CLS]) trains with the head, and is restored like it."""
        pooler = find_pooler(model)
        if pooler is None:
            raise ValueError(f"train_pooler=True: {type(model).__name__} has no pooler (only BERT-style sequence "
                             "classifiers pool through one; RoBERTa's head has its own dense layer)")
        self._head_backup += [(p, p.detach().clone()) for p in pooler.parameters()]
        pooler.requires_grad_(True)

    def _teardown(self, keep_head: bool = False, merge: bool = False) -> None:
        """Undo _attach, whatever part of it was done: hooks, wrapped modules, LoRA layers, requires_grad flags."""
        model = self.base_model
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.method is not None:
            self.method.detach()
        detach_all(model)
        if self.lora_config is not None:
            lora_layers.remove(model, merge=merge)
            if self._peft_config is not _ABSENT:
                model.peft_config = self._peft_config
        if not keep_head:
            self._swap_head()
        self._head_backup = []
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)

    def _swap_head(self) -> None:
        """Exchange the head's weights with the saved ones (calling it twice puts them back)."""
        with torch.no_grad():
            for p, saved in self._head_backup:
                current = p.detach().clone()
                p.copy_(saved)
                saved.copy_(current)

    # -- a way back ---------------------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Remove everything depthmix put into the base model (method, LoRA layers and their weights, hooks; a
        trained head gets its original weights back) and return it, as it was before apply()."""
        return self._release(merge=False)

    def merge_and_unload(self) -> nn.Module:
        """Merge the LoRA weights (and a trained head) into the base model and return it; for LoRA alone: a
        method's routing has no merged form."""
        if self.method is not None:
            raise ValueError(f"merge_and_unload(): the {self.method_config.method} method cannot be merged into the "
                             "base model's weights; use unload() to remove it with the LoRA")
        return self._release(merge=True)

    def _release(self, merge: bool) -> nn.Module:
        model = self.base_model
        self._teardown(keep_head=merge, merge=merge)
        self.method = None
        del self.base_model
        self._unloaded = True
        return model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Runs the base model alone inside the block: the method bypassed, LoRA layers off, a trained head's
        original weights in place; all restored on exit, also after an exception."""
        flags = [(p, p.requires_grad) for p in self.parameters()]
        bypassed, self._bypassed = self._bypassed, True
        try:
            with contextlib.ExitStack() as stack:
                if self.method is not None:
                    stack.enter_context(self.method.bypassed())
                if self.lora_config is not None:
                    stack.enter_context(lora_layers.disabled(self.base_model))
                self._swap_head()
                stack.callback(self._swap_head)
                yield self
        finally:
            self._bypassed = bypassed
            for p, flag in flags:
                p.requires_grad_(flag)

    # -- forward ------------------------------------------------------------------------------------------
    def _forward(self, *args, prompt_mask=None, **kwargs):
        """prompt_mask: [batch, length] bool, True on each sequence's prompt (MoLEx sequence routing in a causal LM
        decides on it); the leading run of marked real tokens counts. Without it: labels -100, else the first
        token. It goes to the method only, never to the base model."""
        self._prompt_mask = prompt_mask
        try:
            return self.base_model(*args, **kwargs)
        finally:
            self._prompt_mask = None

    def _begin(self, module, args, kwargs):
        if self.method is not None and not self._bypassed:
            named = self._base_signature.bind_partial(*args, **kwargs).arguments
            named.update(named.pop("kwargs", {}))
            if getattr(self, "_prompt_mask", None) is not None:
                named["prompt_mask"] = self._prompt_mask
            self.method.begin(named)

    def _finish(self, module, args, kwargs, output):
        return self.method.finish(output) if self.method is not None and not self._bypassed else output

    def generate(self, *args, **kwargs):
        if self.method is None or self._bypassed:
            return self.base_model.generate(*args, **kwargs)
        if not self.method.supports_cache:
            kwargs["use_cache"] = False
        # the method sees the decoding as transformers will run it (keywords, generation_config, the model's own)
        with self.method.generating(Decoding(self.base_model, args, kwargs)):
            return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                if self.__dict__.get("_unloaded"):
                    raise AttributeError("this DepthMixModel was unloaded: use the model unload() returned") from None
                raise
            return getattr(self.base_model, name)

    # -- parameters ---------------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n] for n in self.adapter_names}

    def trainable_parameters(self) -> tuple[int, int]:
        def n(p):  # a ZeRO-3 rank holds a shard (or nothing) of p: ds_numel is p's whole size
            return getattr(p, "ds_numel", p.numel())
        return sum(n(p) for p in self.parameters() if p.requires_grad), sum(n(p) for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters split into the method's routers/gates ("router") and the rest ("adapter")."""
        method = {id(p) for p in self.method.parameters()} if self.method is not None else set()
        groups = {"adapter": [], "router": []}
        for p in self.parameters():
            if p.requires_grad:
                groups["router" if id(p) in method else "adapter"].append(p)
        return groups

    # -- save / load --------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None, info: dict | None = None) -> None:
        """Writes the adapter (new and trainable tensors only) and its config; each file atomically.

        state_dict: a full state dict gathered by FSDP/DeepSpeed, to take the adapter tensors from.
        info: free-form facts recorded beside the config (base model name, task...)."""
        path = Path(path)
        if self.__dict__.get("_unloaded"):
            raise ValueError(f"save_pretrained({path}): this DepthMixModel was unloaded, and its adapter with it; "
                             "save before unload()")
        if state_dict is None:
            tensors = self.adapter_state_dict()
        else:
            missing = [n for n in self.adapter_names if n not in state_dict]
            if missing:  # names under a wrapper's prefix, say: nothing is written rather than a partial adapter
                raise AdapterError(f"save_pretrained({path}): the gathered state dict lacks {len(missing)} adapter "
                                   f"tensors, e.g. {missing[:3]} (its keys look like {list(state_dict)[:3]})")
            tensors = {n: state_dict[n] for n in self.adapter_names}
        digest = io.save_tensors(path / WEIGHTS_NAME, tensors, {"format": FORMAT})
        io.write_json(path / CONFIG_NAME, {
            "format": FORMAT,
            "method": self.method_config.method if self.method_config else None,
            "config": self.method_config.to_dict() if self.method_config else None,
            "lora": _lora_to_dict(self.lora_config),
            "train_head": self.train_head,
            "train_pooler": self.train_pooler,
            "base": self.fingerprint,
            "weights_sha256": digest,
            "info": info or {},
        })

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        """Loads adapter tensors saved by save_pretrained into this (identically configured) model."""
        meta = read_adapter_config(path)
        check_base(meta, self.base_model, path)
        self._copy_in(read_weights(path, meta), path)

    def _copy_in(self, tensors: dict[str, torch.Tensor], path) -> None:
        expected = self.adapter_state_dict()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise AdapterError(f"{Path(path) / WEIGHTS_NAME}: tensors do not match the adapter config "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise AdapterError(f"{Path(path) / WEIGHTS_NAME}: {name} has shape {tuple(tensor.shape)}, "
                                   f"the model expects {tuple(expected[name].shape)}")
            if tensor.is_floating_point() != expected[name].is_floating_point():  # float16 <-> float32 is a cast
                raise AdapterError(f"{Path(path) / WEIGHTS_NAME}: {name} is stored as {tensor.dtype}, the model "
                                   f"expects {expected[name].dtype}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                expected[name].copy_(tensor)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike, is_trainable: bool = False) -> "DepthMixModel":
        """Loads an adapter saved by save_pretrained onto `model`. The config, the base fingerprint and the weights'
        sha256 are checked before anything touches the model; tensor names and shapes once the adapter is built,
        and on a mismatch (or any other failure) the model is put back as it was (see unload())."""
        meta = read_adapter_config(path)
        check_base(meta, model, path)
        tensors = read_weights(path, meta)
        wrapped = cls(model, method_config_from(meta, path), _lora_from_dict(meta["lora"], path), meta["train_head"],
                      bool(meta.get("train_pooler", False)))
        try:
            wrapped._copy_in(tensors, path)
        except BaseException:
            wrapped._teardown()  # the base model is left as it was, ready for the right adapter
            raise
        if not is_trainable:
            wrapped.eval()
            for p in wrapped.parameters():
                p.requires_grad_(False)
        return wrapped


def apply(model: nn.Module, config: MethodConfig | None = None, lora=None, train_head: bool | None = None,
          train_pooler: bool = False):
    """Like `peft.get_peft_model`: `config` is a depthmix method config (or None for LoRA alone),
    `lora` a `peft.LoraConfig` (or None for the method alone). train_head: train the classifier head (default: for
    sequence classifiers); train_pooler: train the encoder's pooler with it (a sentence-embedding model such as
    all-MiniLM-L6-v2 was trained mean-pooled: its BERT pooler never was)."""
    return DepthMixModel(model, config, lora, train_head, train_pooler)


def find_pooler(model: nn.Module) -> nn.Module | None:
    """The pooler of a BERT-style model (model.bert.pooler), or None."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    pooler = getattr(base, "pooler", None)
    return pooler if isinstance(pooler, nn.Module) else None


def refuse_carried(model: nn.Module) -> None:
    """One depthmix model per base model, and no other PEFT layers: a second method or LoRA would silently stack on
    the first, and depthmix would freeze foreign layers and leave them out of its adapter."""
    name = type(model).__name__
    for hook in [*model._forward_pre_hooks.values(), *model._forward_hooks.values()]:
        if isinstance(getattr(hook, "__self__", None), DepthMixModel):
            raise ValueError(f"{name} already carries a depthmix model ({_describe(hook.__self__)}); "
                             "call its unload() first, or use it as it is: stacking methods is not supported")
    for path, module in model.named_modules():
        if getattr(type(module), "_depthmix_mixin_of", None) is not None or "_depthmix" in vars(module):
            raise ValueError(f"{name} already carries a depthmix method at {path!r}; call unload() first")
    carried = lora_layers.carried(model)
    if carried is not None:
        raise ValueError(f"{name} already carries PEFT adapter layers (at {carried!r}): depthmix would freeze them "
                         "and leave them out of its adapter. Merge or unload them first (peft's merge_and_unload()), "
                         "or let depthmix add the LoRA: apply(base_model, config, lora=LoraConfig(...)) trains and "
                         "saves it with the method")


def refuse_meta(model: nn.Module) -> None:
    """A model on the meta device has no values to hold: to_empty() would later leave depthmix's weights (new ones,
    or an adapter's) uninitialised while the base model's weights are loaded. Allowed in a distributed run, where
    it is FSDP's cpu_ram_efficient_loading: every rank but the first holds meta weights, and FSDP fills them all,
    depthmix's included, from the first rank's (sync_module_states)."""
    on_meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    if on_meta is not None and not distributed:
        raise ValueError(f"{type(model).__name__} has weights on the meta device (e.g. {on_meta!r}): depthmix's own "
                         "weights would be lost when it is materialised (to_empty() leaves them uninitialised). Load "
                         "the base model's weights first, then apply() or from_pretrained()")


def _describe(dm: "DepthMixModel") -> str:
    parts = [dm.method_config.method] if dm.method_config is not None else []
    return " + ".join(parts + (["LoRA"] if dm.lora_config is not None else [])) or "nothing"


def read_adapter_config(path) -> dict:
    file = Path(path) / CONFIG_NAME
    meta = io.read_json(file)
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{file}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("method", "config", "lora", "train_head", "base", "weights_sha256"):
        if key not in meta:
            raise AdapterError(f"{file}: missing field {key!r}")
    if not isinstance(meta["weights_sha256"], str) or len(meta["weights_sha256"]) != 64:
        raise AdapterError(f"{file}: field 'weights_sha256' is {meta['weights_sha256']!r}, expected the 64 hex "
                           f"digits of the sha256 of {WEIGHTS_NAME}")
    if not isinstance(meta["base"], dict):
        raise AdapterError(f"{file}: field 'base' is {meta['base']!r}, expected the base model's fingerprint")
    for key, (kinds, expected) in FIELD_KINDS.items():
        if key in meta and not isinstance(meta[key], kinds):
            raise AdapterError(f"{file}: field {key!r} is {meta[key]!r}, expected {expected}")
    if meta["method"] is not None and meta["config"] is None:
        raise AdapterError(f"{file}: field 'config' is null, expected the {meta['method']} method's config (an object)")
    return meta


# the type of each field of an adapter config, and what to call it in a message
FIELD_KINDS = {"method": ((str, type(None)), "a method name or null"),
               "config": ((dict, type(None)), "the method's config (an object), or null for LoRA alone"),
               "lora": ((dict, type(None)), "a peft LoraConfig (an object) or null"),
               "train_head": (bool, "true or false"), "train_pooler": (bool, "true or false"),
               "info": (dict, "an object")}


def read_weights(path, meta: dict) -> dict[str, torch.Tensor]:
    weights = Path(path) / WEIGHTS_NAME
    if not weights.exists():
        raise AdapterError(f"{weights}: file not found")
    if io.sha256(weights) != meta["weights_sha256"]:
        raise AdapterError(f"{weights}: contents do not match {CONFIG_NAME} (sha256 differs); "
                           "the adapter folder holds files from two different saves")
    return io.load_tensors(weights)


def method_config_from(meta: dict, path) -> MethodConfig | None:
    if meta["method"] is None:
        return None
    if meta["method"] not in METHODS:
        raise AdapterError(f"{Path(path) / CONFIG_NAME}: field 'method' is {meta['method']!r}; "
                           f"known methods: {sorted(METHODS)}")
    return METHODS[meta["method"]][0].from_dict(meta["config"], source=str(Path(path) / CONFIG_NAME))


BASE_KEYS = ("family", "model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size",
             "vocab_size")


def check_base(meta: dict, model: nn.Module, path) -> None:
    """Refuse an adapter made for another base model, before touching any weight."""
    have = fingerprint(model)
    want = meta["base"]
    keys = BASE_KEYS + (("model_class",) if "model_class" in want else ())  # a head made for one task, not another
    diffs = [f"{k}: adapter {want.get(k)!r} vs model {have.get(k)!r}"
             for k in keys if want.get(k) != have.get(k)]
    if diffs:
        raise AdapterError(f"{path}: this adapter was saved for another base model ({want.get('model_class')}); "
                           + "; ".join(diffs))


def _with_prompt_mask(signature):
    """The base model's signature with the keyword-only `prompt_mask` (before **kwargs, if any)."""
    params = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    extra = inspect.Parameter("prompt_mask", inspect.Parameter.KEYWORD_ONLY, default=None)
    rest = [p for p in signature.parameters.values() if p.kind == p.VAR_KEYWORD]
    return signature.replace(parameters=params + [extra] + rest)


class Forward:
    """DepthMixModel.forward: its _forward under the base model's signature. An object holding the model rather
    than a closure, so that deepcopy and pickle give a copy a forward of its own (a closure is shared)."""

    def __init__(self, model: DepthMixModel, signature: inspect.Signature):
        self.model = model
        self.__signature__ = signature
        self.__doc__ = DepthMixModel._forward.__doc__

    def __call__(self, *args, **kwargs):
        return self.model._forward(*args, **kwargs)


def _lora_to_dict(lora) -> dict | None:
    return None if lora is None else lora.to_dict()  # JSON-ready once io.write_json turns its sets and enums


def _lora_from_dict(data: dict | None, path):
    if data is None:
        return None
    from peft import LoraConfig
    if data.get("peft_type", "LORA") != "LORA":  # from_peft_type would build that type's config instead
        raise AdapterError(f"{Path(path) / CONFIG_NAME}: field 'lora' has peft_type {data['peft_type']!r}; "
                           "depthmix adapters carry LoRA/DoRA ('LORA')")
    try:
        return LoraConfig.from_peft_type(**{"peft_type": "LORA", **data})
    except (TypeError, ValueError) as e:  # an unknown field, or a value peft refuses
        raise AdapterError(f"{Path(path) / CONFIG_NAME}: field 'lora' is not a peft LoraConfig ({e})") from None
