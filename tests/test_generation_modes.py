"""Every decoding mode, however it is asked for, gives the tokens the uncached model gives, or is refused by name."""
import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, GenerationConfig, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import depthmix
from conftest import CAUSAL, batch, tiny

GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)


def spread(dm):
    """Gates spread wide (so that the rows of a batch pick different experts), LoRA-free; in eval mode."""
    with torch.no_grad():
        for g in dm.method.gates:
            g.weight.normal_(0, 3.0)
    return dm.eval()


def molex(model, **kw):
    return spread(depthmix.apply(model, depthmix.MoLExConfig(**kw)))


def mod(family, seed=0, skip="block"):
    dm = depthmix.apply(tiny(family, seed=seed), depthmix.MoDConfig(capacity=0.5, layers=[1, 3], skip=skip,
                                                                    update="retrofit"))
    with torch.no_grad():  # routers and predictors that send some tokens through and some around
        for p in dm.method.predictors:
            p[-1].bias.normal_(0, 1.0)
        for r in dm.method.routers:
            r.weight.normal_(0, 1.0)
    return dm.eval()


def sliding(kind: str, window: int = 4):
    """A tiny Mistral, Qwen2 with use_sliding_window, or Gemma2 (sliding and full layers in turn), whose window is
    shorter than what is generated."""
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  sliding_window=window)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common)).eval()
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, max_window_layers=0)).eval()


def both(dm, ids, mask, **kw):
    """generate() with its KV cache and without: (cached tokens, uncached tokens)."""
    with torch.no_grad():
        cached = dm.generate(input_ids=ids, attention_mask=mask, **GREEDY, **kw)
        uncached = dm.generate(input_ids=ids, attention_mask=mask, **GREEDY, **{**kw, "use_cache": False})
    return cached, uncached


def picks_several(dm, ids, mask):
    """The batch routes to more than one expert at some mixed layer, so rows really go through different caches."""
    dm.method.reset_stats()
    dm.method.recording = True
    with torch.no_grad():
        dm(input_ids=ids, attention_mask=mask)
    dm.method.recording = False
    return bool(((dm.method.counts > 0).sum(1) >= 2).any())


# -- MoLEx: the expert caches follow the beams ---------------------------------------------------------------
@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("num_beams", [2, 3])
def test_molex_beam_search_cached_equals_uncached(family, num_beams):
    dm = molex(tiny(family))
    ids, mask = batch(family, b=2, s=5)
    assert picks_several(dm, ids, mask)
    cached, uncached = both(dm, ids, mask, num_beams=num_beams)
    assert torch.equal(cached, uncached)


def test_molex_beam_search_from_a_generation_config_and_the_models_own():
    dm = molex(tiny("llama"))
    ids, mask = batch("llama", b=2, s=5)
    cached, uncached = both(dm, ids, mask, generation_config=GenerationConfig(num_beams=3))
    assert torch.equal(cached, uncached)
    dm.base_model.generation_config.num_beams = 2
    cached, uncached = both(dm, ids, mask)
    assert torch.equal(cached, uncached)


# -- MoLEx past a sliding window, with a static cache, with prompt lookup and an assistant -----------------------
@pytest.mark.parametrize("kind", ["mistral", "qwen2", "gemma2"])
def test_molex_generates_past_the_sliding_window(kind):
    dm = molex(sliding(kind, window=4))
    ids, mask = batch("llama", b=3, s=6)
    ids, mask = ids[:, -3:], mask[:, -3:]  # 3-token prompts (one of them 1 token), 8 new tokens: well past 4
    cached, uncached = both(dm, ids, mask)
    assert torch.equal(cached, uncached)
    cached, uncached = both(dm, ids, mask, num_beams=2)
    assert torch.equal(cached, uncached)


def test_molex_static_cache_equals_uncached():
    dm = molex(tiny("llama"))
    ids, mask = batch("llama", b=2, s=5)
    assert picks_several(dm, ids, mask)
    cached, uncached = both(dm, ids, mask, cache_implementation="static")
    assert torch.equal(cached, uncached)
    for kind in ("mistral", "gemma2"):  # static sliding-window layers; Gemma2 gets one prepared mask per kind
        dm = molex(sliding(kind, window=4))
        cached, uncached = both(dm, ids, mask, cache_implementation="static")
        assert torch.equal(cached, uncached), kind


