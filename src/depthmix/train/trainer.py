"""Training on the HF Trainer: so `accelerate launch` and `torchrun` (DDP, FSDP, DeepSpeed) work unchanged."""
from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import Trainer, TrainingArguments, set_seed
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .. import io
from ..config import ConfigError
from ..data.tasks import get_task
from ..depthmix_model import CONFIG_NAME, DepthMixModel, apply, read_adapter_config
from ..evaluation import evaluate
from ..lora import config as lora_config
from ..models import load_model, load_tokenizer
from ..tuners import METHODS
from .options import TrainOptions
from .preflight import method_config, model_config, preflight
from .runs import RunLock, begin, run_record


def _default_router_lr(method: str) -> float | None:
    """Each method's config says how fast its routers, gates or norms learn by default (None for LoRA alone)."""
    return METHODS[method][0].router_lr if method in METHODS else None


def sharded(trainer: Trainer) -> bool:
    """Whether a rank holds only shards of the weights (FSDP, DeepSpeed ZeRO-3)."""
    if trainer.is_fsdp_enabled:
        return True
    if not trainer.is_deepspeed_enabled:
        return False
    return trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage") == 3


def check_sharded_save(trainer: Trainer) -> None:
    """Where a rank holds shards, the adapter is saved from the weights gathered at save time, which FSDP and
    DeepSpeed do only when asked to. Without that the Trainer would save no or an empty adapter after the whole
    training: refuse before it starts."""
    if not sharded(trainer):
        return
    if trainer.is_fsdp_enabled:
        kind = str(trainer.accelerator.state.fsdp_plugin.state_dict_type)
        if "FULL_STATE_DICT" not in kind:
            raise ConfigError(f"FSDP: state_dict_type is {kind}; depthmix saves the adapter from the full state dict "
                              "gathered at save time, so set it to FULL_STATE_DICT (accelerate config: "
                              "fsdp_state_dict_type: FULL_STATE_DICT)")
        return
    zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise ConfigError("DeepSpeed ZeRO-3: zero_optimization.stage3_gather_16bit_weights_on_model_save is "
                          f"{zero.get('stage3_gather_16bit_weights_on_model_save')!r}; depthmix saves the adapter "
                          "from the weights gathered at save time, so set it to true (accelerate config: "
                          "zero3_save_16bit_model: true)")


