"""Training options: one dataclass, filled from a YAML/JSON file and then from command-line flags."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError

METHOD_NAMES = ("lora", "molex", "mod", "mode")


@dataclass
class TrainOptions:
    method: str = "lora"  # lora (LoRA alone) or a depthmix method, on top of LoRA unless lora=False
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
    eval_max_new_tokens: int | None = None  # generation tasks: cap on generated tokens in the final eval
    eval_mode: str | None = None  # multiple-choice tasks: loglik, loglik-text or generate
    grad_accum: int = 1
    lr: float = 5e-4
    router_lr: float | None = None  # gates/routers/alpha; None = the method's default
    weight_decay: float = 0.0
    warmup: float = 0.06  # fraction of the steps
    seed: int = 0
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None  # None = the architecture's defaults
    use_dora: bool = False
    method_config: dict[str, Any] = field(default_factory=dict)  # fields of MoLExConfig / MoDConfig / ...
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    resume: bool = False
    gradient_checkpointing: bool = False
    bf16: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"method = {self.method!r}: expected one of {METHOD_NAMES}")
        if self.method == "lora" and not self.lora:
            raise ConfigError("method = 'lora' with lora = false trains nothing")
        for name in ("batch_size", "eval_batch_size", "grad_accum", "max_length", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: expected an integer >= 1")
        for name in ("lr", "epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: expected a number > 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup = {self.warmup!r}: expected a fraction in [0, 1)")


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
    return data
