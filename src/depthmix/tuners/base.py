"""What every method shares: a per-forward context, auxiliary losses, and attaching to blocks."""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
from torch import nn

from ..blocks import restore_class, swap_class
from ..config import ConfigError
from ..architectures import Arch


METHODS: dict[str, tuple[type, type]] = {}  # name -> (config class, Method subclass), filled by register()
OPTION_NAMES: dict[str, str] = {}  # option name -> the options class declaring it, filled by reserve_names()


def register(config_cls: type, method_cls: type) -> None:
    """Make a method known to apply(), adapter loading, the CLI and the trainer: one call, in its own package."""
    check_names(config_cls)
    METHODS[config_cls.method] = (config_cls, method_cls)


def reserve_names(options_cls: type) -> None:
    """The fields of options_cls (the trainer's options) are flags beside every method's fields: a method field of
    the same name would share one flag with two meanings, so it is refused, for methods registered before or after."""
    OPTION_NAMES.update({f.name: options_cls.__name__ for f in dataclasses.fields(options_cls)})
    for config_cls, _ in METHODS.values():
        check_names(config_cls)


def check_names(config_cls: type) -> None:
    clash = [f.name for f in dataclasses.fields(config_cls) if f.name in OPTION_NAMES]
    if clash:
        raise ConfigError(f"{config_cls.__name__}: field(s) {clash} are also options of {OPTION_NAMES[clash[0]]}; "
                          "rename them (one --flag cannot carry two meanings)")


