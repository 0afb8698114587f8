"""Training options: one dataclass, filled from a YAML/JSON file and then from command-line flags."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, checked_type
from ..io import not_utf8
from ..evaluation.scorers import CHOICE_MODES
from ..tuners import METHODS
from ..tuners.base import reserve_names

METHOD_NAMES = ("lora", *METHODS)  # LoRA alone, or a registered method


@dataclass
class TrainOptions:
    """Options of `depthmix train` (each is also a --flag and a key of a --config file)."""

    method: str = field(default="lora", metadata={"help":
        "lora (LoRA alone) or a depth-mixing method, trained on top of LoRA unless lora is false."})
    model: str = field(default="minilm-l6", metadata={"help":
        "an embedded model name, a local model folder, or a Hugging Face Hub id."})
    task: str = field(default="pydoc/topics", metadata={"help": "the task to train and evaluate on."})
    output_dir: str = field(default="out/run", metadata={"help":
        "folder of the run: adapter, metrics.json, checkpoints; one live run at a time."})
    data_dir: str | None = field(default=None, metadata={"help":
        "local data folder (else $DEPTHMIX_DATA, else the Hub)."})
    max_train_samples: int | None = field(default=None, metadata={"help":
        "train on a seeded random subset of this many examples (default: all)."})
    max_eval_samples: int | None = field(default=None, metadata={"help":
        "evaluate on a random subset of this many examples (default: all)."})
    max_length: int = field(default=128, metadata={"help": "tokens per example; longer ones are cut."})
    epochs: float = field(default=3.0, metadata={"help": "passes over the training data (unless max_steps is set)."})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 trains for `epochs`."})
    batch_size: int = field(default=16, metadata={"help": "training examples per device and step."})
    eval_batch_size: int = field(default=64, metadata={"help": "examples per batch in the final evaluation."})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help":
        "generation tasks: cap on generated tokens in the final evaluation (default: the task's)."})
    eval_mode: str | None = field(default=None, metadata={"help":
        "multiple-choice tasks: loglik, loglik-text or generate (default: the task's)."})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps."})
    lr: float = field(default=5e-4, metadata={"help": "learning rate of the adapter (LoRA) weights."})
    router_lr: float | None = field(default=None, metadata={"help":
        "learning rate of gates, routers and alpha (default: the method's)."})
    router_weight_decay: float = field(default=0.0, metadata={"help":
        "AdamW weight decay of gates, routers and alpha (the public MoLEx GLUE runs: 0.1)."})
    weight_decay: float = field(default=0.0, metadata={"help":
        "AdamW weight decay of the adapter weights (not of biases and norms, as in the HF Trainer)."})
    warmup: float = field(default=0.06, metadata={"help":
        "fraction of the steps with a linear learning-rate warmup, in [0, 1)."})
    seed: int = field(default=0, metadata={"help":
        "seed of the initialisation, the data order and the training subset."})
    train_pooler: bool = field(default=False, metadata={"help":
        "sequence classification: train the encoder's pooler (BERT: dense + tanh on [CLS]) with the head; "
        "sentence-embedding models (minilm-l6 was trained mean-pooled) never trained theirs."})
    lora: bool = field(default=True, metadata={"help":
        "train LoRA adapters (with the method, or alone for method lora)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input, in [0, 1)."})
    lora_targets: list[str] | None = field(default=None, metadata={"help":
        "module names LoRA wraps, e.g. q_proj,v_proj (default: PEFT's for the model type)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA (weight-decomposed LoRA) instead of LoRA."})
    method_config: dict[str, Any] = field(default_factory=dict, metadata={"help":
        "fields of the method's config (MoLExConfig, MoDConfig, MoDEConfig); in a --config file."})
    save_steps: int = field(default=500, metadata={"help": "steps between checkpoints."})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept."})
    logging_steps: int = field(default=10, metadata={"help": "steps between logged losses."})
    resume: bool = field(default=False, metadata={"help":
        "continue an interrupted run in output_dir from its newest intact checkpoint."})
    gradient_checkpointing: bool = field(default=False, metadata={"help":
        "recompute activations in the backward pass (less memory, slower)."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision."})
    progress: bool = field(default=True, metadata={"help": "progress bars."})

    def validate(self, source: str = "") -> None:
        """Types first (a config file can hold anything), then values; every message names the option."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, checked_type(f.name, getattr(self, f.name), f.type, source))
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"method = {self.method!r}: expected one of {METHOD_NAMES}")
        if self.method == "lora" and not self.lora:
            raise ConfigError("method = 'lora' with lora = false trains nothing")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "max_length", "lora_r", "lora_alpha",
                     "save_steps", "save_total_limit", "logging_steps", "max_train_samples", "max_eval_samples",
                     "eval_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} = {value!r}: expected an integer >= 1")
        if not 0 <= self.seed < 2**32:  # numpy's range
            raise ConfigError(f"seed = {self.seed!r}: expected an integer in [0, 2**32 - 1]")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError(f"max_steps = {self.max_steps!r}: expected -1 (train for `epochs`) or an integer >= 1")
        for name in ("lr", "epochs", "router_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} = {value!r}: expected a number > 0")
        for name in ("weight_decay", "router_weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: expected a number >= 0")
        for name in ("warmup", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: expected a fraction in [0, 1)")
        if self.eval_mode is not None and self.eval_mode not in CHOICE_MODES:
            raise ConfigError(f"eval_mode = {self.eval_mode!r}: expected one of {CHOICE_MODES}")


reserve_names(TrainOptions)


def load_options_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file of TrainOptions fields (method config fields may sit under `method_config`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: a folder; --config takes a YAML or JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(not_utf8(path, e)) from None
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=UniqueKeyLoader) or {}
        else:
            data = json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except Exception as e:
        raise ConfigError(f"{path}: cannot parse ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {unknown}; known: {sorted(known)}")
    types = {f.name: f.type for f in dataclasses.fields(TrainOptions)}
    return {name: checked_type(name, value, types[name], str(path)) for name, value in data.items()}


class DuplicateKey(ValueError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is refused (PyYAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKey(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def unique_keys(pairs: list) -> dict:
    """json.loads's object_pairs_hook: a key given twice in one object is refused."""
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise DuplicateKey(f"key {twice!r} is given twice")
    return dict(pairs)
