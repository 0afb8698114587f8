"""Run by tests/test_distributed.py under torchrun: a tiny MoLEx + LoRA training through the HF Trainer, on CPU with
gloo, as DDP or as DeepSpeed ZeRO-3; every rank writes its adapter tensors (DDP) or rank 0 saves the adapter from
the gathered weights (ZeRO-3), so the test can check them.

    dist_train.py OUT [ddp|zero3|zero3-nogather]"""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

from depthmix.config import ConfigError
from depthmix.data import get_task
from depthmix.train import DepthMixTrainer, TrainOptions, build_model

out, how = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "ddp")
rank = int(os.environ["RANK"])
torch.manual_seed(0)
opts = TrainOptions(method="molex", model="minilm-l6", task="pydoc/topics", method_config={"granularity": "token"})
task = get_task(opts.task)
model, tok = build_model(opts, task.head, task.num_labels)
for m in model.modules():  # no dropout: DDP and ZeRO-3 draw their random numbers differently, and are compared
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0
data = task.encode(task.load("train", max_samples=64), tok, 32)
deepspeed = None
if how.startswith("zero3"):
    deepspeed = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,  # the Trainer's AdamW with depthmix's parameter groups
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "stage3_gather_16bit_weights_on_model_save": how == "zero3"}}
args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
                         report_to="none", save_strategy="no", disable_tqdm=True, label_names=["labels"],
                         ddp_backend="gloo", ddp_find_unused_parameters=False, seed=0, use_cpu=True,
                         ddp_timeout=120, deepspeed=deepspeed)  # a collective waiting this long means a hang: fail
try:
    trainer = DepthMixTrainer(model=model, args=args, train_dataset=data, data_collator=task.collator(tok),
                              router_lr=1e-2)
except ConfigError as e:
    Path(out, f"rank{rank}.txt").write_text(f"refused: {e}")
    torch.distributed.destroy_process_group()
    sys.exit(0)
trainer.train()
if how == "ddp":
    save_file({k: v.detach().contiguous() for k, v in model.adapter_state_dict().items()},
              os.path.join(out, f"rank{rank}.safetensors"))
else:
    trainer.save_model(os.path.join(out, "adapter"))  # every rank takes part in gathering the weights
# one file per rank: the two processes share stdout, where their lines can interleave
Path(out, f"rank{rank}.txt").write_text(f"rank {rank} of {os.environ['WORLD_SIZE']} done, "
                                        f"steps={trainer.state.global_step} {type(trainer.model_wrapped).__name__}")
torch.distributed.destroy_process_group()  # left to the interpreter's exit, gloo's threads can abort the process
