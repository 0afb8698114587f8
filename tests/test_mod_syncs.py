"""MoD's training step on an accelerator: no device->host sync beyond the dense model's own."""
import pytest
import torch
from peft import LoraConfig

import depthmix
from conftest import LORA_TARGETS, VOCAB, batch, tiny
from syncs import count_syncs
from test_mod import inputs


def step(dm, b=3, s=12):
    ids, mask = batch("llama", b=b, s=s)
    named = inputs(ids, mask)
    return lambda: dm(**named, labels=ids.masked_fill(mask == 0, -100)).loss.backward()


@pytest.mark.parametrize("skip", ["block", "attention", "mlp"])
@pytest.mark.parametrize("update", ["paper", "retrofit"])
@pytest.mark.parametrize("capacity", [0.3, 1.0])
def test_training_step_adds_no_host_sync_to_the_dense_model(skip, update, capacity):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS["llama"])
    dense = count_syncs(step(depthmix.apply(tiny("llama"), None, lora=lora).train()))
    config = depthmix.MoDConfig(capacity=capacity, layers=[1, 3], skip=skip, update=update)
    dm = depthmix.apply(tiny("llama"), config, lora=lora).train()
    assert count_syncs(step(dm)) - dense == {}
    assert dm.method.stats[:, 0].sum() > 0  # the step did route (statistics kept, on the device)
    state = dm.method.summary()  # read only when asked
    assert 0 < state["realized_capacity"] <= 1


def test_causal_routing_at_inference_may_sync():
    """The counter does see MoD's ops: eval-mode causal routing has data-dependent shapes (allowed there)."""
    dm = depthmix.apply(tiny("llama"), depthmix.MoDConfig(capacity=0.3, layers=[1, 3])).eval()
    ids, mask = batch("llama")
    with torch.no_grad():
        assert count_syncs(lambda: dm(**inputs(ids, mask), use_cache=False))["aten._local_scalar_dense"] > 0


@pytest.mark.parametrize("skip", ["block", "attention"])
def test_a_decoding_step_at_batch_3_reads_nothing_but_its_decisions(skip):
    """Each routed block reads its rows' decisions once (.tolist(): one device->host copy, which this CPU counter
    does not see); the KV stores' lengths, the mask and the rows are known on the host, so nothing else syncs."""
    torch.manual_seed(0)
    prompt = torch.randint(3, VOCAB, (3, 6))
    config = depthmix.MoDConfig(capacity=0.5, layers=[1, 3], skip=skip, update="retrofit")
    dense, dm = tiny("llama"), depthmix.apply(tiny("llama"), config).eval()
    torch.nn.init.normal_(dm.method.predictors[0][-1].bias, 0.0, 1.0)

    def syncs(model, n):
        with torch.no_grad():
            return count_syncs(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                      max_new_tokens=n, min_new_tokens=n, pad_token_id=0))

    def step(model):  # one more decoding step
        more = syncs(model, 5)
        more.subtract(syncs(model, 4))
        return more

    dm.method.reset_stats()
    extra = step(dm)
    extra.subtract(step(dense))
    assert +extra == {} and -extra == {}
    processed, seen = dm.method.stats[:, 0].sum(), dm.method.stats[:, 1].sum()
    assert 0 < processed < seen  # some rows processed their tokens and some did not
