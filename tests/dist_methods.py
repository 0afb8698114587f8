"""Run by tests/test_distributed.py under torchrun (gloo, CPU): every method trains a tiny Llama + LoRA for a few
SGD steps, wrapped in FSDP2, FSDP1, DDP or DeepSpeed ZeRO-3 (see wrap). Each rank trains on its own data and
writes its trainable weights, the tokens it generated and, for MoLEx, the experts it picked at each step and layer;
under FSDP rank 0 also saves the adapter from the full state dict, as `depthmix train` does through the Trainer.

    dist_methods.py OUT fsdp|fsdp1|ddp|zero3 METHOD...

build, batches, loss_of and generate (how="none") are what the test's single-process reference run uses too."""
import contextlib
import json
import os
import sys
from datetime import timedelta

import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from conftest import method_config
from depthmix import apply

STEPS = 3
LR = 0.5
CHECKPOINTED = "+checkpointing"  # a method name ending so: with gradient checkpointing (blocks re-run in backward)


def build(method: str):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(cfg)
    if method.endswith(CHECKPOINTED):
        method = method.removesuffix(CHECKPOINTED)
        base.activation_checkpointing_enable({"use_reentrant": False})
    model = apply(base, method_config(method), lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    if method.startswith("molex"):
        for gate in model.method.gates:  # sharper gates: the ranks' different tokens pick different experts
            gate.weight.data.mul_(20)
    return model.train()


def batches(rank: int) -> list[torch.Tensor]:
    """STEPS batches of 2 sequences of 6 tokens; each rank draws its own."""
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(3, 64, (2, 6), generator=g) for _ in range(STEPS)]


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def picked(method, before: torch.Tensor) -> list[list[int]]:
    """Per mixed layer, the experts this rank's routing chose since `before` (a copy of method.counts)."""
    return [torch.nonzero(row).flatten().tolist() for row in method.counts - before]


def wrap(model, how: str):
    """DDP; FSDP2 (`fully_shard` on every block, then the root); FSDP1 (a wrapper around every block); or DeepSpeed
    ZeRO-3 (every parameter partitioned, gathered by hooks as its module runs): (wrapped model, optimizer)."""
    if how == "zero3":
        import deepspeed
        params = [p for p in model.parameters() if p.requires_grad]
        config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9,
                  "zero_allow_untested_optimizer": True,  # plain SGD, as the one-process reference
                  # threshold 0: this tiny model's weights would all stay whole (unpartitioned) under the default
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                                 optimizer=torch.optim.SGD(params, lr=LR))
        assert all(p.numel() == 0 for p in model.arch.blocks.parameters())  # partitioned: a rank holds a shard
        return engine, opt
    wrapped = shard(model, how)  # FSDP replaces the parameters: the optimizer takes the new ones
    return wrapped, torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)


def shard(model, how: str):
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)
    if how == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                        use_orig_params=True, device_id=torch.device("cpu"))
    from torch.distributed.fsdp import fully_shard
    for block in model.arch.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def root_gathered(wrapped, how: str):
    """The root module's own weights gathered, for generate(), which bypasses the root's forward (where FSDP
    would gather them); the blocks still gather theirs at each call."""
    if how == "fsdp":
        wrapped.unshard()
        try:
            yield
        finally:
            wrapped.reshard()
    elif how == "fsdp1":
        with type(wrapped).summon_full_params(wrapped, recurse=False):
            yield
    else:
        yield


def full_weights(model, wrapped, how: str, names: list[str]) -> dict[str, list]:
    if how == "fsdp1":
        gathered = type(wrapped).summon_full_params(wrapped)
    elif how == "zero3":
        import deepspeed
        gathered = deepspeed.zero.GatheredParameters([p for n, p in model.named_parameters() if n in names])
    else:
        gathered = contextlib.nullcontext()
    with gathered:
        params = {n.replace("_fsdp_wrapped_module.", ""): p for n, p in model.named_parameters()}
        return {n: (params[n].full_tensor() if hasattr(params[n], "full_tensor") else params[n]).tolist()
                for n in names}


def trainer_state_dict(wrapped, how: str) -> dict:
    """The state dict the HF Trainer hands to _save under FSDP (FULL_STATE_DICT), gathered on every rank as
    `accelerate`'s Accelerator.get_state_dict gathers it (on rank 0 only, for FSDP1)."""
    if how == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        # accelerate also offloads to the CPU, which on a CPU-only torch 2.13 segfaults (and moves nothing here)
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with type(wrapped).state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
            return wrapped.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    return get_model_state_dict(wrapped, options=options)


def run(method: str, how: str, rank: int, out: str) -> None:
    model = build(method)
    mol = model.method if method.startswith("molex") else None
    names = list(model.adapter_names)
    wrapped, opt = wrap(model, how)
    choices = []
    if mol is not None:
        mol.recording = True
    for ids in batches(rank):
        before = None if mol is None else mol.counts.clone()
        loss = loss_of(wrapped, ids)
        if how == "zero3":  # the engine reduces the gradients and steps its optimizer
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
        if mol is not None:
            choices.append(picked(mol, before))
    wrapped.eval()
    with torch.no_grad():  # evaluation and generation must not hang either (MoD routes causally there)
        loss_of(wrapped, batches(rank)[0])
        with root_gathered(wrapped, how):
            tokens = generate(model, how, batches(rank)[1][:, :3])
        if how == "ddp":  # replicated blocks: one rank may run the model alone (sampling on rank 0, say)
            if rank == 0:
                loss_of(model, batches(rank)[0])
            torch.distributed.barrier()
    if how in ("fsdp", "fsdp1"):  # saved as `depthmix train` does under FSDP: from the Trainer's full state dict
        state = trainer_state_dict(wrapped, how)
        if rank == 0:
            wrapped.save_pretrained(os.path.join(out, f"{how}-{method}-adapter"), state_dict=state)
    result = {"weights": full_weights(model, wrapped, how, names), "choices": choices, "generated": tokens.tolist()}
    with open(os.path.join(out, f"{how}-{method}-rank{rank}.json"), "w") as f:
        json.dump(result, f)


def generate(model, how: str, prompt: torch.Tensor) -> torch.Tensor:
    """Greedy tokens; synced_gpus: a rank that is done keeps stepping while another is not (FSDP gathers)."""
    return model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0, synced_gpus=how != "none")


def main() -> None:
    out, how, methods = sys.argv[1], sys.argv[2], sys.argv[3:]
    # a collective that waits this long means the ranks diverged: fail rather than hang
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = torch.distributed.get_rank()
    for method in methods:
        run(method, how, rank, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
