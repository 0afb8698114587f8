import contextlib
import math

import pytest
import torch
from peft import LoraConfig

import depthmix
from conftest import CAUSAL, LORA_TARGETS, batch, tiny
from depthmix.blocks import CACHE_ARG
from depthmix.tuners.mod.cache import KEY
from depthmix.tuners.mod.layer import capacity_k, topk_membership

pytestmark = pytest.mark.parametrize("family", CAUSAL)


# Causal routing runs a routed block on as many tokens as the rows route, so a later token can change the number of
# rows of the matrices an earlier token is computed in, and CPU kernels round a row by the row count (a Linear over
# 9 rows and over 10 differs in the last bit): an earlier token's logits then agree with their first value to
# rounding, not bit for bit. What decides whether MoD sees the future is the routing: each routed module's decisions
# for the earlier tokens must agree exactly (same_past), and where lookahead is allowed it must move the earlier
# logits far beyond rounding (moved), so the tolerance cannot hide a leak.
ROUNDING = {"rtol": 1e-5, "atol": 1e-5}


def routed_forward(dm, ids, mask, routing=None, **kw):
    """(logits, [each routed module's [B, S] selection, in call order]) of one no-grad forward."""
    seen, record = [], dm.method._record

    def spy(i, sel, *rest):
        seen.append(sel.clone())
        return record(i, sel, *rest)
    dm.method._record = spy
    try:
        with torch.no_grad(), (dm.method.routing_mode(routing) if routing else contextlib.nullcontext()):
            return dm(**inputs(ids, mask), use_cache=False, **kw).logits, seen
    finally:
        del dm.method._record


def same_past(a, b, t: int) -> None:
    """Two routed_forward results agree on positions < t: logits to rounding, routing decisions exactly."""
    torch.testing.assert_close(a[0][:, :t], b[0][:, :t], **ROUNDING)
    assert len(a[1]) == len(b[1]) and all(torch.equal(x[:, :t], y[:, :t]) for x, y in zip(a[1], b[1]))


def moved(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() > 1e-3)


def mod(family, seed=0, lora=False, spread=1.0, **kw):
    model = tiny(family, seed=seed)
    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[family],
                          fan_in_fan_out=family == "gpt2") if lora else None
    dm = depthmix.apply(model, depthmix.MoDConfig(**kw), lora=lora_cfg)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # routers and predictors that clearly prefer some tokens, so routing matters
        for r in dm.method.routers:
            r.weight.normal_(0, spread)
            r.bias.zero_()
        for p in getattr(dm.method, "predictors", []):
            p[2].weight.normal_(0, 2.0)
        for n, p in dm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    calibrate(dm.eval())
    return dm


def calibrate(dm):
    """Centre each causal decision (predictor, or router for aux_loss) on a sample, so that about half the tokens
    of a random model are processed: the tests then see both kinds of token."""
    method, seen = dm.method, {}
    hooks = [method.routed_module(i).register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.update({i: a[0] if a else kw["hidden_states"]}) and None, with_kwargs=True)
        for i in range(len(method.layers))]
    ids, mask = batch("llama", b=4, s=16, seed=5)
    with torch.no_grad():
        dm(input_ids=ids, attention_mask=torch.ones_like(mask), use_cache=False)
        for i in range(len(method.layers)):
            _, decide = method.scores(i, seen[i])
            last = method.predictors[i][2] if method.config.causal == "predictor" else method.routers[i]
            last.bias -= decide.median()
    for h in hooks:
        h.remove()
    method.reset_stats()


def inputs(ids, mask):  # left padding: positions count real tokens only, as generate() does
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def record_io(module) -> dict:
    """A dict that each call of `module` fills with its input hidden state ("x") and its output ("out")."""
    seen = {}
    module.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0] if a else kw["hidden_states"]) and None,
                                     with_kwargs=True)
    module.register_forward_hook(lambda m, a, kw, out: seen.update(out=out) and None, with_kwargs=True)
    return seen


def logits(dm, ids, mask, routing="topk-lookahead"):
    with torch.no_grad(), dm.method.routing_mode(routing):
        return dm(**inputs(ids, mask), use_cache=False).logits


