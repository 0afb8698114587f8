"""No default path sees the future: in a causal LM, changing the tokens after position t leaves the logits at
positions <= t unchanged, for every family and method, in every mode a user reaches without asking for lookahead.

MoLEx gates are randomised so that their choice depends on the content; each MoLEx sequence-routing case also
checks that an all-tokens vote (the old no-labels behaviour, reached here through an explicit all-prompt mask)
*would* have moved the earlier logits, so the test can fail."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import depthmix
from conftest import VOCAB, batch, tiny

FAMILIES = ("llama", "gpt2", "qwen2")
METHODS = ("molex-sequence", "molex-token", "mode-token", "mode-static", "mod")
MODES = ("no_labels", "labels_prompt", "labels_all", "prompt_mask", "left_padding")
PROMPT = 3  # real tokens in the prompt, in the modes that mark one
S = 12


def base(family: str, seed: int = 0):
    if family != "qwen2":
        return tiny(family, seed=seed)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(cfg).eval()


def config(method: str):
    name, _, option = method.partition("-")
    if name == "molex":
        return depthmix.MoLExConfig(granularity=option)
    if name == "mode":
        return depthmix.MoDEConfig(mixing=option)
    return depthmix.MoDConfig(capacity=0.5)


def make(family: str, method: str, seed: int = 0):
    dm = depthmix.apply(base(family), config(method))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # content-dependent routing: spread every router and gate
        for name, p in dm.method.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (3.0 if name.startswith("gates") else 1.0))
    return dm.eval()


def inputs(mode: str, ids, mask):
    """The keyword arguments of a forward in this mode; labels and prompt follow the (changed) ids."""
    kw = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    real = mask.cumsum(-1) * mask  # 1, 2, ... on the real tokens
    prompt = (real >= 1) & (real <= PROMPT)
    if mode == "labels_prompt":
        kw["labels"] = ids.masked_fill(~mask.bool() | prompt, -100)
    elif mode == "labels_all":
        kw["labels"] = ids.masked_fill(~mask.bool(), -100)
    elif mode == "prompt_mask":
        kw["prompt_mask"] = prompt
    return kw


def scored_from(mode: str, mask) -> int:
    """The first column t whose suffix may change: after the prompt where a mode marks one."""
    if mode in ("labels_prompt", "prompt_mask"):
        return int(((mask.cumsum(-1) == PROMPT) & mask.bool()).nonzero()[:, 1].max())
    return 0


def changed_after(ids, mask, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    new = ids.clone()
    later = mask.bool() & (torch.arange(ids.shape[1]) > t)
    new[later] = torch.randint(3, VOCAB, (int(later.sum()),), generator=g)
    return new


def logits(dm, kw):
    with torch.no_grad():
        return dm(**kw).logits


def worst_move(dm, kw_of, ids, mask, start: int) -> float:
    """The largest change of a real position's logits at a column <= t when the tokens after t change, over
    t = start .. S-2 (one random change each)."""
    ref = logits(dm, kw_of(ids))
    worst = 0.0
    for t in range(start, ids.shape[1] - 1):
        other = logits(dm, kw_of(changed_after(ids, mask, t, seed=t)))
        keep = mask[:, :t + 1].bool()
        worst = max(worst, float((ref[:, :t + 1][keep] - other[:, :t + 1][keep]).abs().max()))
    return worst


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_later_tokens_do_not_move_earlier_logits(family, method, mode):
    dm = make(family, method)
    ids, mask = batch("llama", b=3, s=S, seed=5)
    if mode == "no_labels":
        mask = torch.ones_like(mask)
        ids = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(4))
    start = scored_from(mode, mask)
    moved = worst_move(dm, lambda x: inputs(mode, x, mask), ids, mask, start)
    assert moved < 1e-5, f"{family} {method} {mode}: logits at <= t moved by {moved:.3g}"
    if method == "molex-sequence":
        # every real token voting (the old default without labels): the same changes move earlier logits
        vote_all = lambda x: dict(inputs(mode, x, mask), prompt_mask=mask.bool())  # noqa: E731
        assert worst_move(dm, vote_all, ids, mask, start) > 1e-3, \
            "the gate should be content-dependent enough for an all-tokens vote to leak"


def test_the_tokens_that_decide():
    """The leading run of the marked prompt; a token marked (or labelled -100) after the first scored position
    does not vote; a row with no prompt, or a forward that says nothing, decides on its first real token."""
    dm = make("llama", "molex-sequence")
    ids, mask = batch("llama", b=3, s=S, seed=4)
    real = mask.cumsum(-1) * mask
    lead = (real >= 1) & (real <= PROMPT)
    holes = lead | (real >= S - 3)  # marked again after the prompt ended
    first = real == 1
    no_first_prompt = lead & (torch.arange(3) > 0)[:, None]
    cases = [({"prompt_mask": holes}, lead), ({"labels": ids.masked_fill(~mask.bool() | holes, -100)}, lead),
             ({"prompt_mask": no_first_prompt}, torch.where(torch.arange(3)[:, None] > 0, lead, first)),
             ({}, first), ({"labels": ids.masked_fill(~mask.bool(), -100)}, first)]
    z = torch.zeros(3, S, 32)
    for extra, want in cases:
        dm.method.begin({"input_ids": ids, "attention_mask": mask, **extra})
        assert torch.equal(dm.method.units(z), want), sorted(extra)


def test_prompt_mask_holds_when_gradient_checkpointing_reruns_the_blocks():
    ids, mask = batch("llama", b=3, s=S, seed=5)
    labels = ids.masked_fill(~mask.bool(), -100)

    def gate_grads(checkpointing: bool, prompt: bool) -> torch.Tensor:
        dm = make("llama", "molex-sequence").train()
        if checkpointing:
            dm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kw = inputs("prompt_mask" if prompt else "no_labels", ids, mask)
        dm(**kw, labels=labels).loss.backward()
        return torch.cat([p.grad.flatten() for p in dm.method.parameters()])

    want = gate_grads(False, True)
    assert (want - gate_grads(False, False)).abs().max() > 1e-4  # the prompt changes the decision
    torch.testing.assert_close(gate_grads(True, True), want)


def test_prompt_mask_is_refused_with_the_wrong_shape():
    dm = make("llama", "molex-sequence")
    ids, mask = batch("llama", b=3, s=S)
    with pytest.raises(ValueError, match="prompt_mask"):
        dm(input_ids=ids, attention_mask=mask, prompt_mask=mask[:2])


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_and_uncached_generate_give_the_same_tokens(family):
    # seed 3 and these batches: under an all-tokens vote, uncached steps took other tokens in each family
    dm = make(family, "molex-sequence", seed=3)
    vote_moved = 0.0
    for seed in range(3):
        ids, mask = batch("llama", b=4, s=7, seed=seed)
        gen = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                   eos_token_id=None)
        with torch.no_grad():
            cached = dm.generate(**gen, use_cache=True)
            uncached = dm.generate(**gen, use_cache=False)
        assert torch.equal(cached, uncached)
        # teacher forcing with the prompt marked gives the same greedy tokens ...
        full = torch.cat([mask, torch.ones(4, 12, dtype=torch.long)], 1)
        kw = inputs("no_labels", cached, full)
        with torch.no_grad():
            logits = dm(**kw, prompt_mask=torch.arange(full.shape[1]).expand_as(full) < 7).logits
            voted = dm(**kw, prompt_mask=full.bool()).logits
        assert torch.equal(logits[:, 6:-1].argmax(-1), cached[:, 7:])
        vote_moved = max(vote_moved, float((logits - voted).abs().max()))
    # ... and a vote over the generated tokens (what uncached steps did) would have picked other experts
    assert vote_moved > 1e-3
    assert dm.method._generate_prompt is None  # nothing outlives the generate() call


def test_generate_remembers_a_positional_prompt():
    dm = make("llama", "molex-sequence", seed=3)
    ids, mask = batch("llama", b=4, s=7, seed=1)
    gen = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(dm.generate(ids, **gen, use_cache=False), dm.generate(input_ids=ids, **gen))


# -- scoring: the multiple-choice loglik and lm-eval pass the context as the prompt ------------------------------
@pytest.fixture(scope="module")
def tok():
    from depthmix.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


def wide_molex(tok, seed: int = 0):
    """A tiny llama over the tokenizer's vocabulary with content-dependent sequence routing."""
    model = tiny("llama", seed=seed)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    dm = depthmix.apply(model, depthmix.MoLExConfig(granularity="sequence"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in dm.method.gates:
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * 3.0)
    return dm.eval()


# the last two share one forward pass (options that differ in their only token), in loglik and in lm_eval
CONTEXTS = ["The sky is", "Two plus two is", "Fire is very", "A cat sat on the", "Grass is", "Grass is"]
CONTINUATIONS = [" blue and wide open", " four, or so they say", " hot", " mat near the warm door", " green", " red"]


def reference(dm, ctx_ids, cont_ids, prompt: str) -> float:
    """Sum of log p(continuation) from one forward; the routing decided by the context, every token or the
    first token."""
    ids = torch.tensor([ctx_ids + cont_ids])
    n = ids.shape[1]
    decide = {"context": len(ctx_ids), "all": n, "first": 1}[prompt]
    with torch.no_grad():
        logits = dm(input_ids=ids, prompt_mask=torch.arange(n)[None] < decide).logits
    logp = logits[0, len(ctx_ids) - 1:-1].log_softmax(-1)
    return float(logp.gather(-1, torch.tensor(cont_ids)[:, None]).sum())


def check_leak_would_show(refs: dict) -> None:
    """The context's decision differs from both an all-tokens vote and the first-token fallback somewhere,
    so a scorer that does not pass the context gives other numbers."""
    for other in ("all", "first"):
        assert max(abs(a - b) for a, b in zip(refs["context"], refs[other])) > 1e-3, other


@pytest.mark.slow
def test_multiple_choice_loglik_decides_on_the_prompt(tok):
    from depthmix.data.instruct.common import pair_ids
    from depthmix.evaluation.loglik import loglik
    dm = wide_molex(tok)
    ps, cs = pair_ids(tok, CONTEXTS, CONTINUATIONS)
    refs = {k: [reference(dm, p, c, k) for p, c in zip(ps, cs)] for k in ("context", "all", "first")}
    check_leak_would_show(refs)
    got = loglik(dm, tok, CONTEXTS, CONTINUATIONS, batch_size=4, progress=False)
    assert [n for _, n in got] == [len(c) for c in cs]
    torch.testing.assert_close(torch.tensor([s for s, _ in got]), torch.tensor(refs["context"]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lm_eval_loglikelihood_decides_on_the_context(tok):
    from lm_eval.api.instance import Instance

    from depthmix.evaluation.lm_eval import hflm
    dm = wide_molex(tok)
    lm = hflm(dm, tok, batch_size=4)
    pairs = [lm._encode_pair(c, x) for c, x in zip(CONTEXTS, CONTINUATIONS)]
    refs = {k: [reference(dm, c, x, k) for c, x in pairs] for k in ("context", "all", "first")}
    check_leak_would_show(refs)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(c, x), idx=i)
                for i, (c, x) in enumerate(zip(CONTEXTS, CONTINUATIONS))]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    torch.testing.assert_close(torch.tensor([s for s, _ in got]), torch.tensor(refs["context"]),
                               rtol=1e-4, atol=1e-4)


def test_lm_eval_rows_find_their_context_even_when_a_token_equals_the_padding():
    from depthmix.evaluation.lm_eval import prompt_lengths, prompt_mask
    # rows HFLM builds: context + continuation less its last token; 0 is both HFLM's padding and a real token
    requests = [(None, [5, 6], [7, 9]), (None, [8], [0, 3]), (None, [4, 4, 4], [4])]
    prompts = prompt_lengths(requests, max_length=16)
    assert prompts == {(5, 6, 7): 2, (8, 0): 1, (4, 4, 4): 3}
    inps = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [4, 4, 4, 0], [1, 2, 0, 0]])
    want = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]).bool()
    assert torch.equal(prompt_mask(inps, prompts), want)  # an unknown row gets no context: the first token decides
