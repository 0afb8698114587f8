"""MoDE's premise, measured: the logit lens of the ensembled layers."""
import torch
import torch.nn.functional as F

import depthmix
from conftest import batch, tiny
from depthmix.tuners.mode.lens import layer_lens


def labelled(b=3, s=9):
    ids, mask = batch("llama", b=b, s=s)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_final_layer_of_the_lens_is_the_base_models_loss():
    base = tiny("llama")
    data = labelled()
    with torch.no_grad():
        logits = base(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    target = data["labels"][:, 1:]
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    dm = depthmix.apply(base, depthmix.MoDEConfig(num_layers=3))
    lens = layer_lens(dm, [data])
    assert lens["layers"] == [1, 2, 3] and lens["tokens"] == int((target != -100).sum())
    assert abs(lens["nll"][-1] - want.item()) < 1e-5
    assert lens["right_where_final_wrong"][-1] == 0
    assert max(lens["accuracy"]) <= lens["oracle_accuracy"] <= 1


def test_shallower_layers_go_through_modes_own_norms():
    dm = depthmix.apply(tiny("llama"), depthmix.MoDEConfig(num_layers=3))
    data = labelled()
    before = layer_lens(dm, [data])
    with torch.no_grad():
        dm.method.norms[0].weight.mul_(3.0)
    after = layer_lens(dm, [data])
    assert after["nll"][0] != before["nll"][0]
    assert after["nll"][1:] == before["nll"][1:]
    # the lens leaves the model as it found it: its own forward still mixes, in its training mode
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    with torch.no_grad():
        mixed = dm(**inputs).logits
        dm.train()
        layer_lens(dm, [data])
        assert dm.training
        assert torch.equal(dm.eval()(**inputs).logits, mixed)
