"""Training options: one dataclass, filled from a YAML/JSON file and then from command-line flags."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..tuners import METHODS

METHOD_NAMES = ("lora", *METHODS)  # LoRA alone, or a registered method


@dataclass
class TrainOptions:
    """Options of `depthmix train` (each is also a --flag and a key of a --config file).

    method: lora (LoRA alone) or a depth-mixing method, trained on top of LoRA unless lora is false.
    model: an embedded model name, a local model folder, or a Hugging Face Hub id.
    task: the task to train and evaluate on.
    output_dir: folder of the run: adapter, metrics.json, checkpoints; one live run at a time.
    data_dir: local data folder (else $DEPTHMIX_DATA, else the Hub).
    max_train_samples: train on a seeded random subset of this many examples (default: all).
    max_eval_samples: evaluate on a random subset of this many examples (default: all).
    max_length: tokens per example; longer ones are cut.
    epochs: passes over the training data (unless max_steps is set).
    max_steps: optimizer steps; -1 trains for `epochs`.
    batch_size: training examples per device and step.
    eval_batch_size: examples per batch in the final evaluation.
    eval_max_new_tokens: generation tasks: cap on generated tokens in the final evaluation (default: the task's).
    eval_mode: multiple-choice tasks: loglik, loglik-text or generate (default: the task's).
    grad_accum: gradient accumulation steps.
    lr: learning rate of the adapter (LoRA) weights.
    router_lr: learning rate of gates, routers and alpha (default: the method's).
    router_weight_decay: AdamW weight decay of gates, routers and alpha (the public MoLEx GLUE runs: 0.1).
    retrofit_loss: MoD router tuning (update retrofit): distill (KL from the same model with routing bypassed) or lm.
    weight_decay: AdamW weight decay of the adapter weights (not of biases and norms, as in the HF Trainer).
    warmup: fraction of the steps with a linear learning-rate warmup, in [0, 1).
    seed: seed of the initialisation, the data order and the training subset.
    train_pooler: sequence classification: train the encoder's pooler (BERT: dense + tanh on [CLS]) with the head;
        sentence-embedding models (minilm-l6 was trained mean-pooled) never trained theirs.
    lora: train LoRA adapters (with the method, or alone for method lora).
    lora_r: LoRA rank.
    lora_alpha: LoRA scaling numerator (scale = lora_alpha / lora_r).
    lora_dropout: dropout on the LoRA input, in [0, 1).
    lora_targets: module names LoRA wraps, e.g. q_proj,v_proj (default: PEFT's for the model type).
    use_dora: DoRA (weight-decomposed LoRA) instead of LoRA.
    method_config: fields of the method's config (MoLExConfig, MoDConfig, MoDEConfig); in a --config file.
    save_steps: steps between checkpoints.
    save_total_limit: checkpoints kept.
    logging_steps: steps between logged losses.
    resume: continue an interrupted run in output_dir from its newest intact checkpoint.
    gradient_checkpointing: recompute activations in the backward pass (less memory, slower).
    bf16: bfloat16 mixed precision.
    progress: progress bars.
    """

    method: str = "lora"
    model: str = "minilm-l6"
    task: str = "pydoc/topics"
    output_dir: str = "out/run"
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 128
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 16
    eval_batch_size: int = 64
    eval_max_new_tokens: int | None = None
    eval_mode: str | None = None
    grad_accum: int = 1
    lr: float = 5e-4
    router_lr: float | None = None
    router_weight_decay: float = 0.0
    retrofit_loss: str | None = None
    weight_decay: float = 0.0
    warmup: float = 0.06
    seed: int = 0
    train_pooler: bool = False
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None
    use_dora: bool = False
    method_config: dict[str, Any] = field(default_factory=dict)
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    resume: bool = False
    gradient_checkpointing: bool = False
    bf16: bool = False
    progress: bool = True

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
        if self.eval_mode is not None and self.eval_mode not in EVAL_MODES:
            raise ConfigError(f"eval_mode = {self.eval_mode!r}: expected one of {EVAL_MODES}")


EVAL_MODES = ("loglik", "loglik-text", "generate")


def checked_type(name: str, value, annotation, source: str):
    """value if it has the field's type (ints are accepted for floats; YAML 1.1 reads `1e-4` as a string, so a
    string holding a number is too), else a ConfigError naming the source, the option and the value."""
    kind = str(annotation).replace(" ", "")
    optional = kind.endswith("|None")
    if value is None and optional:
        return None
    check = TYPE_CHECKS.get(kind.removesuffix("|None").split("[")[0], lambda v: (v, None))
    value, problem = check(value)
    if problem:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}{name} = {value!r}: expected {problem}" + (" or null" if optional else ""))
    return value


def _bool(value):
    return value, None if isinstance(value, bool) else "true or false (a string such as 'false' is not a boolean)"


def _int(value):
    return value, None if isinstance(value, int) and not isinstance(value, bool) else "an integer"


def _float(value):
    number = _number(value)
    if number is None:
        return value, "a number"
    return (number, None) if math.isfinite(number) else (value, "a finite number")


def _str(value):
    return value, None if isinstance(value, str) else "a string (quote it in a YAML file)"


def _list_of_str(value):
    value = [value] if isinstance(value, str) else value
    ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    return value, None if ok else "a non-empty list of strings"


def _dict(value):
    return value, None if isinstance(value, dict) else "a mapping"


TYPE_CHECKS = {"bool": _bool, "int": _int, "float": _float, "str": _str, "list": _list_of_str, "dict": _dict}


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def load_options_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file of TrainOptions fields (method config fields may sit under `method_config`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
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
