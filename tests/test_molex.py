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


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_sequence_alone_equals_in_batch(family, granularity):
    dm = molex(family, granularity=granularity)
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
@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_cached_generate_equals_full_recompute(family, granularity):
    dm = molex(family, granularity=granularity)
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
    with pytest.raises(depthmix.ConfigError, match="granularity"):
        depthmix.MoLExConfig(granularity="corpus")
    with pytest.raises(depthmix.ConfigError, match="alpha"):
        depthmix.MoLExConfig(alpha=1.0)
    with pytest.raises(depthmix.ConfigError, match="out of range"):
        depthmix.apply(tiny("llama"), depthmix.MoLExConfig(layers=[0, 7]))


def labels_for(family, ids, mask):
    return ids.masked_fill(mask == 0, -100) if family in CAUSAL else torch.tensor([0, 1, 1])


def gate_grads(dm):
    return [g.weight.grad for g in dm.method.gates]


def test_balance_gate_learns_from_the_balance_loss_alone(family):
    ids, mask = batch(family)
    ours = molex(family, balance_weight=0.01)
    theirs = molex(family, balance_weight=0.01, gate_grad="balance")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    with torch.no_grad():  # the same forward: only the gate's gradient path differs
        assert torch.equal(ours(**inputs(family, ids, mask)).logits, theirs(**inputs(family, ids, mask)).logits)
    for dm in (ours, theirs):  # the task loss alone: straight-through reaches the gates, balance-only does not
        dm.train()(**inputs(family, ids, mask)).logits.float().pow(2).mean().backward()
    assert all(g is not None and g.abs().sum() > 0 for g in gate_grads(ours))
    assert all(g is None for g in gate_grads(theirs))
    theirs(**inputs(family, ids, mask), labels=labels_for(family, ids, mask)).loss.backward()  # + the balance loss
    assert all(g is not None and g.abs().sum() > 0 for g in gate_grads(theirs))
    theirs.zero_grad(set_to_none=True)
    theirs.method.config.balance_weight = 0.0  # what the config refuses: then nothing would train the gate
    theirs(**inputs(family, ids, mask), labels=labels_for(family, ids, mask)).loss.backward()
    assert all(g is None for g in gate_grads(theirs))


def test_balance_gate_without_balance_loss_is_refused():
    with pytest.raises(depthmix.ConfigError, match="gate_grad = 'balance'.*balance_weight > 0"):
        depthmix.MoLExConfig(gate_grad="balance")
    with pytest.raises(depthmix.ConfigError, match="gate_grad"):
        depthmix.MoLExConfig(gate_grad="task")
    with pytest.raises(depthmix.ConfigError, match="balance_weight = 0.01.*frozen"):
        depthmix.MoLExConfig(gate_grad="frozen", balance_weight=0.01)


