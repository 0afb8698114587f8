import os

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification)

import depthmix

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

VOCAB = 64


def tiny(family: str, layers: int = 4, seed: int = 0, vocab: int = VOCAB):
    """A tiny randomly initialised model of a family, in eval mode, built from a config (no download)."""
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, num_labels=3)
        model = BertForSequenceClassification(cfg)
    elif family == "roberta":
        cfg = RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=130, num_labels=2, pad_token_id=1)
        model = RobertaForSequenceClassification(cfg)
    else:
        raise ValueError(family)
    return model.eval()


CAUSAL = ("llama", "gpt2")
FAMILIES = ("llama", "gpt2", "bert", "roberta")

# The method x model contract matrix: every test that should hold for every method iterates it, so a new method is
# tested everywhere by adding one line here. name -> (its config on a 4-layer tiny model, the families it takes);
# "lora" is LoRA alone (no method). VARIANTS are further settings of a method that change its code path, for the
# tests that follow the numbers through every path (compile, distributed).
METHODS = {
    "lora": (lambda: None, FAMILIES),
    "molex": (lambda: depthmix.MoLExConfig(), FAMILIES),
    "mod": (lambda: depthmix.MoDConfig(capacity=0.5), CAUSAL),
    "mode": (lambda: depthmix.MoDEConfig(), CAUSAL),
}
VARIANTS = {
    "molex-token": (lambda: depthmix.MoLExConfig(granularity="token"), FAMILIES),
    "mod-attention": (lambda: depthmix.MoDConfig(capacity=0.5, skip="attention"), CAUSAL),
}


def method_config(name: str):
    """A fresh config of a matrix entry (None for "lora")."""
    return {**METHODS, **VARIANTS}[name][0]()


def method_names(lora: bool = True, variants: bool = False) -> list[str]:
    names = [*METHODS, *(VARIANTS if variants else ())]
    return names if lora else [n for n in names if n != "lora"]


def method_cases(families=FAMILIES, lora: bool = True) -> list[tuple[str, str]]:
    """(method, family) for every method and every family of `families` it takes."""
    return [(name, family) for name in method_names(lora) for family in families if family in METHODS[name][1]]
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
                "roberta": ["query", "value"]}


def batch(family: str, b: int = 3, s: int = 9, seed: int = 1):
    """Random token ids with ragged lengths: left padding for causal LMs, right padding for encoders."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for i in range(1, b):
        n = min(i * 2, s - 2)
        if family in CAUSAL:
            mask[i, :n] = 0
        else:
            mask[i, s - n:] = 0
    pad = 1 if family == "roberta" else 0
    ids = ids.masked_fill(mask == 0, pad)
    return ids, mask


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def shared_data():
    """../shared/data (or $DEPTHMIX_DATA); tests that need it skip with this reason when it is absent."""
    from pathlib import Path
    root = Path(os.environ.get("DEPTHMIX_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (root / "glue").is_dir():
        pytest.skip(f"the shared data folder is absent ({root}); set DEPTHMIX_DATA")
    return root


SMALL = ("--model", "minilm-l6", "--task", "pydoc/topics", "--max-train-samples", 8, "--max-eval-samples", 8,
         "--max-length", 32, "--batch-size", 4, "--no-progress")  # a training run of seconds on the embedded MiniLM


def run_cli(capsys, *argv):
    """(exit code, stderr) of `depthmix ...` run in this process."""
    from depthmix.cli.main import main
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def snapshot(folder) -> dict:
    """Every file under `folder` and its bytes (None for a folder): to check that a refusal changed nothing."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def tiny_lm_folder(folder):
    """A tiny Llama over SmolLM2's tokenizer, saved with it as a local model folder (for the CLI and scripts)."""
    from depthmix.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m")
    model = tiny("llama")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
