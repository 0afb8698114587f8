"""A depthmix model under what users do to any model (issue 28): deepcopy, torch.save, dtype moves, meta-device
loading, PEFT layers already in the model, save after unload; and adapter files that are not what they claim."""
import copy
import io as pyio

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import LlamaForSequenceClassification

import depthmix
from conftest import LORA_TARGETS, batch, method_config, method_names, tiny
from depthmix import io
from depthmix.depthmix_model import CONFIG_NAME, WEIGHTS_NAME
from test_safety import assert_unchanged, edit_config, logits, perturb, snapshot


def build(method, with_lora=None):
    """A perturbed depthmix model on tiny Llama (LoRA alone for "lora"), after a training forward and backward."""
    with_lora = method == "lora" if with_lora is None else with_lora
    dm = depthmix.apply(tiny("llama"), method_config(method),
                        lora=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["llama"]) if with_lora else None)
    perturb(dm)
    ids, mask = batch("llama")
    dm.train()
    dm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()  # leaves a forward's state behind (MoD: aux)
    dm.zero_grad()
    return dm.eval()


def trainable(dm):
    return {n: p.detach().clone() for n, p in dm.named_parameters() if p.requires_grad}


# -- deepcopy and torch.save ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", method_names())
def test_deepcopy_is_independent(method):
    dm = build(method)
    want = logits(dm, "llama")
    twin = copy.deepcopy(dm)
    original = trainable(dm)
    # training the copy leaves the original as it was
    ids, mask = batch("llama")
    twin.train()
    twin(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    with torch.no_grad():
        for p in twin.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    assert any(not torch.equal(p, original[n]) for n, p in trainable(twin).items())
    assert all(torch.equal(p, original[n]) for n, p in trainable(dm).items())
    assert torch.equal(logits(dm, "llama"), want)
    # the copy runs without the original
    twin = copy.deepcopy(dm)
    dm.unload()
    assert torch.equal(logits(twin.eval(), "llama"), want)
    assert torch.equal(logits(twin.unload(), "llama"), logits(tiny("llama"), "llama"))  # its own way back too


@pytest.mark.parametrize("method", method_names())
def test_torch_save_of_a_whole_model_loads_back(method, tmp_path):
    dm = build(method)
    want = logits(dm, "llama")
    torch.save(dm, tmp_path / "model.pt")
    dm.unload()
    back = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(back) is depthmix.DepthMixModel
    assert torch.equal(logits(back, "llama"), want)
    back.save_pretrained(tmp_path / "adapter")  # and is a depthmix model in every way
    again = depthmix.DepthMixModel.from_pretrained(tiny("llama"), tmp_path / "adapter")
    assert torch.equal(logits(again, "llama"), want)
    plain = back.unload()
    assert type(plain).__name__ == "LlamaForCausalLM" and not plain._forward_hooks and not plain._forward_pre_hooks
    assert torch.equal(logits(plain, "llama"), logits(tiny("llama"), "llama"))


def test_swapped_blocks_pickle_as_their_swapped_class():
    dm = depthmix.apply(tiny("llama"), depthmix.MoLExConfig(layers=[1]))
    buf = pyio.BytesIO()
    torch.save(dm, buf)
    back = torch.load(pyio.BytesIO(buf.getvalue()), weights_only=False)
    block, orig = back.base_model.model.layers[1], dm.base_model.model.layers[1]
    assert type(block) is type(orig) and type(block).__name__ == "LlamaDecoderLayer"
    assert block._depthmix[0] is back.method
    assert type(back.base_model.model.layers[0]).__name__ == "LlamaDecoderLayer"


# -- dtype moves: the model's dtype changes, the routers stay float32 ------------------------------------------------
@pytest.mark.parametrize("move", ["bfloat16", "half"])
@pytest.mark.parametrize("method,with_lora", [(m, m == "lora") for m in method_names()] + [("molex", True)])
def test_dtype_move_of_the_whole_model(method, with_lora, move):
    dm = build(method, with_lora)
    dtype = torch.bfloat16 if move == "bfloat16" else torch.float16
    moved = dm.to(torch.bfloat16) if move == "bfloat16" else dm.half()
    assert moved is dm
    assert dm.base_model.lm_head.weight.dtype == dtype
    if dm.method is not None:
        assert {p.dtype for p in dm.method.parameters()} == {torch.float32}
    ids, mask = batch("llama")
    dm.train()
    out = dm(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    if dm.method is not None:
        grads = [p.grad for p in dm.method.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(g.dtype == torch.float32 for g in grads)
    dm.eval()
    with torch.no_grad():
        new = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert new.shape == (ids.shape[0], ids.shape[1] + 3)
    dm.float()  # and back: every tensor float32 again
    assert {p.dtype for p in dm.parameters()} == {torch.float32}


# -- meta device -------------------------------------------------------------------------------------------------
def meta_llama():
    with torch.device("meta"):
        return tiny("llama")


@pytest.mark.parametrize("method", ["molex", "lora"])
def test_from_pretrained_onto_a_meta_model_is_refused(method, tmp_path):
    build(method).save_pretrained(tmp_path)
    base = meta_llama()
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has weights on the meta device \(e\.g\. "
                                         r"'model\.embed_tokens\.weight'\).*Load the base model's weights first"):
        depthmix.DepthMixModel.from_pretrained(base, tmp_path)
    assert not base._forward_hooks and not base._forward_pre_hooks
    assert not [n for n, _ in base.named_modules() if "lora_" in n]
    with pytest.raises(ValueError, match="has weights on the meta device"):
        depthmix.apply(base, depthmix.MoDConfig())


def test_meta_model_of_a_distributed_rank_is_accepted(monkeypatch):
    """FSDP's cpu_ram_efficient_loading: ranks but the first hold meta weights, which FSDP fills from the first."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    dm = depthmix.apply(meta_llama(), depthmix.MoDConfig())
    assert {p.device.type for p in dm.method.parameters()} == {"meta"}


# -- a model that already carries PEFT LoRA ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", method_names(lora=False))
def test_apply_onto_peft_lora_layers_is_refused(method):
    base = inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), tiny("llama"))
    before = snapshot(base, "llama")
    with pytest.raises(ValueError, match=r"already carries PEFT adapter layers \(at 'model.layers.0.self_attn.q_proj'\)"
                                         r": depthmix would freeze them.*apply\(base_model, config, "
                                         r"lora=LoraConfig\(\.\.\.\)\)"):
        depthmix.apply(base, method_config(method))
    assert_unchanged(base, "llama", before, plain=False)


# -- MoD every_other on one layer ------------------------------------------------------------------------------------
def test_mod_every_other_on_one_layer_is_refused():
    base = tiny("llama", layers=1)
    before = snapshot(base, "llama")
    with pytest.raises(depthmix.ConfigError, match=r"MoDConfig.layers = 'every_other' picks no block of a model with "
                                                     r"1 layer\(s\); give the block indices as a list"):
        depthmix.apply(base, depthmix.MoDConfig(layers="every_other"))
    assert_unchanged(base, "llama", before)
    assert depthmix.apply(base, depthmix.MoDConfig(layers="all")).method.layers == [0]


# -- save after unload -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["molex", "lora"])
def test_save_after_unload_names_the_unload(method, tmp_path):
    dm = build(method)
    dm.unload()
    with pytest.raises(ValueError, match=r"this DepthMixModel was unloaded, and its adapter with it; save before "
                                         r"unload\(\)"):
        dm.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# -- adapter files ---------------------------------------------------------------------------------------------------
def assert_refused(path, match, base=None):
    """Loading the adapter at `path` onto `base` (a fresh tiny Llama) raises AdapterError `match`, and leaves the
    model as it was."""
    base = tiny("llama") if base is None else base
    before = snapshot(base, "llama")
    with pytest.raises(depthmix.AdapterError, match=match):
        depthmix.DepthMixModel.from_pretrained(base, path)
    assert_unchanged(base, "llama", before)


def rewrite_tensors(path, change):
    """Rewrite the adapter's tensors with `change` and re-sign them (the config's sha256), as a tool would."""
    tensors = change(io.load_tensors(path / WEIGHTS_NAME))
    digest = io.save_tensors(path / WEIGHTS_NAME, tensors, {"format": "depthmix-adapter/1"})
    edit_config(path, lambda m: m.update(weights_sha256=digest))


def test_causal_lm_adapter_onto_a_sequence_classifier_is_refused(tmp_path):
    build("molex").save_pretrained(tmp_path)
    torch.manual_seed(0)
    other = LlamaForSequenceClassification(tiny("llama").config).eval()
    assert_refused(tmp_path, "model_class: adapter 'LlamaForCausalLM' vs model 'LlamaForSequenceClassification'",
                   other)


@pytest.mark.parametrize("field,value,message", [
    ("config", None, "field 'config' is null, expected the molex method's config"),
    ("config", [1, 2], r"field 'config' is \[1, 2\], expected the method's config \(an object\)"),
    ("lora", "r8", r"field 'lora' is 'r8', expected a peft LoraConfig"),
    ("lora", {"init_lora_weights": "loftq"}, r"field 'lora' is not a peft LoraConfig \(`loftq_config` must"),
    ("lora", {"peft_type": "LOHA"}, r"field 'lora' has peft_type 'LOHA'; depthmix adapters carry LoRA/DoRA"),
    ("method", 3, "field 'method' is 3, expected a method name or null"),
    ("train_head", "no", "field 'train_head' is 'no', expected true or false"),
    ("info", [], r"field 'info' is \[\], expected an object"),
])
def test_adapter_config_field_of_the_wrong_kind_is_refused(field, value, message, tmp_path):
    build("molex", with_lora=True).save_pretrained(tmp_path)
    edit_config(tmp_path, lambda m: m.update({field: value}))
    assert_refused(tmp_path, f"{CONFIG_NAME}: {message}")


def test_adapter_config_that_is_not_utf8_is_refused(tmp_path):
    build("molex").save_pretrained(tmp_path)
    file = tmp_path / CONFIG_NAME
    file.write_bytes(file.read_bytes().replace(b'"info": {}', '"info": {"who": "Jos\u00e9"}'.encode("latin-1")))
    assert_refused(tmp_path, rf"{CONFIG_NAME}: line \d+: not UTF-8 text \(byte 0xe9\); save the file as UTF-8")


def test_gate_tensors_stored_as_integers_are_refused(tmp_path):
    build("molex").save_pretrained(tmp_path)
    rewrite_tensors(tmp_path, lambda t: {**t, "method.gates.0.weight": t["method.gates.0.weight"].round().long()})
    assert_refused(tmp_path, rf"{WEIGHTS_NAME}: method.gates.0.weight is stored as torch.int64, the model expects "
                             r"torch.float32")


def test_half_precision_adapter_still_loads_as_a_cast(tmp_path):
    """A float16 adapter (saved from a half-precision model) loads onto a float32 one: floats cast, only kinds
    that are not floating point are refused."""
    dm = build("molex", with_lora=True)
    dm.save_pretrained(tmp_path)
    rewrite_tensors(tmp_path, lambda t: {k: v.half() for k, v in t.items()})
    again = depthmix.DepthMixModel.from_pretrained(tiny("llama"), tmp_path)
    torch.testing.assert_close(logits(again, "llama"), logits(dm, "llama"), rtol=1e-2, atol=1e-2)



@pytest.mark.parametrize("change,message", [
    (lambda m: m.update(info=[]), r"field 'info' is \[\], expected an object"),
    (lambda m: m.update(config=None), "field 'config' is null, expected the molex method's config"),
])
def test_load_trained_checks_the_config_before_loading_a_model(change, message, tmp_path):
    """The CLI's way in (eval, plot, lm-eval): the config is checked whole before the base model it names loads."""
    from depthmix.train import load_trained
    build("molex").save_pretrained(tmp_path, info={"base_model": "/nonexistent/model"})
    edit_config(tmp_path, change)
    with pytest.raises(depthmix.AdapterError, match=f"{CONFIG_NAME}: {message}"):
        load_trained(str(tmp_path))
