import pytest
import torch
from peft import LoraConfig

import depthmix
from conftest import CAUSAL, LORA_TARGETS, batch, tiny


def molex(family, seed=0, lora=True, **kw):
    model = tiny(family, seed=seed)
    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[family]) if lora else None
    dm = depthmix.apply(model, depthmix.MoLExConfig(**kw), lora=lora_cfg)
    with torch.no_grad():  # spread the gates so that sequences in a batch pick different experts
        for g in dm.method.gates:
            g.weight.normal_(0, 3.0)
        if lora:  # and make LoRA non-zero, so a lost LoRA weight would show
            for n, p in dm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return dm.eval()


def inputs(family, ids, mask):
    kw = {"input_ids": ids, "attention_mask": mask}
    if family in CAUSAL:  # left padding: positions count real tokens only, as generate() does
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return kw


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_sequence_alone_equals_in_batch(family, routing):
    dm = molex(family, routing=routing)
    ids, mask = batch(family, b=4, s=10)
    dm.method.recording = True
    with torch.no_grad():
        full = dm(**inputs(family, ids, mask)).logits
    assert (dm.method.counts > 0).sum(1).max() >= 2, "the batch should route to several experts"
    for i in range(len(ids)):
        keep = mask[i].bool()
        one_ids, one_mask = ids[i, keep][None], mask[i, keep][None]
        with torch.no_grad():
            alone = dm(**inputs(family, one_ids, one_mask)).logits
        in_batch = full[i][keep] if full.dim() == 3 else full[i]
        torch.testing.assert_close(in_batch, alone[0], rtol=1e-4, atol=1e-5)


def test_gates_and_alpha_get_gradients_and_are_the_only_new_trainables(family):
    dm = molex(family).train()
    dm.method.recording = True
    ids, mask = batch(family)
    labels = ids.masked_fill(mask == 0, -100) if family in CAUSAL else torch.tensor([0, 1, 1])
    dm(**inputs(family, ids, mask), labels=labels).loss.backward()
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    head = {n for n in trainable if n.startswith(f"base_model.{dm.arch.head_path}.")}
    assert bool(head) == (family not in CAUSAL)  # classifiers train their new head, LMs do not
    rest = trainable - head
    assert all("lora_" in n or n.startswith("method.") for n in rest)
    assert {n for n in rest if n.startswith("method.")} == {f"method.gates.{i}.weight" for i in range(4)} | \
        {f"method.gates.{i}.bias" for i in range(4)} | {"method.alpha_logit"}
    for g in dm.method.gates:
        assert g.weight.grad is not None and g.weight.grad.abs().sum() > 0
    # alpha mixes u_t with u_j: where every sequence picked j = t the two are equal and alpha has no gradient
    other = torch.tensor([dm.method.counts[i].sum() > dm.method.counts[i, t] for i, t in enumerate(dm.method.layers)])
    assert other.any()
    assert (dm.method.alpha_logit.grad[other].abs() > 0).all()


def test_save_load_round_trip_is_exact(family, tmp_path):
    dm = molex(family)
    ids, mask = batch(family)
    with torch.no_grad():
        before = dm(**inputs(family, ids, mask)).logits
    dm.save_pretrained(tmp_path)
    again = depthmix.DepthMixModel.from_pretrained(tiny(family), tmp_path)
    with torch.no_grad():
        after = again(**inputs(family, ids, mask)).logits
    assert torch.equal(before, after)


def test_alpha_one_reproduces_base_model(family):
    base = tiny(family)
    ids, mask = batch(family)
    with torch.no_grad():
        want = base(**inputs(family, ids, mask)).logits
    dm = molex(family, lora=False, alpha=1.0, learn_alpha=False)
    with torch.no_grad():
        got = dm(**inputs(family, ids, mask)).logits
    assert torch.equal(want, got)


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_cached_generate_equals_full_recompute(family, routing):
    dm = molex(family, routing=routing)
    ids, mask = batch(family, b=3, s=7)
    with torch.no_grad():
        out = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    assert out.shape == (3, 13)
    full_mask = torch.cat([mask, torch.ones(3, 6, dtype=torch.long)], 1)
    labels = out.clone()
    labels[:, :7] = -100  # the prompt decides the routing, as it did when generating
    with torch.no_grad():
        logits = dm(**inputs(family, out, full_mask), labels=labels).logits
    assert torch.equal(logits[:, 6:-1].argmax(-1), out[:, 7:])


def test_adapter_refuses_another_base_model(tmp_path):
    molex("llama").save_pretrained(tmp_path)
    other = tiny("llama", layers=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(depthmix.AdapterError, match="num_layers"):
        depthmix.DepthMixModel.from_pretrained(other, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    with pytest.raises(depthmix.AdapterError, match="family"):
        depthmix.DepthMixModel.from_pretrained(tiny("gpt2"), tmp_path)


def test_unsupported_model_is_named():
    from transformers import T5Config, T5ForConditionalGeneration
    model = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(depthmix.UnsupportedModelError, match="T5ForConditionalGeneration.*llama"):
        depthmix.apply(model, depthmix.MoLExConfig())


def test_bad_config_values_are_named():
    with pytest.raises(depthmix.ConfigError, match="routing"):
        depthmix.MoLExConfig(routing="batch")
    with pytest.raises(depthmix.ConfigError, match="alpha"):
        depthmix.MoLExConfig(alpha=1.0)
    with pytest.raises(depthmix.ConfigError, match="out of range"):
        depthmix.apply(tiny("llama"), depthmix.MoLExConfig(layers=[0, 7]))
