"""Run by tests/test_distributed.py under torchrun: a tiny MoLEx + LoRA training through the HF Trainer (DDP on
CPU with gloo); every rank writes its adapter tensors so the test can compare them."""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

from depthmix.data import get_task
from depthmix.train import DepthMixTrainer, TrainOptions, build_model

out = sys.argv[1]
torch.manual_seed(0)
opts = TrainOptions(method="molex", model="minilm-l6", task="pydoc/topics", method_config={"granularity": "token"})
task = get_task(opts.task)
model, tok = build_model(opts, task.head, task.num_labels)
data = task.encode(task.load("train", max_samples=64), tok, 32)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
                         report_to="none", save_strategy="no", disable_tqdm=True, label_names=["labels"],
                         ddp_backend="gloo", ddp_find_unused_parameters=False, seed=0, use_cpu=True,
                         ddp_timeout=120)  # a collective waiting this long means a hang: fail
trainer = DepthMixTrainer(model=model, args=args, train_dataset=data, data_collator=task.collator(tok),
                          router_lr=1e-2)
trainer.train()
rank = int(os.environ["RANK"])
save_file({k: v.detach().contiguous() for k, v in model.adapter_state_dict().items()},
          os.path.join(out, f"rank{rank}.safetensors"))
# one file per rank: the two processes share stdout, where their lines can interleave
Path(out, f"rank{rank}.txt").write_text(f"rank {rank} of {os.environ['WORLD_SIZE']} done, "
                                        f"steps={trainer.state.global_step} {type(trainer.model_wrapped).__name__}")
