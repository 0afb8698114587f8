"""MoD routing a sub-layer (skip="attention" or "mlp") instead of the whole block, and decoding at batch > 1."""
import pytest
import torch

import depthmix
from conftest import CAUSAL, batch, tiny
from test_mod import inputs, logits, mod, record_io, routed_forward, same_past

pytestmark = pytest.mark.parametrize("family", CAUSAL)
SKIPS = ("block", "attention", "mlp")


def generate(dm, ids, mask, n=6, **kw):
    with torch.no_grad():
        return dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                           eos_token_id=None, **kw)


@pytest.mark.parametrize("skip", SKIPS)
def test_retrofit_capacity_one_is_the_dense_model_exactly(family, skip):
    ids, mask = batch(family, b=3, s=10)
    dense = tiny(family)
    with torch.no_grad():
        want = dense(**inputs(ids, mask)).logits
        torch.manual_seed(3)  # GPT-2 has dropout in train mode: the same draws for both models
        # no KV cache in training on either side: a routed block keeps none (MoD drops it), and GPT-2's cache copies
        # the keys, which changes SDPA's rounding (7e-8 in the logits)
        want_train = dense.train()(**inputs(ids, mask), use_cache=False).logits
    dm = mod(family, update="retrofit", capacity=1.0, layers="all", skip=skip)
    keep = mask.bool()
    assert torch.equal(logits(dm, ids, mask)[keep], want[keep])
    dm.train()  # top-k with gradients: g = 1 + s - stopgrad(s) is exactly 1 in the forward pass
    torch.manual_seed(3)
    got = dm(**inputs(ids, mask), use_cache=False).logits
    assert got.requires_grad and torch.equal(got[keep], want_train[keep])


@pytest.mark.parametrize("skip", ["attention", "mlp"])
def test_routed_sublayer_runs_on_the_selected_tokens_only(family, skip):
    """The routed branch against a reference by hand: f of the selected tokens alone (attention: at their true
    positions, causal among themselves) times r, and 0 for every other token."""
    dm = mod(family, capacity=0.4, layers=[1], skip=skip)
    sub = dm.method.routed_module(0)
    seen = record_io(sub)
    ids = torch.randint(3, 60, (1, 15))
    logits(dm, ids, torch.ones_like(ids))
    x = seen["x"][0]
    r = dm.method.routers[0](x.float()).squeeze(-1)
    idx = r.topk(6).indices.sort().values  # ceil(0.4 * 15)
    kw = {}
    if skip == "attention":
        kw["attention_mask"] = None
        if family == "llama":
            kw["position_embeddings"] = dm.base_model.model.rotary_emb(x[None], idx[None])
    with torch.no_grad():
        f = type(sub)._depthmix_mixin_of.forward(sub, x[idx][None], **kw)
    f = (f[0] if isinstance(f, tuple) else f)[0]
    want = torch.zeros_like(x)
    want[idx] = r[idx, None] * f
    out = seen["out"][0] if skip == "attention" else seen["out"]
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-6)
    assert (out[0].abs().sum(-1) > 0).sum() == len(idx)


@pytest.mark.parametrize("skip", ["attention", "mlp"])
def test_eval_routing_of_a_sublayer_never_sees_the_future(family, skip):
    dm = mod(family, capacity=0.4, skip=skip)
    ids, mask = batch(family, b=3, s=12)
    base = routed_forward(dm, ids, mask)
    assert 0 < dm.method.summary()["realized_capacity"] < 1
    for t in (4, 8):
        other = ids.clone()
        other[:, t + 1:] = (other[:, t + 1:] + 7) % 60 + 3
        got = routed_forward(dm, other, mask)
        same_past(got, base, t + 1)
        assert not torch.equal(got[0][:, t + 1:], base[0][:, t + 1:])


@pytest.mark.parametrize("skip", ["attention", "mlp"])
@pytest.mark.parametrize("update", ["paper", "retrofit"])
def test_cached_generate_of_a_routed_sublayer_equals_uncached(family, skip, update):
    # the MLP keeps no K/V, so block 0's MLP may be routed while decoding with a cache
    layers = [0, 1, 3] if skip == "mlp" else "every_other"
    dm = mod(family, capacity=0.3, skip=skip, update=update, layers=layers)
    ids, mask = batch(family, b=3, s=8)
    dm.method.reset_stats()
    cached = generate(dm, ids, mask)
    assert 0 < dm.method.summary()["realized_capacity"] < 1  # tokens did skip the sub-layers
    assert torch.equal(cached, generate(dm, ids, mask, use_cache=False))


