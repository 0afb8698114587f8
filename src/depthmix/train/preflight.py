"""What can be checked before a model or a data set is loaded, so that a mistake fails in a second."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..config import ConfigError
from ..data.tasks import Task, data_root, get_task
from ..models import EMBEDDED, cache_dir
from ..architectures import FAMILIES
from ..tuners import METHODS
from ..evaluation.scorers import generates
from .options import TrainOptions


def preflight(opts: TrainOptions) -> tuple[Task, dict]:
    """Checks the options, the task, the data folder, the model name and the method config -> (task, the method
    config in full)."""
    opts.validate()
    task = get_task(opts.task)
    check_output_dir(opts.output_dir)
    check_data_dir(opts.data_dir)
    check_model(opts.model, task, opts.max_length)
    if opts.train_pooler and task.head != "sequence_classification":
        raise ConfigError(f"train_pooler = True: task {task.name!r} is not a sequence classification task (no pooler "
                          "feeds its head)")
    config = method_config(opts)
    if config is not None and generates(task, opts.eval_mode):
        try:
            config.check_decoding()
        except ConfigError as e:
            raise ConfigError(f"task {task.name!r} is scored by generating text, and {e}") from None
    return task, config.to_dict() if config is not None else {}


def method_config(opts: TrainOptions):
    if opts.method == "lora":
        if opts.method_config:
            raise ConfigError(f"method_config {opts.method_config} given, but method is 'lora'")
        return None
    return METHODS[opts.method][0].from_dict(opts.method_config, source="method_config")


def check_output_dir(output_dir: str) -> None:
    """A folder the run can create and write into: a file, '' (the working directory, by accident) or a read-only
    place fails here, before anything is written, not after training."""
    if not output_dir.strip():
        raise ConfigError("output_dir = '': expected a folder (e.g. out/run)")
    out = Path(output_dir).expanduser()
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())  # the run creates the rest
    if not existing.is_dir():
        raise ConfigError(f"output_dir = {output_dir!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir = {output_dir!r}: {existing} cannot be written (a read-only file system, or "
                          "no permission)")


def check_data_dir(data_dir) -> None:
    root = data_root(data_dir)
    if root is not None and not root.is_dir():
        name = "data_dir" if data_dir else "DEPTHMIX_DATA"
        raise ConfigError(f"{name} = {str(root)!r}: no such folder")


def check_model(name: str, task: Task, max_length: int | None = None) -> None:
    """An unknown name fails here, not after the Hub's retries; a causal LM task on an encoder too, and a
    max_length past a model's learned positions (an index error in the middle of training)."""
    config = model_config(name)
    if config is None:
        return
    family = next((f for f in FAMILIES if config.get("model_type") in f.model_types), None)
    if task.head == "causal_lm" and family is not None and not family.causal:
        raise ConfigError(f"task {task.name!r} trains a causal language model, but model {name!r} is an encoder "
                          f"(model_type {config.get('model_type')!r}): choose a decoder model")
    limit = position_limit(config, family)
    if max_length is not None and limit is not None and max_length > limit:
        raise ConfigError(f"max_length = {max_length}: model {name!r} has learned positions for {limit} tokens "
                          "at most (max_position_embeddings in its config.json)")


def position_limit(config: dict, family) -> int | None:
    """Tokens a model with learned absolute positions can take (None: rotary positions, no hard limit)."""
    if family is None or family.name == "llama":
        return None
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if limit is not None and family.name == "roberta":
        limit -= config.get("pad_token_id", 1) + 1  # RoBERTa's positions start after the padding index
    return limit


def model_config(name: str) -> dict | None:
    """The config.json of an embedded model, a local folder or a cached Hub model (None: not found here, but
    the Hub may have it)."""
    if name in EMBEDDED:
        path = embedded_config(name)
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser() / "config.json"
        if not path.exists():
            raise ConfigError(f"model {name!r}: the folder has no config.json")
    else:
        path = hub_config(name)
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {name!r}: cannot read {path} ({e})") from None


def embedded_config(name: str) -> Path | None:
    emb = EMBEDDED[name]
    if emb.gguf_file:  # its config exists once the GGUF file has been converted (models._gguf_as_folder)
        path = cache_dir() / "models" / name / "config.json"
    else:
        spec = importlib.util.find_spec(emb.module)
        path = Path(spec.origin).parent / emb.subdir / "config.json" if spec and spec.origin else None
    return path if path is not None and path.exists() else None


def hub_config(name: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    known = f"embedded models: {', '.join(EMBEDDED)}"
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(f"model {name!r}: not an embedded model ({known}), not a folder, and not a Hugging "
                          "Face Hub id") from None
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return cached
    if offline():
        raise ConfigError(f"model {name!r}: not an embedded model ({known}), not a folder, and not in the local "
                          "Hugging Face cache (HF_HUB_OFFLINE is set, so the Hub is not asked)")
    return None


def offline() -> bool:
    from huggingface_hub import constants
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(v.upper() in ("1", "ON", "YES", "TRUE") for v in flags)
