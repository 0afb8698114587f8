"""MoD outside training: no lookahead by default, and the first real token (attention sink) always processed."""
import json

import pytest
import torch

import depthmix
import depthmix.evaluation.lm_eval as harness
import depthmix.train
from conftest import CAUSAL, batch, tiny
from depthmix.blocks import CACHE_ARG
from depthmix.cli.main import main
from depthmix.models import load_tokenizer
from depthmix.tuners.mod.cache import KEY
from depthmix.tuners.mod.layer import first_real, topk_membership
from test_mod import inputs, mod, moved, routed_forward, same_past

pytestmark = pytest.mark.parametrize("family", CAUSAL)


def forward(dm, ids, mask, labels=False):
    return routed(dm, ids, mask, labels)[0]


def routed(dm, ids, mask, labels=False):
    return routed_forward(dm, ids, mask, **({"labels": ids.masked_fill(mask == 0, -100)} if labels else {}))


def change_after(ids, t):
    other = ids.clone()
    other[:, t + 1:] = (other[:, t + 1:] + 7) % 60 + 3
    return other


@pytest.mark.parametrize("update", ["paper", "retrofit"])
@pytest.mark.parametrize("causal", ["predictor", "aux_loss"])
def test_eval_forward_never_sees_the_future(family, update, causal):
    dm = mod(family, update=update, causal=causal, capacity=0.4)
    assert dm.method.routing == "auto" and dm.method.eval_routing() == "causal"
    ids, mask = batch(family, b=3, s=12)  # left padding of 0, 2 and 4 tokens
    lookahead_moved = False
    for labels in (False, True):
        base = routed(dm, ids, mask, labels)
        for t in (5, 8, 10):
            other = change_after(ids, t)
            same_past(routed(dm, other, mask, labels), base, t + 1)
            with dm.method.routing_mode("topk-lookahead"):
                assert dm.method.eval_routing() == "topk-lookahead"
                a, b = forward(dm, ids, mask, labels), forward(dm, other, mask, labels)
            lookahead_moved |= moved(a[:, :t + 1], b[:, :t + 1])
    assert lookahead_moved  # the check can fail: the explicit opt-in does look ahead
    assert dm.method.routing == "auto"


def test_eval_base_model_alone_routes_causally(family):
    """The method left in train mode, the base model put in eval mode by hand: still causal."""
    dm = mod(family, capacity=0.4)
    ids, mask = batch(family, b=2, s=12)
    with dm.method.routing_mode("causal"):
        want = forward(dm, ids, mask)
    with dm.method.routing_mode("topk-lookahead"):
        assert not torch.equal(forward(dm, ids, mask), want)  # the two routings differ on these tokens
    dm.train()
    dm.base_model.eval()
    assert torch.equal(forward(dm, ids, mask), want)


def test_old_topk_name_is_the_lookahead_opt_in(family):
    dm = mod(family)
    dm.method.routing = "topk"
    assert dm.method.routing == "topk-lookahead" and dm.method.eval_routing() == "topk-lookahead"
    dm.method.routing = "causal"
    assert dm.method.eval_routing() == "causal"


def untrained_retrofit(family, **kw):
    """MoD as a retrofit starts: zero routers (every score ties); causal decisions from the router itself."""
    return depthmix.apply(tiny(family), depthmix.MoDConfig(update="retrofit", causal="aux_loss", **kw)).eval()


@pytest.mark.parametrize("routing", ["causal", "topk-lookahead"])
@pytest.mark.parametrize("capacity", [0.5, 0.9])
def test_untrained_retrofit_keeps_the_first_token_dense(family, routing, capacity):
    ids, mask = batch(family, b=3, s=12)
    first = first_real(mask.bool())
    with torch.no_grad():
        dense = tiny(family)(**inputs(ids, mask)).logits
    dm = untrained_retrofit(family, capacity=capacity)
    assert dm.method.config.keeps_first
    with dm.method.routing_mode(routing):
        got = forward(dm, ids, mask)
    torch.testing.assert_close(got[first], dense[first], rtol=0, atol=1e-6)
    assert not torch.equal(got[mask.bool()], dense[mask.bool()])  # other tokens do skip blocks
    if routing == "causal":  # zero routers decide "skip" everywhere: without the rule token 0 skips them too
        off = untrained_retrofit(family, capacity=capacity, keep_first=False)
        assert (off.method.config.keeps_first, depthmix.MoDConfig(update="paper").keeps_first) == (False, False)
        with off.method.routing_mode(routing):
            assert (forward(off, ids, mask)[first] - dense[first]).abs().max() > 1e-3


