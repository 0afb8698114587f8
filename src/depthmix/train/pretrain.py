"""Training a small causal LM from random initialisation on a text file, with a training-FLOP budget: dense, or with
a registered method applied (MoD is the one made for it).

The budget is spent in whole optimizer steps: the FLOPs of one real training step (forward + backward, counted by
FlopCounterMode on the model as built, routers and predictors included) set how many steps fit.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from .. import flops as flop_count
from .. import io
from ..config import ConfigError, checked_type
from ..depthmix_model import apply
from ..evaluation import heldout_nll
from ..tuners import METHODS

ARCHS = ("llama", "gpt2")


@dataclass
class PretrainOptions:
    """Options of `depthmix pretrain` (each is also a --flag)."""

    arch: str = field(default="llama", metadata={"help": "llama or gpt2."})
    layers: int = field(default=4, metadata={"help": "transformer blocks."})
    hidden: int = field(default=128, metadata={"help": "hidden size."})
    heads: int | None = field(default=None, metadata={"help": "attention heads (default: hidden // 32)."})
    method: str = field(default="dense", metadata={"help":
        "dense, or a registered method applied to the new model (e.g. mod)."})
    corpus: str = field(default="", metadata={"help": "text file to train on."})
    eval_corpus: str | None = field(default=None, metadata={"help":
        "text file for the held-out loss (default: the last 10% of the corpus)."})
    tokenizer: str = field(default="bytes", metadata={"help":
        "bytes, or a model name whose tokenizer to use (e.g. smollm2-135m)."})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence."})
    batch_size: int = field(default=8, metadata={"help": "sequences per step."})
    flops: float = field(default=1e13, metadata={"help": "training FLOP budget, spent in whole steps."})
    max_steps: int | None = field(default=None, metadata={"help":
        "a fixed number of steps instead of the FLOP budget."})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW, cosine decay)."})
    warmup: float = field(default=0.05, metadata={"help": "fraction of the steps with a linear warmup, in [0, 1)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    eval_blocks: int = field(default=64, metadata={"help": "held-out blocks of seq_len tokens scored at the end."})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and the data order."})
    output_dir: str = field(default="out/pretrain", metadata={"help": "folder for the model, metrics and loss curve."})
    logging_steps: int = field(default=10, metadata={"help": "steps between logged losses."})
    progress: bool = field(default=True, metadata={"help": "progress bars."})
    method_config: dict = field(default_factory=dict, metadata={"help":
        "fields of the method's config (the method options below)."})

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, checked_type(f.name, getattr(self, f.name), f.type, ""))
        if self.arch not in ARCHS:
            raise ConfigError(f"arch = {self.arch!r}: expected one of {ARCHS}")
        if self.method not in ("dense", *METHODS):
            raise ConfigError(f"method = {self.method!r}: expected one of {('dense', *METHODS)}")
        if not self.corpus or not Path(self.corpus).is_file():
            raise ConfigError(f"corpus = {self.corpus!r}: not a file")
        if self.eval_corpus and not Path(self.eval_corpus).is_file():
            raise ConfigError(f"eval_corpus = {self.eval_corpus!r}: not a file")
        for name in ("layers", "hidden", "seq_len", "batch_size", "eval_blocks", "logging_steps", "heads",
                     "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: expected an integer >= 1")
        if self.seed < 0:
            raise ConfigError(f"seed = {self.seed!r}: expected an integer >= 0")
        if self.lr <= 0:
            raise ConfigError(f"lr = {self.lr!r}: expected a number > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay = {self.weight_decay!r}: expected a number >= 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup = {self.warmup!r}: expected a fraction in [0, 1)")
        if self.hidden % self.num_heads:
            raise ConfigError(f"hidden = {self.hidden} is not divisible by heads = {self.num_heads}")
        if self.flops <= 0:
            raise ConfigError(f"flops = {self.flops!r}: expected a number > 0")

    @property
    def num_heads(self) -> int:
        return self.heads or max(1, self.hidden // 32)


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    def __init__(self, name: str):
        from ..models import load_tokenizer
        self.tok = load_tokenizer(name)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


def tokenizer_for(name: str):
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


def token_blocks(ids: list[int], size: int) -> torch.Tensor:
    n = len(ids) // size
    if n == 0:
        raise ConfigError(f"the text holds {len(ids)} tokens, fewer than one block of {size}")
    return torch.tensor(ids[:n * size], dtype=torch.long).view(n, size)


def read_corpus(opts: PretrainOptions, tok) -> tuple[torch.Tensor, torch.Tensor]:
    text = Path(opts.corpus).read_text(encoding="utf-8")
    if opts.eval_corpus:
        train_text, eval_text = text, Path(opts.eval_corpus).read_text(encoding="utf-8")
    else:
        cut = int(0.9 * len(text))
        train_text, eval_text = text[:cut], text[cut:]
    return token_blocks(tok.encode(train_text), opts.seq_len), token_blocks(tok.encode(eval_text), opts.seq_len)


def build(opts: PretrainOptions, vocab: int):
    """A randomly initialised causal LM (seeded), with opts.method applied unless it is "dense"; every weight trains."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(opts.seed)
    if opts.arch == "llama":
        inner = 64 * math.ceil(8 * opts.hidden / 3 / 64)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=opts.hidden, intermediate_size=inner,
                          num_hidden_layers=opts.layers, num_attention_heads=opts.num_heads,
                          num_key_value_heads=opts.num_heads, max_position_embeddings=opts.seq_len,
                          tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        base = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=opts.hidden, n_layer=opts.layers, n_head=opts.num_heads,
                         n_positions=opts.seq_len, bos_token_id=None, eos_token_id=None)
        base = GPT2LMHeadModel(cfg)
    base.config.use_cache = False
    if opts.method == "dense" and opts.method_config:
        raise ConfigError(f"method options {sorted(opts.method_config)} given with method 'dense'")
    config = None if opts.method == "dense" else METHODS[opts.method][0].from_dict(opts.method_config,
                                                                                  source="method options")
    model = apply(base, config)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def heldout_forward_flops(model, blocks: torch.Tensor) -> dict:
    """FLOPs of one forward pass per sequence, averaged over held-out blocks: dense, or in each of the routing
    modes the method compares (Method.compared_routings)."""
    routings = model.method.compared_routings if model.method is not None and model.method.compared_routings \
        else (None,)
    return {r or "dense": flop_count.forward_flops(model, 0, 0, r, ids=blocks) // len(blocks) for r in routings}


def train_step_flops(model, batch: torch.Tensor) -> int:
    model.train()
    def step():
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    n = flop_count.count(step)
    model.zero_grad(set_to_none=True)
    return n


def pretrain(opts: PretrainOptions) -> dict:
    from transformers import TrainingArguments

    from ..plots import loss_curve
    from .trainer import DepthMixTrainer
    opts.validate()
    out = Path(opts.output_dir)
    tok = tokenizer_for(opts.tokenizer)
    train_blocks, eval_blocks = read_corpus(opts, tok)
    eval_blocks = eval_blocks[:opts.eval_blocks]
    model = build(opts, tok.vocab_size)
    step_flops = train_step_flops(model, train_blocks[:opts.batch_size])
    steps = opts.max_steps or max(1, int(opts.flops // step_flops))
    print(f"{opts.method} {opts.arch} L{opts.layers} d{opts.hidden}: {sum(p.numel() for p in model.parameters()):,d} "
          f"params, {step_flops:.3e} FLOPs per training step -> {steps} steps", flush=True)

    ds = datasets.Dataset.from_dict({"input_ids": train_blocks.tolist()})
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=opts.batch_size, max_steps=steps, learning_rate=opts.lr,
        weight_decay=opts.weight_decay, warmup_steps=opts.warmup, lr_scheduler_type="cosine",
        logging_steps=opts.logging_steps, save_strategy="no", seed=opts.seed, data_seed=opts.seed, report_to="none",
        disable_tqdm=not opts.progress, dataloader_num_workers=0,
        dataloader_pin_memory=torch.accelerator.is_available(), use_cpu=not torch.accelerator.is_available(),
        adam_beta2=0.95, max_grad_norm=1.0)
    trainer = DepthMixTrainer(model=model, args=args, train_dataset=ds, data_collator=_collate, router_lr=opts.lr)
    start = time.time()
    result = trainer.train()
    seconds = time.time() - start

    # FLOPs of one inference forward pass of the trained model on a held-out block (causal routing decides per
    # token, so the count depends on real text; it is what generation runs)
    fwd = heldout_forward_flops(model, eval_blocks[:8])
    routings = model.method.compared_routings if model.method is not None else ()
    evals = {r: heldout_nll(model, eval_blocks, opts.batch_size, r) for r in routings} or {
        "dense" if model.method is None else "default": heldout_nll(model, eval_blocks, opts.batch_size)}
    summary = {
        "options": dataclasses.asdict(opts), "params": sum(p.numel() for p in model.parameters()),
        "train_steps": result.global_step, "train_tokens": result.global_step * opts.batch_size * opts.seq_len,
        "train_step_flops": step_flops, "train_flops": step_flops * result.global_step,
        "forward_flops": fwd, "train_loss": result.training_loss, "train_seconds": round(seconds, 1),
        "heldout": evals, "heldout_tokens": int(eval_blocks[:, 1:].numel()),
    }
    model.base_model.save_pretrained(out / "model")
    if model.method is not None:
        model.save_pretrained(out / opts.method, info={"pretrain": opts.corpus})
    io.write_json(out / "metrics.json", summary)
    io.write_json(out / "log_history.json", {"log_history": trainer.state.log_history})
    loss_curve(trainer.state.log_history, out / "loss.png",
               title=f"{opts.method} {opts.arch} L{opts.layers} d{opts.hidden} on {Path(opts.corpus).name}")
    return summary


def _collate(rows):
    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    return {"input_ids": ids, "labels": ids}
