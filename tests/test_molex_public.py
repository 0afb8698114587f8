"""MoLEx as the authors' public code runs it (batch vote, cosine gate) and the fixed layer-pair control."""
import pytest
import torch

import depthmix
from conftest import CAUSAL, batch, tiny
from test_molex import inputs, labels_for


def public(family, **kw):
    dm = depthmix.apply(tiny(family), depthmix.MoLExConfig(**kw))
    with torch.no_grad():
        for name, p in dm.method.gates.named_parameters():  # spread the gates (no bias: the tokens decide)
            p.zero_() if name.endswith("bias") else p.normal_(0, 3.0)
    return dm.eval()


def test_batch_vote_is_the_mode_over_every_position_padding_included(family):
    dm = public(family, granularity="batch", gate_grad="balance", balance_weight=0.01, gate="linear")
    ids, mask = batch(family, b=6, s=10)
    seen = {}
    gate = dm.method.gates[0]
    hook = gate.register_forward_hook(lambda m, a, out: seen.setdefault("logits", out))
    dm.method.recording = True
    with torch.no_grad():
        full = dm(**inputs(family, ids, mask)).logits
    hook.remove()
    want = torch.mode(seen["logits"].argmax(-1).flatten()).values  # padding positions vote too
    assert dm.method.counts[0, want] == len(ids) and dm.method.counts[0].sum() == len(ids)
    # so a sequence's output depends on the batch it sits in (this is why it is not the default): two sequences
    # that vote for different experts alone share one expert in a batch, so at least one of them changes
    alone, first = [], []
    for i in range(len(ids)):
        keep = mask[i].bool()
        dm.method.reset_stats()
        with torch.no_grad():
            alone.append(dm(**inputs(family, ids[i, keep][None], mask[i, keep][None])).logits[0])
        first.append(dm.method.counts.argmax(1).tolist())
    pair = next((a, b) for a in range(len(ids)) for b in range(a) if first[a] != first[b])
    moved = [not torch.allclose(full[i][mask[i].bool()] if full.dim() == 3 else full[i], alone[i], atol=1e-5)
             for i in pair]
    assert any(moved)


def test_batch_vote_gate_trains_from_the_balance_loss_only():
    with pytest.raises(depthmix.ConfigError, match="granularity.*balance"):
        depthmix.MoLExConfig(granularity="batch")
    dm = public("bert", granularity="batch", gate_grad="balance", balance_weight=0.01).train()
    ids, mask = batch("bert")
    dm(**inputs("bert", ids, mask)).logits.pow(2).mean().backward()
    assert all(p.grad is None for p in dm.method.gates.parameters())
    dm(**inputs("bert", ids, mask), labels=labels_for("bert", ids, mask)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dm.method.gates.parameters())


@pytest.mark.parametrize("family", CAUSAL)
def test_batch_vote_in_generate_is_the_prompts_cached_or_not(family):
    """In generate() the batch votes over its prompt (padding included) and the choice holds, so cached decoding
    and a full recompute agree; a plain forward over prompt and answer votes over every position."""
    dm = public(family, granularity="batch", gate_grad="frozen")
    ids, mask = batch(family, b=3, s=7)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    dm.method.recording = True
    with torch.no_grad():
        cached = dm.generate(input_ids=ids, attention_mask=mask, **kw)
        prompt_votes = dm.method.counts.clone()
        dm.method.reset_stats()
        full = dm.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached, full)
    assert torch.equal(dm.method.counts.argmax(1), prompt_votes.argmax(1))  # the same expert at every layer


def test_cosine_gate_learns_and_round_trips(family, tmp_path):
    dm = public(family, gate="cosine").train()
    names = {n for n, p in dm.named_parameters() if n.startswith("method.gates.0.")}
    assert names == {"method.gates.0.proj.weight", "method.gates.0.embeddings", "method.gates.0.log_temperature"}
    ids, mask = batch(family)
    dm(**inputs(family, ids, mask), labels=labels_for(family, ids, mask)).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dm.method.gates[0].parameters())
    dm.eval()
    with torch.no_grad():
        before = dm(**inputs(family, ids, mask)).logits
    dm.save_pretrained(tmp_path)
    again = depthmix.DepthMixModel.from_pretrained(tiny(family), tmp_path)
    with torch.no_grad():
        assert torch.equal(before, again(**inputs(family, ids, mask)).logits)