def repetitive_prompt():
    ids = torch.tensor([[5, 9, 7, 5, 9, 7, 5, 9]])  # n-grams that recur, so prompt lookup proposes (and drops) tokens
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("ask", ["prompt_lookup", "assistant"])
def test_molex_assisted_decoding_equals_greedy(ask):
    dm = molex(tiny("llama"))
    ids, mask = repetitive_prompt()
    kw = {"prompt_lookup_num_tokens": 3} if ask == "prompt_lookup" else {"assistant_model": tiny("llama", seed=5)}
    with torch.no_grad():
        greedy = dm.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        assisted = dm.generate(input_ids=ids, attention_mask=mask, **GREEDY, **kw)
    assert torch.equal(assisted, greedy)


# -- MoD: beams follow its stores; what its stores cannot follow is refused, however it is asked for ------------
@pytest.mark.parametrize("family", CAUSAL)
def test_mod_beam_search_cached_equals_uncached(family):
    dm = mod(family)
    ids, mask = batch(family, b=2, s=5)
    for kw in ({"num_beams": 2}, {"generation_config": GenerationConfig(num_beams=3)}):
        cached, uncached = both(dm, ids, mask, **kw)
        assert torch.equal(cached, uncached), kw
    dm.base_model.generation_config.num_beams = 2
    cached, uncached = both(dm, ids, mask)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("how", ["kwargs", "generation_config", "model_generation_config"])
@pytest.mark.parametrize("ask, named", [({"prompt_lookup_num_tokens": 2}, "prompt-lookup"),
                                        ({"assistant_early_exit": 1}, "assisted")])
def test_mod_refuses_decodings_that_take_tokens_back(how, ask, named):
    dm = mod("llama")
    ids, mask = repetitive_prompt()
    if how == "kwargs":
        kw = dict(ask)
    elif how == "generation_config":
        kw = {"generation_config": GenerationConfig(**ask)}
    else:
        for k, v in ask.items():
            setattr(dm.base_model.generation_config, k, v)
        kw = {}
    with pytest.raises(depthmix.ConfigError, match=f"MoD generate\\(\\): {named}.*greedy decoding, sampling or beam"):
        dm.generate(input_ids=ids, attention_mask=mask, **GREEDY, **kw)


def test_mod_refuses_an_assistant_model():
    dm = mod("llama")
    ids, mask = repetitive_prompt()
    with pytest.raises(depthmix.ConfigError, match="assisted decoding"):
        dm.generate(input_ids=ids, attention_mask=mask, **GREEDY, assistant_model=tiny("llama", seed=5))


@pytest.mark.parametrize("skip", ["block", "attention"])
def test_mod_static_cache_routes_as_the_dynamic_cache(skip):
    dm = mod("llama", skip=skip)
    ids, mask = batch("llama", b=2, s=5)
    processed = []
    for kw in ({}, {"cache_implementation": "static"}):
        dm.method.reset_stats()
        with torch.no_grad():
            out = dm.generate(input_ids=ids, attention_mask=mask, **GREEDY, **kw)
        processed.append((out, dm.method.stats[:, :2].clone()))
    assert torch.equal(processed[0][0], processed[1][0])
    assert torch.equal(processed[0][1], processed[1][1])  # the same tokens went through each routed module
    assert torch.equal(processed[1][0], both(dm, ids, mask)[1])


def test_mod_routed_mlp_refuses_a_static_cache():
    dm = mod("llama", skip="mlp")
    ids, mask = batch("llama", b=2, s=5)
    with pytest.raises(depthmix.ConfigError, match="skip='mlp' with a static cache"):
        dm.generate(input_ids=ids, attention_mask=mask, **GREEDY, cache_implementation="static")


def test_molex_token_routing_refuses_assisted_decoding():
    dm = molex(tiny("llama"), granularity="token")
    ids, mask = repetitive_prompt()
    with pytest.raises(depthmix.ConfigError, match="MoLEx generate\\(\\): prompt-lookup.*granularity 'sequence'"):
        dm.generate(input_ids=ids, attention_mask=mask, **GREEDY, prompt_lookup_num_tokens=2)
