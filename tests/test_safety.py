"""A failure changes nothing, and a way back (issue 8 part 3): each probe asserts the error and the unchanged model."""
import json
import os

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import depthmix
from conftest import LORA_TARGETS, batch, method_cases, method_config, method_names, tiny
from depthmix import io
from depthmix.depthmix_model import CONFIG_NAME, WEIGHTS_NAME
from depthmix.tuners import base as tuners_base


def lora(family, **kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[family], **kw)


def logits(model, family):
    ids, mask = batch(family)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def snapshot(model, family):
    """Everything apply() could touch: outputs, module classes and attributes, hooks, weights, requires_grad."""
    return {
        "logits": logits(model, family),
        "classes": {n: type(m) for n, m in model.named_modules()},
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(model, family, before, plain=True):
    """plain: the model was a plain base model (no hooks, no LoRA layers) and must still be one."""
    after = snapshot(model, family)
    assert torch.equal(after["logits"], before["logits"])  # bit-exact
    if plain:
        assert not model._forward_hooks and not model._forward_pre_hooks
        assert not [n for n in after["classes"] if "lora_" in n]
    for key in ("classes", "attrs", "hooks", "grad"):
        assert after[key] == before[key], key
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(after["weights"][k], v) for k, v in before["weights"].items())


def perturb(dm):
    """Give every trainable tensor (LoRA, routers, a trained head) random values, so leftovers would show."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in dm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)


def edit_config(path, change):
    file = path / CONFIG_NAME
    meta = json.loads(file.read_text())
    change(meta)
    file.write_text(json.dumps(meta))


# -- from_pretrained: refused or undone, then the right adapter still loads ------------------------------------
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_config_tensor_mismatch_in_from_pretrained_changes_nothing(family, tmp_path):
    dm = depthmix.apply(tiny(family), depthmix.MoLExConfig(layers=[1, 2]), lora=lora(family))
    perturb(dm)
    want = logits(dm, family)
    dm.save_pretrained(tmp_path)
    edit_config(tmp_path, lambda m: m["config"].update(layers=[0, 1, 2]))  # one gate more than the tensors hold

    base = tiny(family)
    before = snapshot(base, family)
    with pytest.raises(depthmix.AdapterError, match=f"{WEIGHTS_NAME}: tensors do not match the adapter config "
                                                     r"\(missing \['method.gates.2.bias'"):
        depthmix.DepthMixModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, family, before)

    edit_config(tmp_path, lambda m: m["config"].update(layers=[1, 2]))
    again = depthmix.DepthMixModel.from_pretrained(base, tmp_path)
    assert torch.equal(logits(again, family), want)


def test_lora_rank_mismatch_in_from_pretrained_changes_nothing(tmp_path):
    dm = depthmix.apply(tiny("gpt2"), depthmix.MoLExConfig(), lora=lora("gpt2"))
    dm.save_pretrained(tmp_path)
    edit_config(tmp_path, lambda m: m["lora"].update(r=8))
    base = tiny("gpt2")
    before = snapshot(base, "gpt2")
    with pytest.raises(depthmix.AdapterError, match=r"lora_A\.default\.weight has shape \(4, 32\), the model expects "
                                                     r"\(8, 32\)"):
        depthmix.DepthMixModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, "gpt2", before)


@pytest.mark.parametrize("key,config", [
    ("model_type", MistralConfig),
    ("num_kv_heads", dict(num_key_value_heads=4)),
    ("intermediate_size", dict(intermediate_size=128)),
])
def test_fingerprint_mismatch_is_refused(key, config, tmp_path):
    depthmix.apply(tiny("llama"), depthmix.MoLExConfig()).save_pretrained(tmp_path)
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    if config is MistralConfig:
        other = MistralForCausalLM(MistralConfig(**sizes)).eval()
    else:
        other = LlamaForCausalLM(LlamaConfig(**{**sizes, **config})).eval()
    before = snapshot(other, "llama")
    with pytest.raises(depthmix.AdapterError, match=f"saved for another base model .*{key}: adapter "):
        depthmix.DepthMixModel.from_pretrained(other, tmp_path)
    assert_unchanged(other, "llama", before)


def test_fingerprint_records_the_new_fields():
    fp = depthmix.apply(tiny("llama"), depthmix.MoLExConfig()).fingerprint
    assert (fp["model_type"], fp["num_heads"], fp["num_kv_heads"], fp["intermediate_size"]) == ("llama", 4, 2, 64)


def test_missing_sha256_is_refused(tmp_path):
    depthmix.apply(tiny("llama"), depthmix.MoLExConfig()).save_pretrained(tmp_path)
    edit_config(tmp_path, lambda m: m.pop("weights_sha256"))
    base = tiny("llama")
    before = snapshot(base, "llama")
    with pytest.raises(depthmix.AdapterError, match=f"{CONFIG_NAME}: missing field 'weights_sha256'"):
        depthmix.DepthMixModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, "llama", before)


def test_save_from_a_state_dict_without_the_adapter_names_writes_nothing(tmp_path):
    """A gathered state dict whose keys carry a wrapper's prefix (DDP's `module.`) names the problem; no file."""
    dm = depthmix.apply(tiny("llama"), depthmix.MoLExConfig(), lora=lora("llama"))
    prefixed = {f"module.{n}": p for n, p in dm.state_dict().items()}
    names = rf"lacks {len(dm.adapter_names)} adapter tensors, e.g. \['base_model\.model"
    with pytest.raises(depthmix.AdapterError, match=names):
        dm.save_pretrained(tmp_path / "adapter", state_dict=prefixed)
    assert not (tmp_path / "adapter").exists()
    dm.save_pretrained(tmp_path / "adapter", state_dict=dm.state_dict())  # the same keys unprefixed: saved whole
    assert io.read_json(tmp_path / "adapter" / CONFIG_NAME)["weights_sha256"]


# -- apply: checked first, undone when a later step fails --------------------------------------------------------
def test_bad_lora_target_is_refused(family):
    base = tiny(family)
    before = snapshot(base, family)
    bad = LoraConfig(r=4, target_modules=[*LORA_TARGETS[family], "nope_proj"])
    with pytest.raises(depthmix.ConfigError, match=rf"\['nope_proj'\] name no module of {type(base).__name__}"):
        depthmix.apply(base, depthmix.MoLExConfig(), lora=bad)
    assert_unchanged(base, family, before)


def test_bad_lora_rank_is_refused():
    base = tiny("llama")
    before = snapshot(base, "llama")
    with pytest.raises(depthmix.ConfigError, match=r"LoraConfig.r = 0: expected a positive integer"):
        depthmix.apply(base, lora=LoraConfig(r=0, target_modules=["q_proj"]))
    assert_unchanged(base, "llama", before)


@pytest.mark.parametrize("family", ["llama", "roberta"])
def test_layer_out_of_range_changes_nothing(family):
    base = tiny(family)
    before = snapshot(base, family)
    with pytest.raises(depthmix.ConfigError, match=r"layer indices \[7\] out of range for a model with 4 layers"):
        depthmix.apply(base, depthmix.MoLExConfig(layers=[0, 7]), lora=lora(family))  # LoRA goes in first
    assert_unchanged(base, family, before)


@pytest.mark.parametrize("family,config,error,message", [
    ("bert", depthmix.MoDConfig, depthmix.ConfigError, "MoD routes tokens of causal LMs; bert is an encoder"),
    ("bert", depthmix.MoDEConfig, depthmix.UnsupportedModelError, "MoDE needs a causal LM with a final norm and an LM "
                                                                  "head"),
    ("llama", lambda: depthmix.MoDEConfig(num_layers=6), depthmix.ConfigError,
     r"MoDEConfig.num_layers = 6: the model has only 4 blocks"),
])
def test_method_the_model_cannot_take_changes_nothing(family, config, error, message):
    base = tiny(family)
    before = snapshot(base, family)
    extra = {"modules_to_save": ["classifier"]} if family == "bert" else {}
    with pytest.raises(error, match=message):
        depthmix.apply(base, config(), lora=lora(family, **extra))
    assert_unchanged(base, family, before)


def test_failure_half_way_through_wiring_is_undone(monkeypatch):
    calls = []

    def failing_swap(module, mixin):
        calls.append(module)
        if len(calls) == 2:
            raise RuntimeError("wiring failed")
        swap(module, mixin)

    swap = tuners_base.swap_class
    monkeypatch.setattr(tuners_base, "swap_class", failing_swap)
    base = tiny("llama")
    before = snapshot(base, "llama")
    with pytest.raises(RuntimeError, match="wiring failed"):
        depthmix.apply(base, depthmix.MoDEConfig(num_layers=3), lora=lora("llama"))
    assert_unchanged(base, "llama", before)


@pytest.mark.parametrize("second", ["molex", "mod", None])
def test_apply_twice_is_refused(second):
    base = tiny("llama")
    dm = depthmix.apply(base, depthmix.MoLExConfig(layers=[0]), lora=lora("llama"))
    perturb(dm)
    before = snapshot(base, "llama")
    cfg = {"molex": depthmix.MoLExConfig(layers=[2]), "mod": depthmix.MoDConfig(layers=[3]), None: None}[second]
    with pytest.raises(ValueError, match=r"LlamaForCausalLM already carries a depthmix model \(molex \+ LoRA\); "
                                         r"call its unload\(\) first"):
        depthmix.apply(base, cfg, lora=lora("llama") if second is None else None)
    assert_unchanged(base, "llama", before, plain=False)


def test_lora_onto_foreign_peft_layers_is_refused():
    base = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), tiny("llama"))
    before = snapshot(base, "llama")
    with pytest.raises(ValueError, match=r"already carries PEFT adapter layers \(at 'model.layers.0.self_attn.q_proj'\)"):
        depthmix.apply(base, depthmix.MoLExConfig(), lora=lora("llama"))
    assert_unchanged(base, "llama", before, plain=False)


# -- unload, merge_and_unload, disable_adapter ------------------------------------------------------------------------
@pytest.mark.parametrize("method,with_lora", [(m, w) for m in method_names() for w in (True, False)
                                              if m != "lora" or w])
def test_unload_round_trip_is_bit_exact(method, with_lora):
    base = tiny("llama")
    before = snapshot(base, "llama")
    dm = depthmix.apply(base, method_config(method), lora=lora("llama") if with_lora else None)
    perturb(dm)
    assert not torch.equal(logits(dm, "llama"), before["logits"])  # the adapter does something
    back = dm.unload()
    assert back is base and type(back) is LlamaForCausalLM
    assert_unchanged(back, "llama", before)
    with pytest.raises(AttributeError, match="this DepthMixModel was unloaded"):
        dm.base_model
    again = depthmix.apply(back, method_config(method), lora=lora("llama") if with_lora else None)  # a fresh apply works
    assert logits(again, "llama").shape == before["logits"].shape


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_unload_restores_a_trained_head_and_modules_to_save(family):
    base = tiny(family)
    before = snapshot(base, family)
    extra = {"modules_to_save": ["lm_head"]} if family == "gpt2" else {}
    dm = depthmix.apply(base, depthmix.MoLExConfig(), lora=lora(family, **extra), train_head=True)
    perturb(dm)
    assert_unchanged(dm.unload(), family, before)


def test_unload_after_from_pretrained_is_bit_exact(tmp_path):
    dm = depthmix.apply(tiny("bert"), depthmix.MoLExConfig(), lora=lora("bert"))  # the classifier is trained too
    perturb(dm)
    dm.save_pretrained(tmp_path)
    base = tiny("bert")
    before = snapshot(base, "bert")
    loaded = depthmix.DepthMixModel.from_pretrained(base, tmp_path)
    assert torch.equal(logits(loaded, "bert"), logits(dm, "bert"))
    assert_unchanged(loaded.unload(), "bert", before)


def test_merge_and_unload_keeps_the_lora_effect():
    base = tiny("llama")
    dm = depthmix.apply(base, lora=lora("llama"))
    perturb(dm)
    want = logits(dm, "llama")
    merged = dm.merge_and_unload()
    assert merged is base and not merged._forward_hooks and not merged._forward_pre_hooks
    assert not [n for n, _ in merged.named_modules() if "lora_" in n]
    torch.testing.assert_close(logits(merged, "llama"), want, rtol=1e-5, atol=1e-5)
    dm = depthmix.apply(base, depthmix.MoLExConfig(), lora=lora("llama"))
    with pytest.raises(ValueError, match=r"merge_and_unload\(\): the molex method cannot be merged"):
        dm.merge_and_unload()


@pytest.mark.parametrize("method,family", method_cases(("llama", "bert"), lora=False))
def test_disable_adapter_runs_the_base_model_alone(family, method):
    base = tiny(family)
    before = snapshot(base, family)
    dm = depthmix.apply(base, method_config(method), lora=lora(family))
    perturb(dm)
    adapted = logits(dm, family)
    grads = {n: p.requires_grad for n, p in dm.named_parameters()}
    with dm.disable_adapter():
        assert torch.equal(logits(dm, family), before["logits"])
    assert torch.equal(logits(dm, family), adapted)
    with pytest.raises(KeyError, match="inside"):
        with dm.disable_adapter():
            raise KeyError("inside")
    assert torch.equal(logits(dm, family), adapted)
    assert {n: p.requires_grad for n, p in dm.named_parameters()} == grads


def test_disable_adapter_generates_as_the_base_model():
    base = tiny("llama")
    ids, mask = batch("llama")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = base.generate(**kw)
    dm = depthmix.apply(base, depthmix.MoLExConfig(granularity="token"), lora=lora("llama"))
    perturb(dm)
    with dm.disable_adapter(), torch.no_grad():
        assert torch.equal(dm.generate(**kw), want)


# -- files -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_get_the_mode_the_umask_gives(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        depthmix.apply(tiny("llama"), depthmix.MoLExConfig()).save_pretrained(tmp_path)
        io.write_json(tmp_path / "metrics.json", {"loss": 1.0})
    finally:
        os.umask(old)
    for name in (CONFIG_NAME, WEIGHTS_NAME, "metrics.json"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(mode), name