@pytest.mark.parametrize("skip", ["attention", "mlp"])
@pytest.mark.parametrize("update", ["paper", "retrofit"])
def test_routers_of_a_sublayer_get_gradients(family, skip, update):
    dm = mod(family, capacity=0.5, skip=skip, update=update).train()
    ids, mask = batch(family, b=3, s=12)
    dm(**inputs(ids, mask), labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    for i, router in enumerate(dm.method.routers):
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0, i


def test_skip_is_checked_and_saved(family, tmp_path):
    with pytest.raises(depthmix.ConfigError, match="MoDConfig.skip"):
        depthmix.MoDConfig(skip="ffn")
    dm = mod(family, skip="attention")
    ids, mask = batch(family)
    before = logits(dm, ids, mask, "causal")
    dm.save_pretrained(tmp_path)
    again = depthmix.DepthMixModel.from_pretrained(tiny(family), tmp_path)
    assert again.method.config.skip == "attention"
    assert torch.equal(logits(again, ids, mask, "causal"), before)


@pytest.mark.parametrize("skip", SKIPS)
@pytest.mark.parametrize("capacity, causal", [(0.25, "predictor"), (0.3, "aux_loss"), (1.0, "predictor")])
def test_analytic_flops_follow_what_a_routed_sublayer_runs(family, skip, capacity, causal):
    """analytic() against FlopCounterMode on a top-k forward: only the skipped sub-layer runs on the k routed
    tokens, the other one on all of them (k = ceil(0.3 * 24) = 8 is not a multiple of the length)."""
    from depthmix import flops
    from depthmix.tuners.mod.flops import analytic
    dense = tiny(family)
    dm = depthmix.apply(tiny(family), depthmix.MoDConfig(capacity=capacity, skip=skip, causal=causal))
    b, s = 2, 24
    est = analytic(dense.config, s, dm.method.layers, capacity, dm.arch.num_layers, dense.config.vocab_size,
                   predictor=causal == "predictor", skip=skip)
    assert b * est["dense"] == pytest.approx(flops.forward_flops(dense, b, s), rel=1e-6)
    assert b * est["mod"] == pytest.approx(flops.forward_flops(dm, b, s, "topk"), rel=1e-6)
    if capacity < 1 and skip != "block":  # a sub-layer saves less than the whole block
        whole = analytic(dense.config, s, dm.method.layers, capacity, dm.arch.num_layers,
                         dense.config.vocab_size, predictor=causal == "predictor")
        assert whole["mod"] < est["mod"] < est["dense"]


def projection(module):
    """A projection inside a routed module, called once per run of it, on the rows that run."""
    return next(m for n, m in module.named_modules() if n.endswith(("o_proj", "down_proj", "c_proj")))


@pytest.mark.parametrize("skip", SKIPS)
def test_decoding_runs_a_routed_module_only_on_the_rows_that_route(family, skip):
    """Batch 3 with mixed decisions: each decoding step runs a routed module on the rows that process their
    token only (their K/V stores gathered), and the tokens equal an uncached recompute."""
    dm = mod(family, capacity=0.5, skip=skip, layers=[1, 3])
    calls = {0: [], 1: []}
    for i in range(2):
        projection(dm.method.routed_module(i)).register_forward_pre_hook(
            lambda m, a, i=i: calls[i].append(tuple(a[0].shape[:2])) and None)
    ids, mask = batch(family, b=3, s=8)
    dm.method.reset_stats()
    generate(dm, ids, mask, n=1)  # the prompt alone
    prompt = dm.method.stats[:, 0].tolist()
    dm.method.reset_stats()
    calls = {0: [], 1: []}
    out = generate(dm, ids, mask, n=7)
    for i in range(2):
        assert calls[i][0][1] > 1  # the prompt
        steps = [b for b, q in calls[i][1:] if q == 1]
        assert len(steps) == len(calls[i]) - 1
        assert any(0 < b < 3 for b in steps), steps  # some steps ran on some rows only
        assert sum(steps) == dm.method.stats[i, 0].item() - prompt[i]  # one row per token processed, no more
    assert torch.equal(out, generate(dm, ids, mask, n=7, use_cache=False))


@pytest.mark.parametrize("skip", ["attention", "mlp"])
def test_untrained_retrofit_decodes_only_the_sink_through_a_routed_sublayer(family, skip):
    """Zero routers decide "skip" everywhere: only each row's first real token goes through the routed
    sub-layers, in the prompt and in every decoding step (a routed MLP never sees the cache: it must still know
    that a decoding step's token is not the first)."""
    dm = depthmix.apply(tiny(family), depthmix.MoDConfig(update="retrofit", causal="aux_loss", skip=skip)).eval()
    ids, mask = batch(family, b=3, s=8)
    cached = generate(dm, ids, mask, n=4)
    assert dm.method.stats[:, 0].tolist() == [3.0, 3.0]
    assert torch.equal(cached, generate(dm, ids, mask, n=4, use_cache=False))


def by_token_routing(family, skip, monkeypatch):
    """Rows processing 5, 3, 2 and 2 of their tokens (decisions by token id, multiples of 4 processed, the same in
    a row alone), and a hook recording the (rows, tokens) shape each call of the first routed module gets."""
    dm = depthmix.apply(tiny(family), depthmix.MoDConfig(update="retrofit", causal="aux_loss", skip=skip,
                                                         layers=[1, 3])).eval()

    def by_token(i, x):
        d = torch.where(dm.method.inputs["input_ids"] % 4 == 0, 5.0, -5.0)[:, -x.shape[1]:]
        return d, d

    monkeypatch.setattr(dm.method, "scores", by_token)
    monkeypatch.setattr(dm.method, "predictor", lambda i, x: by_token(i, x)[1])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 15, (4, 12), generator=g) * 4 + torch.randint(1, 4, (4, 12), generator=g)  # none
    for row, picks in enumerate(([0, 2, 5, 8, 11], [0, 7, 10], [0, 9], [11])):
        ids[row, picks] = 4 * (row + 3)  # each row's first real token (its sink, kept: keep_first) and more
    mask = torch.ones_like(ids)
    mask[3, :5] = 0  # left padding: row 3's first real token is at 5
    ids[3, :5] = 0
    ids[3, 5] = 1
    calls = []
    projection(dm.method.routed_module(0)).register_forward_pre_hook(
        lambda m, a: calls.append(tuple(a[0].shape[:2])) and None)
    return dm, ids, mask, calls


