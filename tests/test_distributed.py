import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def test_two_process_ddp_training_ends_with_identical_weights(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(Path(__file__).with_name("dist_train.py")), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # each rank trained its own half of the batches inside DistributedDataParallel
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"rank {rank} of 2 done, steps=6 DistributedDataParallel"
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys() and any("gates" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training moved them: LoRA B starts at zero
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