def test_pair_control_mixes_each_layer_with_its_fixed_layer(family, tmp_path):
    dm = public(family, gate="pair", alpha=0.5, learn_alpha=False)
    assert len(dm.method.gates) == 0 and dm.method.pairs == [1, 2, 3, 2]
    assert not any(n.startswith("method.") for n, p in dm.named_parameters() if p.requires_grad)
    ids, mask = batch(family)
    dm.method.recording = True
    with torch.no_grad():
        before = dm(**inputs(family, ids, mask)).logits
    for i, j in enumerate(dm.method.pairs):
        assert dm.method.counts[i, j] == len(ids) and dm.method.counts[i].sum() == len(ids)
    explicit = public(family, gate="pair", pairs=[1, 2, 3, 2], alpha=0.5, learn_alpha=False)
    with torch.no_grad():
        assert torch.equal(before, explicit(**inputs(family, ids, mask)).logits)
    dm.save_pretrained(tmp_path)
    again = depthmix.DepthMixModel.from_pretrained(tiny(family), tmp_path)
    with torch.no_grad():
        assert torch.equal(before, again(**inputs(family, ids, mask)).logits)


def test_bad_pairs_are_named():
    with pytest.raises(depthmix.ConfigError, match="pairs"):
        depthmix.MoLExConfig(gate="pair", pairs=[])
    with pytest.raises(depthmix.ConfigError, match="pairs.*one layer index below 4 for each of the 4"):
        depthmix.apply(tiny("llama"), depthmix.MoLExConfig(gate="pair", pairs=[1, 2]))
    with pytest.raises(depthmix.ConfigError, match="balance_weight.*pair"):
        depthmix.MoLExConfig(gate="pair", balance_weight=0.01)
    with pytest.raises(depthmix.ConfigError, match="gate"):
        depthmix.MoLExConfig(gate="softmax")


def test_public_cosine_gate_settings_and_its_sequence_normalisation():
    """The public SST-2 gate (proj_dim 128, temperature from 0.5) normalises each projected feature over the
    positions of its sequence, so a token's gate logits move when a later token changes; the default cosine gate
    (a per-token cosine similarity) does not."""
    config = dict(granularity="batch", gate_grad="balance", balance_weight=0.01, gate="cosine", shared_gate=True,
                  gate_dim=128, gate_temperature=0.5, gate_norm="sequence")
    fresh = depthmix.apply(tiny("bert"), depthmix.MoLExConfig(**config)).method.gates[0]
    assert fresh.log_temperature.exp().item() == pytest.approx(0.5)
    dm = public("bert", **config)
    gate = dm.method.gates[0]
    assert gate.proj.out_features == 128 and gate.embeddings.shape[1] == 128
    z = torch.randn(2, 6, dm.config.hidden_size)
    later = z.clone()
    later[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(gate(z)[:, 0], gate(later)[:, 0])
        token = public("bert", gate="cosine").method.gates[0]
        torch.testing.assert_close(token(z)[:, 0], token(later)[:, 0])
    with pytest.raises(depthmix.ConfigError, match="gate_norm.*batch"):
        depthmix.MoLExConfig(gate="cosine", gate_norm="sequence")
    with pytest.raises(depthmix.ConfigError, match="gate_dim"):
        depthmix.MoLExConfig(gate="cosine", gate_dim=0)


def test_batch_vote_balance_loss_is_the_public_codes():
    """The public code's balance loss: T * P_j of the voted expert j, P the gate's softmax averaged over every
    position of the batch (padding included), summed over layers and scaled by the balance weight."""
    dm = public("bert", granularity="batch", gate_grad="balance", balance_weight=0.01, gate="linear",
                shared_gate=True).train()
    ids, mask = batch("bert")
    logits = []
    hook = dm.method.gates[0].register_forward_hook(lambda m, a, out: logits.append(out.detach()))
    dm(**inputs("bert", ids, mask))
    hook.remove()
    want = 0.0
    for out in logits:
        probs = out.softmax(-1).flatten(0, 1)
        vote = torch.mode(probs.argmax(-1)).values
        want += 0.01 * probs.shape[-1] * probs.mean(0)[vote]
    assert len(logits) == len(dm.method.layers)
    assert dm.method.aux_loss(torch.zeros(())).item() == pytest.approx(float(want), rel=1e-5)
