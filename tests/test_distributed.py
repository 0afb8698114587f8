"""Two-process training on CPU (gloo) under torchrun: DDP through the HF Trainer, and every method under FSDP2
(`fully_shard`), FSDP1, DDP and DeepSpeed ZeRO-3 with a plain loop, against the same training in one process.
Every launch has a time limit, so a hang (ranks making different collectives) fails fast."""
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_methods
from conftest import method_names

pytestmark = pytest.mark.distributed

HERE = Path(__file__).parent
METHODS = [*method_names(lora=False, variants=True), "molex" + dist_methods.CHECKPOINTED]
LIMIT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, out: Path, *args) -> None:
    """Run `script out *args` on 2 processes, stopping them after LIMIT seconds (a hang fails the test)."""
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), str(HERE / script), str(out), *args], out)


def accelerate_launch(config: Path, out: Path, *args) -> None:
    """`accelerate launch --config_file config -m *args` (its config sets 2 processes), with the same limit."""
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
            str(free_port()), "-m", *args], out)


def launch(cmd: list[str], out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    # a file, not a pipe: a worker that outlives the launcher would hold a pipe open
    with open(out / "torchrun.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=LIMIT)
        except subprocess.TimeoutExpired:
            stop(proc)
            pytest.fail(f"{cmd} did not finish in {LIMIT} s (a hang?):\n{tail(out)}")
    assert proc.returncode == 0, tail(out)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM: torchrun stops its workers (they run in sessions of their own), then exits."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(out: Path) -> str:
    return (out / "torchrun.log").read_text()[-5000:]


@pytest.fixture(scope="module")
def trainer_ddp(tmp_path_factory):
    """The HF Trainer's DDP run of dist_train.py: its folder."""
    out = tmp_path_factory.mktemp("trainer-ddp")
    torchrun("dist_train.py", out, "ddp")
    return out


def test_two_process_ddp_training_ends_with_identical_weights(trainer_ddp):
    for rank in (0, 1):  # each rank trained its own half of the batches inside DistributedDataParallel
        assert (trainer_ddp / f"rank{rank}.txt").read_text() == f"rank {rank} of 2 done, steps=6 DistributedDataParallel"
    a, b = load_file(trainer_ddp / "rank0.safetensors"), load_file(trainer_ddp / "rank1.safetensors")
    assert a.keys() == b.keys() and any("gates" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training moved them: LoRA B starts at zero
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_two_process_zero3_training_saves_the_whole_adapter(tmp_path, trainer_ddp):
    from depthmix.depthmix_model import read_adapter_config, read_weights
    from depthmix.train import TrainOptions, build_model
    torchrun("dist_train.py", tmp_path, "zero3")
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"rank {rank} of 2 done, steps=6 DeepSpeedEngine"
    saved = tmp_path / "adapter"
    tensors = read_weights(saved, read_adapter_config(saved))  # checks the recorded sha256 too
    from depthmix.data import get_task
    task = get_task("pydoc/topics")
    fresh, _ = build_model(TrainOptions(method="molex", model="minilm-l6", task=task.name,
                                        method_config={"granularity": "token"}), task.head, task.num_labels)
    expected = fresh.adapter_state_dict()
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in expected.items()}  # not shards
    assert any(tensors[k].abs().sum() > 0 for k in tensors if "lora_B" in k)  # trained: LoRA B starts at zero
    fresh.load_adapter_weights(saved)
    ddp = load_file(trainer_ddp / "rank0.safetensors")  # the same training as DDP: the same weights
    for k in ddp:  # (Adam's first steps magnify the different order of the gradient sums: 4e-5 measured)
        torch.testing.assert_close(tensors[k], ddp[k], atol=2e-4, rtol=1e-3, msg=k)


def test_zero3_that_would_save_an_empty_adapter_is_refused_before_training(tmp_path):
    torchrun("dist_train.py", tmp_path, "zero3-nogather")
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith("refused: DeepSpeed ZeRO-3") and "stage3_gather_16bit_weights_on_model_save" in text
    assert not (tmp_path / "adapter").exists()


@functools.cache
def reference(method: str):
    """The same training in one process: each step's loss is the mean of the two ranks' losses."""
    model = dist_methods.build(method)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=dist_methods.LR)
    for ids0, ids1 in zip(dist_methods.batches(0), dist_methods.batches(1)):
        ((dist_methods.loss_of(model, ids0) + dist_methods.loss_of(model, ids1)) / 2).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        tokens = [dist_methods.generate(model, "none", dist_methods.batches(r)[1][:, :3]).tolist() for r in (0, 1)]
    end = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return start, end, tokens


@pytest.mark.parametrize("how", ["fsdp", "fsdp1", "ddp", "zero3"])
def test_every_method_trains_on_two_processes(tmp_path, how):
    torchrun("dist_methods.py", tmp_path, how, *METHODS)
    for method in METHODS:
        ranks = [json.loads((tmp_path / f"{how}-{method}-rank{r}.json").read_text()) for r in (0, 1)]
        start, end, tokens = reference(method)
        a, b = ({n: torch.tensor(w) for n, w in rank["weights"].items()} for rank in ranks)
        assert a.keys() == b.keys() == end.keys(), method
        for n in a:
            assert torch.equal(a[n], b[n]), (method, n)  # the ranks agree
            assert not torch.equal(a[n], start[n]), (method, n)  # training moved every trainable tensor
            # and as one process on both ranks' data: right gradients, no expert's weights swapped for another's
            torch.testing.assert_close(a[n], end[n], atol=1e-5, rtol=1e-4, msg=f"{method} {n}")
        assert [rank["generated"] for rank in ranks] == tokens, method
        if how.startswith("fsdp"):  # the adapter saved from FSDP's full state dict loads as the trained weights
            loaded = dist_methods.build(method)
            loaded.load_adapter_weights(tmp_path / f"{how}-{method}-adapter")
            for n, p in loaded.named_parameters():
                if n in end:
                    torch.testing.assert_close(p.detach(), end[n], atol=1e-5, rtol=1e-4, msg=f"{method} {n}")
        if method.startswith("molex"):
            assert ranks_differed(*(rank["choices"] for rank in ranks)), method


def ranks_differed(a, b) -> bool:
    """Whether at some step and layer t one rank called an expert (t's own block aside) that the other did not:
    the case where the ranks would have gathered different blocks."""
    return any((set(x) ^ set(y)) - {t} for step_a, step_b in zip(a, b) for t, (x, y) in enumerate(zip(step_a, step_b)))


def test_depthmix_train_under_accelerate_zero3_saves_evaluates_and_resumes(tmp_path):
    """`accelerate launch` with the README's ZeRO-3 config: training shards the weights from loading on; the
    adapter is saved from the gathered weights and rank 0 evaluates a whole copy of it; a run stopped after its
    first checkpoint and resumed ends with the same adapter."""
    import shutil

    from depthmix.depthmix_model import read_adapter_config, read_weights
    config = HERE.parent / "examples" / "accelerate" / "zero3.yaml"
    out = tmp_path / "run"
    cmd = ["depthmix.cli.main", "train", "--model", "minilm-l6", "--task", "pydoc/topics", "--method", "molex",
           "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "3", "--max-train-samples", "32",
           "--max-eval-samples", "16", "--batch-size", "4", "--output-dir", str(out), "--no-progress"]
    accelerate_launch(config, tmp_path, *cmd)
    assert any((out / "checkpoint-2").glob("global_step2/zero_pp_rank_1_*optim_states.pt"))  # really ZeRO, 2 ranks
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and 0 <= metrics["metrics"]["accuracy"] <= 1
    assert metrics["total_params"] > 20_000_000 > metrics["trainable_params"] > 0  # whole sizes, not shards
    tensors = read_weights(out, read_adapter_config(out))
    assert min(t.numel() for t in tensors.values()) > 0
    assert read_adapter_config(out)["info"]["base_model"] == "minilm-l6"

    # as if stopped after step 2: only the first checkpoint (adapter + DeepSpeed's engine state) is left
    for name in ("checkpoint-4", "metrics.json", "adapter_model.safetensors", "depthmix_config.json"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        else:
            (out / name).unlink()
    accelerate_launch(config, tmp_path, *cmd, "--resume")
    resumed = read_weights(out, read_adapter_config(out))
    for k in tensors:
        torch.testing.assert_close(resumed[k], tensors[k], atol=1e-6, rtol=0, msg=k)


def test_fsdp_training_that_would_save_no_adapter_is_refused():
    """The HF Trainer saves nothing of ours under FSDP's sharded state dicts (it calls _save only for a full one);
    FSDP through the Trainer needs accelerators, so the check is tested on the trainer's state alone."""
    from types import SimpleNamespace

    from depthmix.config import ConfigError
    from depthmix.train.trainer import check_sharded_save
    trainer = SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False, accelerator=SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(state_dict_type="StateDictType.SHARDED_STATE_DICT"))))
    with pytest.raises(ConfigError, match="FSDP: state_dict_type is StateDictType.SHARDED_STATE_DICT"):
        check_sharded_save(trainer)
    trainer.accelerator.state.fsdp_plugin.state_dict_type = "StateDictType.FULL_STATE_DICT"
    check_sharded_save(trainer)