def test_topk_keeps_the_first_real_token_and_breaks_ties_early(family):
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    valid[2, :6] = False
    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    keep = first_real(valid)
    scores[keep] = -50.0  # the worst score of its row
    scores[~valid] = 100.0
    sel = topk_membership(scores, valid, 0.3, keep)
    assert sel[keep].all() and not (sel & ~valid).any()
    assert sel.sum(1).tolist() == [3, 3, 2]  # capacity unchanged: the first token takes one of the k slots
    tied = topk_membership(torch.zeros(3, 10), valid, 0.5)
    assert tied.nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [0, 4], [1, 3], [1, 4], [1, 5], [1, 6],
                                       [2, 6], [2, 7]]  # ties go to the earlier position


@pytest.mark.parametrize("update", ["paper", "retrofit"])
def test_cached_generate_equals_uncached_with_the_sink(family, update):
    dm = mod(family, update=update, capacity=0.3, keep_first=True)
    ids, mask = batch(family, b=3, s=8)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with torch.no_grad():
        cached = dm.generate(**kw)
        uncached = dm.generate(**kw, use_cache=False)
    assert torch.equal(cached, uncached)


def test_one_token_prompt_decodes_through_every_routed_block(family):
    """A prompt of one token: its step starts every routed block's store, so it must be processed there."""
    dm = untrained_retrofit(family, capacity=0.5, layers=[1, 3])
    ids = torch.tensor([[5]])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
              pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        out = dm.generate(**kw, return_dict_in_generate=True, output_logits=True)
        uncached = dm.generate(**kw, use_cache=False)
        dense = tiny(family)(input_ids=ids).logits[:, 0]
    assert torch.equal(out.sequences, uncached)
    stores = getattr(out, CACHE_ARG).__dict__[KEY]
    assert [stores[i].length.tolist() for i in range(2)] == [[1], [1]]  # the sink, and nothing else (zero routers)
    torch.testing.assert_close(out.logits[0], dense, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_depthmix_eval_records_the_routing(family, tmp_path, monkeypatch):
    tok = load_tokenizer("smollm2-135m")
    model = tiny(family)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    dm = depthmix.apply(model, depthmix.MoDConfig(capacity=0.5)).eval()
    dm.save_pretrained(tmp_path / "adapter", info={"task": "lm/pydoc"})
    monkeypatch.setattr(depthmix.train, "load_trained", lambda *a, **k: (dm, tok, {}))
    args = ["eval", "--adapter", str(tmp_path / "adapter"), "--max-eval-samples", "2", "--max-length", "32"]
    for flags, want in (([], "causal"), (["--routing", "topk-lookahead"], "topk-lookahead")):
        out = tmp_path / f"{want}.json"
        assert main(args + flags + ["--output", str(out)]) == 0
        record = json.loads(out.read_text())
        assert record["routing"] == want and record["metrics"]["tokens"] > 0


@pytest.mark.slow
def test_lm_eval_output_records_the_routing(family, tmp_path, monkeypatch):
    dm = mod(family)
    seen = {}

    def fake_evaluate(model, *a, **k):  # what lm_eval would do: score the model as handed over
        seen["routing"] = model.method.eval_routing()
        return {"results": {"t": {"alias": "t", "acc,none": 0.5}}, "versions": {"t": 1}, "n-shot": {"t": 0},
                "higher_is_better": {"t": {"acc": True}}}

    monkeypatch.setattr(depthmix.train, "load_trained", lambda *a, **k: (dm, None, {}))
    monkeypatch.setattr(harness, "evaluate", fake_evaluate)
    out = tmp_path / "lm-eval.json"
    assert main(["lm-eval", "--adapter", str(tmp_path), "--tasks", "t", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["routing"] == seen["routing"] == "causal"