def test_topk_selects_exactly_k_per_sequence_never_padding(family):
    g = torch.Generator().manual_seed(0)
    for capacity in (0.01, 0.125, 0.3, 1.0):
        valid = torch.ones(5, 23, dtype=torch.bool)
        for i, n in enumerate([0, 1, 5, 12]):
            valid[i + 1, :n] = False  # left padding of several lengths
        valid[4, 20:] = False  # and right padding
        scores = torch.randn(5, 23, generator=g)
        scores[:, :3] = 100.0  # padding with the best scores must still lose
        sel = topk_membership(scores, valid, capacity)
        want = [max(1, math.ceil(capacity * int(n) - 1e-9)) for n in valid.sum(1)]
        assert sel.sum(1).tolist() == want
        assert not (sel & ~valid).any()
    assert capacity_k(torch.ones(1, 30, dtype=torch.bool), 0.1).item() == 3  # not 4 from 0.1 * 30 = 3.0000000000000004

    dm = mod(family, capacity=0.25)
    ids, mask = batch(family, b=3, s=13)
    logits(dm, ids, mask)
    k = sum(math.ceil(0.25 * int(n)) for n in mask.sum(1))
    assert dm.method.stats[:, 0].tolist() == [k] * len(dm.method.layers)


def test_causal_mode_never_sees_the_future(family):
    dm = mod(family)
    ids, mask = batch(family, b=2, s=12)
    base = routed_forward(dm, ids, mask, "causal")
    assert 0 < dm.method.summary()["realized_capacity"] < 1  # some tokens go around the blocks, some not
    topk_changed = False
    for p in (4, 8, 11):
        other = ids.clone()
        other[:, p] = (other[:, p] + 7) % 60 + 3
        changed = routed_forward(dm, other, mask, "causal")
        same_past(changed, base, p)
        assert not torch.equal(changed[0][:, p:], base[0][:, p:])
        topk = logits(dm, ids, mask, "topk-lookahead"), logits(dm, other, mask, "topk-lookahead")
        topk_changed |= moved(topk[0][:, :p], topk[1][:, :p])
    assert topk_changed  # the check can fail: top-k routing does look ahead, far beyond rounding

    # generation: what decoding produced equals a teacher-forced causal forward that has more tokens after it
    with torch.no_grad():
        out = dm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                          eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    more = torch.cat([out.sequences, torch.randint(3, 60, (2, 4))], 1)
    full = logits(dm, more, torch.cat([mask, torch.ones(2, 9, dtype=torch.long)], 1), "causal")
    step_logits = torch.stack(out.logits, 1)
    torch.testing.assert_close(step_logits, full[:, 11:16], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("update", ["paper", "retrofit"])
@pytest.mark.parametrize("causal", ["predictor", "aux_loss"])
def test_router_and_predictor_get_gradients(family, update, causal):
    dm = mod(family, update=update, causal=causal, lora=True).train()
    ids, mask = batch(family, b=3, s=12)
    out = dm(**inputs(ids, mask), labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    names = {n for n, p in dm.named_parameters() if p.requires_grad and n.startswith("method.")}
    want = {f"method.routers.{i}.{w}" for i in range(2) for w in ("weight", "bias")}
    if causal == "predictor":
        want = want | {f"method.predictors.{i}.{j}.{w}" for i in range(2) for j in (0, 2) for w in ("weight", "bias")}
    assert names == want
    for n, p in dm.named_parameters():
        if n in want and n.endswith("weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    if causal == "predictor":  # the predictor learns from its own BCE only: the LM loss alone gives it nothing
        dm.zero_grad()
        dm.method.config.aux_weight = 0.0
        dm(**inputs(ids, mask), labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in dm.method.predictors.parameters())
        assert dm.method.routers[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("routing", ["topk-lookahead", "causal"])
def test_sequence_alone_equals_in_batch(family, routing):
    dm = mod(family, capacity=0.3)
    ids, mask = batch(family, b=4, s=12)
    full = logits(dm, ids, mask, routing)
    for i in range(len(ids)):
        keep = mask[i].bool()
        alone = logits(dm, ids[i, keep][None], mask[i, keep][None], routing)
        torch.testing.assert_close(full[i][keep], alone[0], rtol=1e-4, atol=1e-5)


def test_subset_keeps_true_positions(family):
    """One routed block against a reference written out by hand: the selected tokens alone, at their original
    positions (RoPE for Llama, learned positions already added for GPT-2), causal among themselves."""
    dm = mod(family, capacity=0.4, layers=[1])
    block = dm.arch.blocks[1]
    seen = record_io(block)
    ids = torch.randint(3, 60, (1, 15))
    logits(dm, ids, torch.ones_like(ids))
    x = seen["x"][0]
    r = dm.method.routers[0](x.float()).squeeze(-1)
    idx = r.topk(math.ceil(0.4 * 15)).indices.sort().values
    orig = type(block)._depthmix_mixin_of
    kw = {"attention_mask": None}
    if family == "llama":
        kw["position_embeddings"] = dm.base_model.model.rotary_emb(x[None], idx[None])
        kw["position_ids"] = idx[None]
    with torch.no_grad():
        ys = orig.forward(block, x[idx][None], **kw)[0]
    want = x.clone()
    want[idx] = x[idx] + r[idx, None] * (ys - x[idx])
    torch.testing.assert_close(seen["out"][0], want, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_is_exact(family, tmp_path):
    dm = mod(family, lora=True)
    with torch.no_grad():
        for p in dm.method.predictors.parameters():
            p.normal_()
    ids, mask = batch(family)
    before = [logits(dm, ids, mask, r) for r in ("topk-lookahead", "causal")]
    dm.save_pretrained(tmp_path)
    again = depthmix.DepthMixModel.from_pretrained(tiny(family), tmp_path)
    after = [logits(again, ids, mask, r) for r in ("topk-lookahead", "causal")]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("b", [1, 3])
def test_cached_generate_equals_full_recompute(family, b):
    # batch 1: three routed blocks in a row (block 0 keeps the model's own cache length)
    dm = mod(family, capacity=0.3, layers=[1, 2, 3] if b == 1 else "every_other")
    ids, mask = batch(family, b=b, s=8)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        cached = dm.generate(**kw, return_dict_in_generate=True)
        dm.method.reset_stats()
        recomputed = dm.generate(**kw, use_cache=False)
    assert torch.equal(cached.sequences, recomputed)
    full = logits(dm, cached.sequences, torch.cat([mask, torch.ones(b, 7, dtype=torch.long)], 1), "causal")
    assert torch.equal(full[:, 7:-1].argmax(-1), cached.sequences[:, 8:])
    # each routed block's store holds exactly the tokens it processed: its own length per block and sequence
    stores = getattr(cached, CACHE_ARG).__dict__[KEY]
    lengths = torch.stack([stores[i].length for i in range(len(dm.method.layers))])
    dm.method.reset_stats()
    logits(dm, cached.sequences[:, :-1], torch.cat([mask, torch.ones(b, 6, dtype=torch.long)], 1), "causal")
    processed = dm.method.stats[:, 0]  # the cache saw every token but the last one generated
    assert lengths.sum(1).tolist() == processed.tolist()
    assert (lengths < (mask.sum(1) + 6)).all() and lengths.unique().numel() > 1


def test_retrofit_capacity_one_is_the_dense_model_exactly(family):
    ids, mask = batch(family, b=3, s=10)
    dense = tiny(family)
    with torch.no_grad():
        want = dense(**inputs(ids, mask)).logits
        want_full = dense(input_ids=ids).logits
    dm = mod(family, update="retrofit", capacity=1.0, layers="all")
    got = logits(dm, ids, mask)
    keep = mask.bool()
    assert torch.equal(got[keep], want[keep])
    assert torch.equal(logits(dm, ids, torch.ones_like(ids)), want_full)


def test_bad_config_values_are_named(family):
    for field, value in (("capacity", 0.0), ("capacity", 1.5), ("causal", "oracle"), ("update", "scaled"),
                         ("aux_weight", -1.0), ("layers", "odd"), ("layers", []), ("keep_first", "yes"),
                         ("keep_first", 1)):
        with pytest.raises(depthmix.ConfigError, match=f"MoDConfig.{field}"):
            depthmix.MoDConfig(**{field: value})
    with pytest.raises(depthmix.ConfigError, match="out of range"):
        depthmix.apply(tiny(family), depthmix.MoDConfig(layers=[1, 9]))
    dm = mod(family)
    with pytest.raises(depthmix.ConfigError, match="routing"):
        dm.method.routing = "oracle"
