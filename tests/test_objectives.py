"""Every objective a method declares reaches the weights, whatever Trainer and checkpointing settings train it:
the gradients equal those of the plain path (a forward with labels returning a ModelOutput, no checkpointing).
MoD's predictors learn from its auxiliary BCE alone, MoLEx's balance gate from its load-balancing loss alone, and
MoDE's norms are distilled: a setting that drops an auxiliary loss leaves those weights with no gradient."""
import pytest
import torch
from conftest import VOCAB, tiny
from transformers import TrainingArguments

import depthmix
from depthmix.train import DepthMixTrainer

CONFIGS = {  # each with an objective beside the LM loss, and weights only it trains
    "mod": lambda: depthmix.MoDConfig(capacity=0.5, aux_weight=0.1),
    "molex": lambda: depthmix.MoLExConfig(balance_weight=0.1, gate_grad="balance"),
    "mode": lambda: depthmix.MoDEConfig(num_layers=3, distill_weight=1.0),
}


def model(method):
    dm = depthmix.apply(tiny("llama", seed=3), CONFIGS[method](), lora=None)
    dm.train()
    return dm


def inputs():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt: MoLEx decides on it, MoDE distils only where a label is set
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def grads(dm, loss) -> dict[str, torch.Tensor]:
    dm.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in dm.named_parameters() if p.requires_grad and p.grad is not None}


def plain(method):
    dm = model(method)
    return grads(dm, dm(**inputs()).loss)


def assert_same(got: dict, want: dict, rel=1e-5):
    method_params = [n for n in want if n.startswith("method.")]
    assert method_params and all(want[n].abs().sum() > 0 for n in method_params)  # the objective trains them
    assert sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=rel, atol=1e-7, msg=n)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_return_dict_false_keeps_the_auxiliary_losses(method):
    dm = model(method)
    out = dm(**inputs(), return_dict=False)
    assert_same(grads(dm, out[0]), plain(method))


def trainer(dm, tmp_path, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kw)
    return DepthMixTrainer(model=dm, args=args)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_label_smoothing_keeps_the_auxiliary_losses(method, tmp_path):
    """A smoothing factor of 1e-6 changes the LM loss by ~1e-6: every gradient stays that of the plain path (also
    the LM loss's: the Trainer shifts a causal LM's labels only where it recognises the model's class)."""
    dm = model(method)
    loss = trainer(dm, tmp_path, label_smoothing_factor=1e-6).compute_loss(dm, inputs())
    assert_same(grads(dm, loss), plain(method), rel=1e-3)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_trainer_without_smoothing_is_the_plain_path(method, tmp_path):
    dm = model(method)
    assert_same(grads(dm, trainer(dm, tmp_path).compute_loss(dm, inputs())), plain(method))


@pytest.mark.parametrize("method", list(CONFIGS))
def test_reentrant_gradient_checkpointing_keeps_the_auxiliary_losses(method):
    """use_reentrant=True (PEFT's k-bit preparation) runs the blocks under no_grad in the forward pass."""
    dm = model(method)
    dm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    dm.train()
    assert_same(grads(dm, dm(**inputs()).loss), plain(method))
