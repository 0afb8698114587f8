"""torch.compile of each method: the compiled model trains and gives the eager model's loss and gradients."""
import pytest
import torch
from peft import LoraConfig

import depthmix
from conftest import LORA_TARGETS, batch, method_config, method_names, tiny

pytestmark = pytest.mark.slow


def build(name):
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS["llama"])
    dm = depthmix.apply(tiny("llama"), method_config(name), lora=lora).train()
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B and zero-initialised routers would hide a wrong gradient
        for n, p in dm.named_parameters():
            if p.requires_grad and ("lora_B" in n or n.startswith("method.")):
                p.add_(torch.randn_like(p) * 0.1)
    if name == "mode":
        dm.method.compact_on_cpu = False  # the accelerator's static-shape path, the one worth compiling
    return dm


def step_inputs():
    ids, mask = batch("llama", b=3, s=12)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("name", method_names(variants=True))
def test_compiled_training_matches_eager(name):
    torch._dynamo.reset()
    eager, compiled = build(name), build(name)
    data = step_inputs()
    params = [p for p in eager.parameters() if p.requires_grad]
    loss = eager(**data).loss
    want = torch.autograd.grad(loss, params)
    run = torch.compile(compiled, backend="aot_eager")
    cparams = [p for p in compiled.parameters() if p.requires_grad]
    closs = run(**data).loss
    got = torch.autograd.grad(closs, cparams)
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and it trains: a few SGD steps lower the loss on this batch
    opt = torch.optim.SGD(cparams, lr=0.05)
    first = None
    for _ in range(4):
        opt.zero_grad()
        value = run(**data).loss
        value.backward()
        opt.step()
        first = value.item() if first is None else first
    assert run(**data).loss.item() < first