def test_frozen_gate_is_not_trained_and_is_saved(family, tmp_path):
    dm = molex(family, gate_grad="frozen").train()
    assert not any(p.requires_grad for p in dm.method.gates.parameters())
    assert [id(p) for p in dm.param_groups()["router"]] == [id(dm.method.alpha_logit)]
    assert {f"method.gates.{i}.weight" for i in range(4)} <= set(dm.adapter_names)  # saved: the control is exact
    gates = [p.detach().clone() for p in dm.method.gates.parameters()]
    lora = [p.detach().clone() for n, p in dm.named_parameters() if "lora_B" in n]
    opt = torch.optim.AdamW([p for p in dm.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    ids, mask = batch(family)
    for _ in range(2):
        dm(**inputs(family, ids, mask), labels=labels_for(family, ids, mask)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(gates, dm.method.gates.parameters()))
    assert not all(torch.equal(a, p) for a, (n, p) in zip(lora, ((n, p) for n, p in dm.named_parameters()
                                                                  if "lora_B" in n)))
    dm.eval()
    with torch.no_grad():
        before = dm(**inputs(family, ids, mask)).logits
    dm.save_pretrained(tmp_path)
    again = depthmix.DepthMixModel.from_pretrained(tiny(family), tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(gates, again.method.gates.parameters()))
    with torch.no_grad():
        assert torch.equal(before, again(**inputs(family, ids, mask)).logits)


def trainer_for(dm, tmp_path, **kw):
    from transformers import TrainingArguments

    from depthmix.train.trainer import DepthMixTrainer
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, learning_rate=5e-4, report_to="none",
                             use_cpu=True)
    return DepthMixTrainer(model=dm, args=args, **kw)


def optimizer_settings(dm, trainer) -> dict:
    """parameter name -> (lr, weight_decay) of its optimizer group."""
    names = {id(p): n for n, p in dm.named_parameters()}
    groups = trainer.create_optimizer().param_groups
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_router_weight_decay_reaches_the_optimizer(tmp_path):
    dm = molex("bert", gate_grad="straight_through")
    got = optimizer_settings(dm, trainer_for(dm, tmp_path, router_lr=0.1, router_weight_decay=0.1))
    method = [n for n in got if n.startswith("method.")]
    assert set(method) == {n for n, p in dm.method.named_parameters(prefix="method") if p.requires_grad}
    assert all(got[n] == (0.1, 0.1) for n in method)
    dm = molex("bert")
    got = optimizer_settings(dm, trainer_for(dm, tmp_path, router_lr=0.1))  # the default: none
    assert all(got[n] == (0.1, 0.0) for n in got if n.startswith("method."))


def test_adapter_biases_and_norms_get_no_weight_decay(tmp_path):
    model = tiny("bert")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    dm = depthmix.apply(model, depthmix.MoLExConfig(), lora, train_pooler=True)
    dm.base_model.bert.encoder.layer[0].output.LayerNorm.requires_grad_(True)
    got = optimizer_settings(dm, trainer_for(dm, tmp_path))
    norm = "base_model.bert.encoder.layer.0.output.LayerNorm"
    no_decay = {n for n in got if n.startswith("base_model.") and got[n][1] == 0.0}
    assert no_decay == {n for n in got if n.startswith("base_model.") and (n.endswith(".bias") or n.startswith(norm))}
    assert {f"{norm}.weight", "base_model.classifier.bias", "base_model.bert.pooler.dense.bias"} <= no_decay
    assert got["base_model.classifier.weight"] == (5e-4, 0.1)
    assert got["base_model.bert.pooler.dense.weight"] == (5e-4, 0.1)
    assert any("lora_A" in n and got[n] == (5e-4, 0.1) for n in got)


def test_train_pooler_trains_saves_and_reloads_the_pooler(tmp_path):
    pooler = {"base_model.bert.pooler.dense.weight", "base_model.bert.pooler.dense.bias"}
    assert not pooler & set(depthmix.apply(tiny("bert"), depthmix.MoLExConfig()).adapter_names)  # the default
    model = tiny("bert")
    original = {n: p.detach().clone() for n, p in model.bert.pooler.named_parameters()}
    dm = depthmix.apply(model, depthmix.MoLExConfig(), train_pooler=True)
    assert pooler <= set(dm.adapter_names)
    assert all(p.requires_grad for p in model.bert.pooler.parameters())
    ids, mask = batch("bert")
    dm.train()(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert model.bert.pooler.dense.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.bert.pooler.dense.weight.add_(0.5)  # a trained pooler
        before = dm.eval()(input_ids=ids, attention_mask=mask).logits
        with dm.disable_adapter():  # the base model alone: its own pooler
            assert torch.equal(model.bert.pooler.dense.weight, original["dense.weight"])
    dm.save_pretrained(tmp_path)
    again = depthmix.DepthMixModel.from_pretrained(tiny("bert"), tmp_path)  # its pooler: the untrained one
    assert again.train_pooler
    assert torch.equal(again.base_model.bert.pooler.dense.weight, model.bert.pooler.dense.weight)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, before)
    plain = dm.unload()
    assert all(torch.equal(p, original[n]) for n, p in plain.bert.pooler.named_parameters())
    with pytest.raises(ValueError, match="train_pooler.*no pooler"):
        depthmix.apply(tiny("roberta"), depthmix.MoLExConfig(), train_pooler=True)


def test_train_pooler_is_refused_for_a_causal_lm_task():
    from depthmix.train.options import TrainOptions
    from depthmix.train.preflight import preflight
    with pytest.raises(depthmix.ConfigError, match="train_pooler = True.*not a sequence classification"):
        preflight(TrainOptions(model="smollm2-135m", task="singleeq", train_pooler=True, method="lora"))