class Method(nn.Module):
    """Model-level wiring of one method. Its parameters (routers, gates, norms) live here, in float32."""

    supports_cache = True  # False: generate() must recompute the whole sequence at each step
    routings: tuple[str, ...] = ()  # routing modes a user may choose between (MoD's), empty for the others
    compared_routings: tuple[str, ...] = ()  # the modes a study reports side by side (held-out loss, FLOPs)
    draws_routing = False  # True: routing_record() summarises what the routers learned, for a picture
    recording = False  # routing statistics are gathered while True

    def __init__(self, config, arch: Arch):
        super().__init__()
        self.config = config
        self.arch = arch  # a plain dataclass: its modules stay registered in the base model only
        self.inputs: dict = {}
        self.aux: list[torch.Tensor] = []
        self._seen: dict = {}
        self._swapped: list[nn.Module] = []
        self._reentrant: list[tuple[nn.Module, functools.partial]] = []  # blocks' checkpointing as the user set it

    def _apply(self, fn, recurse=True):
        """Moves (.to(device), .cuda(), to_empty) apply; dtype casts of the whole model (.half(), .to(bfloat16))
        leave the method's float32 tensors as they are: routing decisions stay float32 in a half-precision model."""
        def keep_float32(t):
            moved = fn(t)
            return t.to(device=moved.device) if t.dtype == torch.float32 and moved.dtype != t.dtype else moved
        return super()._apply(keep_float32, recurse)

    def __getstate__(self):
        """A copy (deepcopy, pickle) starts between forwards: the last forward's inputs and auxiliary losses (in its
        autograd graph, which cannot be copied) stay with the original."""
        state = dict(super().__getstate__())
        state["inputs"], state["aux"] = {}, []
        return state

    # -- wiring ---------------------------------------------------------------------------------------
    def wrap(self, module: nn.Module, mixin: type, index: int) -> None:
        swap_class(module, mixin)
        module._depthmix = (self, index)  # a tuple, so the method is not registered as a child of the block
        self._swapped.append(module)

    def detach(self) -> None:
        for module in self._swapped:
            restore_class(module)
            del module._depthmix
        self._swapped.clear()
        for block, fn in self._reentrant:
            block._gradient_checkpointing_func = fn
        self._reentrant.clear()

    @contextlib.contextmanager
    def bypassed(self):
        """The wrapped modules run as they were (their original classes) for the duration of the block."""
        classes = [(module, type(module)) for module in self._swapped]
        for module, _ in classes:
            restore_class(module)
        try:
            yield
        finally:
            for module, cls in classes:
                module.__class__ = cls

    # -- per forward ----------------------------------------------------------------------------------
    def begin(self, inputs: dict) -> None:
        """Called before each forward of the base model with its named inputs (and those of `seeing`)."""
        check_prompt_mask(inputs)
        self.inputs = {**self._seen, **{k: v for k, v in inputs.items() if v is not None or k not in self._seen}}
        self.aux = []
        if self.training and torch.is_grad_enabled():
            self._checkpoint_without_reentry()

    def add_aux(self, loss: torch.Tensor) -> None:
        self.aux.append(loss)

    def aux_loss(self, like: torch.Tensor) -> torch.Tensor:
        """The sum of the auxiliary losses of the last forward (0 without any), in the dtype of `like`."""
        return sum((a.to(like.dtype) for a in self.aux), torch.zeros((), dtype=like.dtype, device=like.device))

    def finish(self, output):
        """Called after each forward of the base model; may change its output: the auxiliary losses join the loss
        where it has one (a ModelOutput's loss, or the first item of a return_dict=False tuple)."""
        if self.aux and getattr(output, "loss", None) is not None:
            output.loss = output.loss + self.aux_loss(output.loss)
        elif self.aux and isinstance(output, tuple) and self.inputs.get("labels") is not None \
                and self._seen.get("labels") is None and torch.is_tensor(output[0]) and output[0].dim() == 0:
            output = (output[0] + self.aux_loss(output[0]), *output[1:])  # a tuple starts with the loss
        # self.inputs stays until the next forward: gradient checkpointing re-runs blocks during backward.
        return output

    @contextlib.contextmanager
    def seeing(self, **inputs):
        """Forwards inside the block read `inputs` as if they had been given (a Trainer that scores the logits
        itself, e.g. with label smoothing, keeps the labels from the model; the method still needs them: where
        a prompt ends, which positions are scored). The model's loss is not computed from them: the caller adds
        aux_loss() to its own."""
        old, self._seen = self._seen, inputs
        try:
            yield
        finally:
            self._seen = old

    def _checkpoint_without_reentry(self) -> None:
        """Reentrant gradient checkpointing (use_reentrant=True, as PEFT's k-bit preparation asks) runs a block
        under no_grad in the forward pass: an auxiliary loss computed inside it would get no gradient, and the
        blocks' recomputation during backward comes after the loss. The blocks checkpoint without reentry
        instead: the same activations recomputed, and every loss reaches the weights."""
        for block in self.arch.blocks:
            fn = getattr(block, "_gradient_checkpointing_func", None)
            if isinstance(fn, functools.partial) and fn.keywords.get("use_reentrant", True) is not False:
                self._reentrant.append((block, fn))
                block._gradient_checkpointing_func = functools.partial(fn.func, *fn.args,
                                                                       **{**fn.keywords, "use_reentrant": False})

    def after_training(self, model, dataset) -> dict | None:
        """Called by `train` once training ends, before the adapter is saved, with the tokenized training set (rows
        with input_ids); a method that sets something from the trained model (MoD: its gates' thresholds) does it
        here and returns what it measured (in metrics.json), else None."""
        return None

    def training_loss(self, model, inputs: dict, progress: float):
        """(loss, outputs) of one training batch where the method trains on an objective of its own (e.g. MoD's
        router tuning, MoDConfig.retrofit_loss), else None: the model's loss. `model` is the DepthMixModel, maybe
        inside a DDP/FSDP wrapper; progress: the fraction of training done (for what anneals). The Trainer divides
        the loss by the gradient accumulation steps."""
        return None

    def valid_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: True for real tokens of the current call (padding False)."""
        mask = self.inputs.get("attention_mask")
        b, s = hidden.shape[:2]
        if isinstance(mask, dict):  # one prepared mask per attention kind (Gemma2's hybrid static cache): any will do
            mask = next(iter(mask.values()), None)
        if mask is not None and mask.dim() == 4:
            # a prepared [B, 1, q, kv] mask (generate() with a static cache): a real token sees at least one key,
            # a padding token none (bool: True where seen; additive float: 0 where seen)
            seen = mask[:, 0, -s:, :]
            seen = seen if seen.dtype == torch.bool else seen == 0
            return seen.any(-1).expand(b, s).to(hidden.device)
        if mask is None or mask.dim() != 2:
            return torch.ones(b, s, dtype=torch.bool, device=hidden.device)
        return mask[:, -s:].to(device=hidden.device, dtype=torch.bool)

    def generating(self, decoding):
        """Context entered around generate() (decoding: the call's depthmix.generation.Decoding); e.g. MoD switches
        to causal routing. A decoding the method's caches cannot follow is refused here (Decoding.refuse)."""
        return contextlib.nullcontext()

    def routing_mode(self, value: str):
        """A context in which forwards use the routing mode `value` (a method with `routings` overrides this)."""
        raise ConfigError(f"{type(self).__name__} has no routing modes to choose from (asked for {value!r})")

    def eval_routing(self) -> str | None:
        """What routing a forward outside training uses, recorded in every metrics file (MoD: "causal", or
        "topk-lookahead" where a study asked for it); None (JSON null) for a method without token routing."""
        return None

    def reset_stats(self) -> None:
        """Forget the routing statistics gathered so far (before an evaluation, say)."""

    def routing_record(self) -> dict:
        """The routing statistics gathered since reset_stats(), as JSON-ready lists (methods with draws_routing),
        with "picture": the kind evaluation.routing draws them as ("layer_choice": "counts" [mixed layer, layer]
        of how often each layer was chosen; "layer_weights": "mean_weights" and "weight_std" per ensembled layer,
        "label" the legend's default)."""
        raise NotImplementedError

    routing_title = ""  # what the routing picture shows

    def flop_report(self, model, dense_flops: int, batch_size: int, seq_len: int, seed: int, trained: bool):
        """(JSON-ready dict, one line) for `depthmix flops`: the FLOPs of `model` (the DepthMixModel carrying this
        method) counted on random tokens against the dense model's `dense_flops`, beside the method's own estimate
        (methods whose config has flop_fields)."""
        raise NotImplementedError

    def summary(self) -> dict:
        """Method-specific summaries a trainer may log (realized capacity, routing counts...)."""
        return {}

    def layer_lens(self, model, batches) -> dict:
        """How well each layer the method mixes predicts on its own, over the labelled tokens of `batches` (dicts of
        input_ids, attention_mask, labels): the premise of a method that ensembles layers. Others have none."""
        raise ConfigError(f"{type(self).__name__} mixes no layers' predictions: it has no layer lens")


def detach_all(model: nn.Module) -> None:
    """Undo every wrap in `model`, also those of a method whose construction failed half-way."""
    for module in model.modules():
        restore_class(module)
        module.__dict__.pop("_depthmix", None)


def check_prompt_mask(inputs: dict) -> None:
    """`prompt_mask` (a keyword of DepthMixModel.forward): [batch, length], the length of the input or of the
    attention mask (which also covers a KV cache's tokens)."""
    mask = inputs.get("prompt_mask")
    if mask is None:
        return
    ref = inputs.get("input_ids")
    ref = inputs.get("inputs_embeds") if ref is None else ref
    lengths = set() if ref is None else {ref.shape[1]}
    att = inputs.get("attention_mask")
    if att is not None and att.dim() == 2:
        lengths.add(att.shape[1])
    ok = torch.is_tensor(mask) and mask.dim() == 2 and (ref is None or mask.shape[0] == ref.shape[0]) \
        and (not lengths or mask.shape[1] in lengths)
    if not ok:
        got = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        want = "?" if ref is None else f"({ref.shape[0]}, {' or '.join(map(str, sorted(lengths)))})"
        raise ValueError(f"prompt_mask: expected a [batch, length] tensor of shape {want}, got {got}")


def float32_linear(d_in: int, d_out: int, bias: bool = True, zero: bool = False) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias, dtype=torch.float32)
    if zero:
        nn.init.zeros_(layer.weight)
        if bias:
            nn.init.zeros_(layer.bias)
    return layer
