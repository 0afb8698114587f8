"""Router tuning with the dense model as teacher, block influence and layer dropping (issue 10), on tiny Llamas."""
import json
import math

import pytest
import torch

import depthmix
from conftest import VOCAB, tiny, tiny_lm_folder
from depthmix import flops
from depthmix.cli.main import main
from depthmix.tuners.mod.importance import block_influence, drop_blocks, influence, least_important
from depthmix.tuners.mod.retrofit import fit_predictors, retrofit_loss, tune


def retrofit(capacity, layers=(1, 2, 3), aux_weight=0.01, seed=0):
    model = depthmix.apply(tiny("llama"), depthmix.MoDConfig(capacity=capacity, layers=list(layers),
                                                             update="retrofit", aux_weight=aux_weight))
    torch.manual_seed(seed)
    for r in model.method.routers:  # non-zero routers: the selection is not a tie
        torch.nn.init.normal_(r.weight, std=1.0)
    return model.train()


def ids(b=2, s=16, seed=3):
    return torch.randint(3, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def test_distill_loss_is_zero_at_capacity_one_and_positive_below():
    x = ids()
    full, _ = retrofit_loss(retrofit(1.0, aux_weight=0.0), {"input_ids": x})
    assert float(full.detach()) == 0.0
    half, out = retrofit_loss(retrofit(0.5, aux_weight=0.0), {"input_ids": x, "attention_mask": torch.ones_like(x)})
    assert float(half.detach()) > 1e-4 and out.loss is half


def test_distill_gradient_reaches_only_the_routers():
    model = retrofit(0.5, aux_weight=0.0)
    for p in model.method.parameters():
        p.requires_grad_(True)
    loss, _ = retrofit_loss(model, {"input_ids": ids()})
    loss.backward()
    routers = {id(p) for p in model.method.routers.parameters()}
    for name, p in model.named_parameters():
        if id(p) in routers:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name
    # with the predictor's BCE (aux_weight > 0) the predictors learn too, from that term alone
    model = retrofit(0.5)
    for p in model.method.parameters():
        p.requires_grad_(True)
    retrofit_loss(model, {"input_ids": ids()})[0].backward()
    assert all(p.grad is not None for p in model.method.predictors.parameters())


def test_tune_and_fit_predictors_move_only_the_method():
    model = retrofit(0.5)
    base = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    routers = [r.weight.detach().clone() for r in model.method.routers]
    losses = tune(model, ids(8, 16), steps=3, batch=2, progress=False)
    fit_predictors(model, ids(8, 16), batches=2, batch=2, epochs=2, progress=False)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(torch.equal(p, base[n]) for n, p in model.base_model.named_parameters())
    assert any(not torch.equal(r.weight, w) for r, w in zip(model.method.routers, routers))
    assert not model.training and not any(p.requires_grad for p in model.method.parameters())


def test_block_influence_is_one_finite_score_per_block():
    model = tiny("llama", layers=5)
    scores = block_influence(model, ids(4, 12), batch=3)
    assert len(scores) == 5 and all(math.isfinite(s) and 0 <= s <= 2 for s in scores)
    parts = influence(model, ids(4, 12))
    assert len(parts["attention"]) == len(parts["mlp"]) == 5 and parts["block"] == pytest.approx(scores, rel=1e-4)
    assert least_important(scores, 2) == sorted(sorted(range(1, 5), key=lambda i: scores[i])[:2])
    assert 0 not in least_important(scores, 4)


def test_layer_drop_removes_exactly_the_chosen_blocks_and_their_flops():
    model = tiny("llama", layers=6)
    blocks = list(model.model.layers)
    dense = flops.forward_flops(model, 1, 16)
    one = flops.forward_flops(drop_blocks(tiny("llama", layers=6), [4]), 1, 16)
    dropped = drop_blocks(model, [1, 4])
    assert list(dropped.model.layers) == [blocks[i] for i in (0, 2, 3, 5)]
    assert [b.self_attn.layer_idx for b in dropped.model.layers] == [0, 1, 2, 3]
    assert dropped.config.num_hidden_layers == 4
    assert dense - flops.forward_flops(dropped, 1, 16) == 2 * (dense - one) > 0
    x = ids(1, 6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(dropped.generate(x, **kw), dropped.generate(x, use_cache=False, **kw))


def test_last_third_is_a_layers_choice():
    model = depthmix.apply(tiny("llama", layers=6), depthmix.MoDConfig(layers="last_third", update="retrofit"))
    assert model.method.layers == [4, 5]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_lm_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.slow
def test_train_retrofit_distill_from_the_command_line(model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "mod", "--update", "retrofit", "--retrofit-loss", "distill", "--no-lora",
                 "--capacity", "0.5", "--layers", "[1, 3]", "--model", str(model_dir), "--task", "lm/pydoc",
                 "--max-train-samples", "8", "--max-eval-samples", "2", "--max-length", "32", "--batch-size", "2",
                 "--max-steps", "2", "--output-dir", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert metrics["options"]["method_config"]["retrofit_loss"] == "distill" and metrics["routing"] == "causal"
    trainable, _ = metrics["trainable_params"], metrics["total_params"]
    assert trainable == sum(p.numel() for p in retrofit(0.5, layers=(1, 3)).method.parameters())


def test_retrofit_loss_is_refused_without_mod_retrofit(model_dir, tmp_path, capsys):
    args = ["train", "--method", "mod", "--retrofit-loss", "distill", "--model", str(model_dir), "--task", "lm/pydoc",
            "--output-dir", str(tmp_path / "x")]
    assert main(args) == 2
    assert "retrofit_loss is for router tuning" in capsys.readouterr().err
    assert main(args[:4] + ["kl", "--update", "retrofit"] + args[5:]) == 2
    assert "retrofit_loss = 'kl'" in capsys.readouterr().err