class DepthMixTrainer(Trainer):
    """Trainer that gives routers their own learning rate and checkpoints only the adapter."""

    def __init__(self, *args, router_lr: float | None = None, router_weight_decay: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        check_sharded_save(self)
        self.adapter_info: dict = {}  # recorded beside the adapter's config by save_model
        self.router_lr = router_lr
        self.router_weight_decay = router_weight_decay

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss, the method's own (Method.training_loss), or the Trainer's (label smoothing, a
        compute_loss_func); in each, every auxiliary loss the method declares."""
        method = self.accelerator.unwrap_model(model).method
        progress = self.state.global_step / max(self.state.max_steps, 1)
        own = method.training_loss(model, inputs, progress) if method is not None else None
        self.loss_is_scaled_for_ga = None if own is None else False  # a method's own loss is a mean per batch
        if own is not None:
            loss, outputs = own
        elif "labels" in inputs and (self.label_smoother is not None or self.compute_loss_func is not None):
            loss, outputs = self.trainer_scored(model, inputs, num_items_in_batch)
        else:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def trainer_scored(self, model, inputs, num_items_in_batch):
        """The Trainer scores the logits itself and calls the model without labels. The method still reads them
        (where a prompt ends, which positions are scored), its auxiliary losses join the loss, and a causal LM's
        labels are shifted (the Trainer knows a causal LM by its class name, which the wrapper hides)."""
        wrapper = self.accelerator.unwrap_model(model)
        method, smoother = wrapper.method, self.label_smoother
        if smoother is not None and wrapper.base_model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            self.label_smoother = lambda out, labels, shift_labels=False, **kw: smoother(out, labels, True, **kw)
        try:
            with method.seeing(labels=inputs["labels"]) if method is not None else contextlib.nullcontext():
                loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        finally:
            self.label_smoother = smoother
        return (loss if method is None else loss + method.aux_loss(loss)), outputs

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls(self.optimizer_groups(), **kwargs)
        return self.optimizer

    def optimizer_groups(self) -> list[dict]:
        """Adapter weights with weight_decay (biases and norms without, as the HF Trainer does); gates, routers and
        alpha with their own learning rate and weight decay."""
        groups = self.model.param_groups()
        decay = set(self.get_decay_parameter_names(self.model))
        names = {id(p): n for n, p in self.model.named_parameters()}
        adapter = [{"params": [p for p in groups["adapter"] if names[id(p)] in decay],
                    "weight_decay": self.args.weight_decay},
                   {"params": [p for p in groups["adapter"] if names[id(p)] not in decay], "weight_decay": 0.0}]
        router = [{"params": groups["router"], "weight_decay": self.router_weight_decay,
                   "lr": self.router_lr or self.args.learning_rate}]
        return [g for g in adapter + router if g["params"]]

    def _save(self, output_dir=None, state_dict=None):
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        self.model.save_pretrained(output_dir, state_dict=state_dict, info=self.adapter_info)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        (model or self.model).load_adapter_weights(resume_from_checkpoint)


def build_model(opts: TrainOptions, head: str, num_labels: int | None, tokenizer=None):
    """Base model + tokenizer (loaded unless given), with the method of `opts` applied (on top of LoRA unless
    opts.lora is False)."""
    model = load_model(opts.model, head=head, num_labels=num_labels)
    tokenizer = tokenizer or load_tokenizer(opts.model)
    lora = None
    if opts.lora:
        lora = lora_config(model, opts.lora_targets, r=opts.lora_r, lora_alpha=opts.lora_alpha,
                           lora_dropout=opts.lora_dropout, use_dora=opts.use_dora)
    return apply(model, method_config(opts), lora, train_pooler=opts.train_pooler), tokenizer


def training_arguments(opts: TrainOptions) -> TrainingArguments:
    return TrainingArguments(
        output_dir=opts.output_dir, per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        num_train_epochs=opts.epochs, max_steps=opts.max_steps, learning_rate=opts.lr, weight_decay=opts.weight_decay,
        warmup_steps=opts.warmup, lr_scheduler_type="linear", logging_steps=opts.logging_steps,
        save_steps=opts.save_steps, save_total_limit=opts.save_total_limit, seed=opts.seed, data_seed=opts.seed,
        report_to="none", disable_tqdm=not opts.progress, label_names=["labels"], bf16=opts.bf16,
        activation_checkpointing=opts.gradient_checkpointing, dataloader_num_workers=0,
        dataloader_pin_memory=torch.accelerator.is_available(),
        ddp_find_unused_parameters=False, use_cpu=not torch.accelerator.is_available())


def train(opts: TrainOptions) -> dict:
    task, method_config = preflight(opts)  # every mistake that can be found before loading anything
    args = training_arguments(opts)  # before the lock: it sets up the processes (accelerate's PartialState)
    lock = RunLock(opts.output_dir)
    resume = on_main_process(lambda: begin(lock, opts, run_record(opts, method_config)))
    try:
        return _train(opts, task, args, resume)
    finally:
        lock.release()


def on_main_process(fn):
    """fn() on the main process only; its result, or its ConfigError, on every process (no rank goes on alone)."""
    state = PartialState()
    box, error = [None, None], None
    if state.is_main_process:
        try:
            box[0] = fn()
        except Exception as e:  # any failure: the other ranks must not wait for a result that never comes
            error = e
            box[1] = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
    if state.num_processes > 1:
        broadcast_object_list(box)
    if error is not None:
        raise error
    if box[1] is not None:
        raise ConfigError(box[1])
    return box[0]


def _train(opts: TrainOptions, task, args: TrainingArguments, resume: str | None) -> dict:
    out = Path(opts.output_dir)
    set_seed(opts.seed)
    train_rows = task.load("train", opts.data_dir, opts.max_train_samples, opts.seed)
    eval_rows = task.load("eval", opts.data_dir, opts.max_eval_samples, 0)
    tokenizer = load_tokenizer(opts.model)
    train_ds = task.encode(train_rows, tokenizer, opts.max_length)
    if len(train_ds) == 0:  # before the model loads: the Trainer would fail later on "num_samples=0"
        raise ConfigError(f"--max-length {opts.max_length}: none of the {len(train_rows)} training examples of "
                          f"{opts.task} leaves a token to learn at this length (an instruction's prompt alone fills "
                          "it); raise --max-length")
    model, tokenizer = build_model(opts, task.head, task.num_labels, tokenizer)

    trainer = DepthMixTrainer(model=model, args=args, train_dataset=train_ds, data_collator=task.collator(tokenizer),
                              processing_class=tokenizer, router_lr=opts.router_lr or _default_router_lr(opts.method),
                              router_weight_decay=opts.router_weight_decay)
    trainable, total = model.trainable_parameters()  # before training shards them
    start = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_time = time.time() - start
    # e.g. MoD's gate thresholds, set on training text; where the weights are sharded they stay as trained (a
    # forward that rewrites parameters is not one every rank can join)
    calibration = model.method.after_training(model, train_ds) if model.method is not None and \
        not sharded(trainer) else None
    trainer.adapter_info = {"base_model": opts.model, "task": opts.task, "method": opts.method}
    trainer.save_model(str(out))  # on every rank: FSDP and ZeRO-3 gather the weights here
    # Release the engine on every rank while the process group is up: ZeRO-3 keeps handles of asynchronous gathers,
    # and one left to the interpreter's exit can abort a finished run ("terminate called without an active
    # exception", exit -6, seen on the rank that returns first).
    trainer.accelerator.free_memory()
    gc.collect()
    if not trainer.is_world_process_zero():
        return {}
    if sharded(trainer):  # this rank holds shards: evaluate a whole copy, as saved
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()  # training is over: from_pretrained must not partition the copy (a collective)
        model, tokenizer, _ = load_trained(str(out), opts.model, task.head, task.num_labels)
    if model.method is not None:  # e.g. MoD's realized capacity: of the evaluation alone
        model.method.reset_stats()
    extra = {k: v for k, v in (("max_new_tokens", opts.eval_max_new_tokens), ("mode", opts.eval_mode)) if v}
    metrics = evaluate(task, model, tokenizer, eval_rows, batch_size=opts.eval_batch_size,
                       max_length=opts.max_length, progress=opts.progress, **extra)
    summary = {
        "task": opts.task, "method": opts.method, "model": opts.model, "seed": opts.seed, "lora": opts.lora,
        "metrics": metrics, "examples": len(eval_rows), "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "train_seconds": round(train_time, 1), "trainable_params": trainable, "total_params": total,
        "method_state": model.method.summary() if model.method is not None else {},
        **({"calibration": calibration} if calibration is not None else {}),
        "routing": model.method.eval_routing() if model.method is not None else None,  # of the evaluation
        "options": vars(opts),
    }
    io.write_json(out / "metrics.json", summary)
    io.write_json(out / "log_history.json", {"log_history": trainer.state.log_history})
    from ..plots import loss_curve
    loss_curve(trainer.state.log_history, out / "loss.png", title=f"{opts.method} on {opts.task}")
    return summary


def load_trained(adapter: str, model: str | None = None, head: str | None = None, num_labels: int | None = None):
    """An adapter folder written by `train` -> (DepthMixModel, tokenizer, info)."""
    meta = read_adapter_config(adapter)  # every field checked before the base model loads
    info = meta.get("info", {})
    name = model or info.get("base_model")
    if name is None:
        raise ConfigError(f"{adapter}: the adapter does not name its base model; pass --model")
    try:
        model_config(name)  # a base model that is gone fails in one line, before anything loads
    except ConfigError as e:
        if model:
            raise
        raise ConfigError(f"{adapter}: the base model recorded in {CONFIG_NAME} cannot be found ({e}); pass --model "
                          "with its folder or name") from None
    if head is None:
        task = get_task(info["task"]) if info.get("task") else None
        head, num_labels = (task.head, task.num_labels) if task else ("causal_lm", None)
    # the adapter restores the new classifier head right after: transformers' 'newly initialized' report is noise
    base = load_model(name, head=head, num_labels=num_labels, load_report=False)
    tokenizer = load_tokenizer(name)
    return DepthMixModel.from_pretrained(base, adapter), tokenizer, info