@pytest.mark.parametrize("skip", SKIPS)
def test_causal_routing_packs_the_rows_it_processes(family, skip, monkeypatch):
    """Causal routing at batch 4: one packed row of 12 tokens runs through each routed module (padding every row
    to the busiest would run 4 x 5), and each row's logits equal the row alone."""
    dm, ids, mask, calls = by_token_routing(family, skip, monkeypatch)
    full = logits(dm, ids, mask, "causal")
    assert calls == [(1, 12)] and dm.method.stats[0, 0] == 12
    for row in range(4):
        keep = mask[row].bool()
        alone = logits(dm, ids[row, keep][None], mask[row, keep][None], "causal")
        torch.testing.assert_close(full[row][keep], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skip", SKIPS)
def test_a_cached_prompt_is_packed_too(family, skip, monkeypatch):
    """generate() at batch 4: the prompt's call packs the rows' 12 processed tokens into one row (their keys and
    values then go to each sequence's own store), and the generation equals the uncached one."""
    dm, ids, mask, calls = by_token_routing(family, skip, monkeypatch)
    cached = generate(dm, ids, mask, n=4, return_dict_in_generate=True)
    assert calls[0] == (1, 12)
    if skip != "mlp":  # a routed MLP keeps no keys/values
        from depthmix.blocks import CACHE_ARG
        from depthmix.tuners.mod.cache import KEY
        from depthmix.tuners.mod.layer import first_real
        store = getattr(cached, CACHE_ARG).__dict__[KEY][0]
        valid = torch.cat([mask, torch.ones(4, 3, dtype=torch.long)], 1).bool()
        processed = ((cached.sequences[:, :-1] % 4 == 0) | first_real(valid)) & valid  # the sink, kept
        assert store.length.tolist() == processed.sum(1).tolist()
    calls.clear()
    assert torch.equal(cached.sequences, generate(dm, ids, mask, n=4, use_cache=False))


@pytest.mark.parametrize("skip", SKIPS)
def test_with_sharded_weights_a_module_with_nothing_to_do_is_still_called(family, skip, monkeypatch):
    """Under ZeRO-3 skipping a module's call on one rank deadlocks the others (tests/test_distributed.py). Forced
    here on one process: with no token routed, each routed module still runs (on a spare token), and the logits
    and the cached generation are exactly those of the plain skip."""
    from depthmix.tuners.mod import model as mod_model
    dm = mod(family, capacity=0.25, layers=[1, 3], skip=skip)
    with torch.no_grad():  # predictors that route no token: every routed module has nothing to do
        for p in dm.method.predictors:
            p[2].weight.zero_()
            p[2].bias.fill_(-10.0)
    calls = []
    for i in range(len(dm.method.layers)):
        leaf = [m for m in dm.method.routed_module(i).modules() if next(m.parameters(recurse=False), None) is not None]
        leaf[0].register_forward_hook(lambda *_: calls.append(1))
    ids, mask = batch(family, b=3, s=10)
    plain = logits(dm, ids, mask, "causal"), generate(dm, ids, mask)
    assert not calls
    monkeypatch.setattr(mod_model, "must_call", lambda modules: True)
    sharded = logits(dm, ids, mask, "causal"), generate(dm, ids, mask)
    assert calls  # every skip still called the module
    assert torch.equal(sharded[0], plain[0]) and torch.equal(sharded[1], plain[1])
