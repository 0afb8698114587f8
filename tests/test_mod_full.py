"""Top-k routing of a batch known to have no padding: fewer operations, the same slots and numbers."""
import torch

import depthmix
from conftest import VOCAB, tiny
from depthmix.tuners.mod.layer import first_real, membership, topk_slots


def test_topk_slots_knowing_no_row_is_padded_picks_the_same_slots():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 37, generator=g)
    scores[:, 5] = scores[:, 6]  # a tie: the earlier position wins on both paths
    valid = torch.ones(4, 37, dtype=torch.bool)
    first = first_real(valid)
    for capacity in (0.1, 0.5, 1.0):
        general = topk_slots(scores, valid, capacity, first)
        full = topk_slots(scores, valid, capacity, first, full=True)
        assert torch.equal(general[0], full[0]) and torch.equal(general[1], full[1]) and general[2] == full[2]
        assert torch.equal(membership(*general, valid), membership(*full, valid, full=True))


def test_an_unpadded_batch_takes_the_short_path_and_gets_the_same_logits_and_gradients(monkeypatch):
    """A batch without padding (known on the host) skips the padding masks of top-k routing: same numbers."""
    from depthmix.tuners.mod import MoD
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))

    def run():
        torch.manual_seed(0)
        dm = depthmix.apply(tiny("llama"), depthmix.MoDConfig(capacity=0.3, layers=[1, 3], update="paper")).train()
        out = dm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        return dm, out.logits.detach(), dm.method.routers[0].weight.grad.clone()

    dm, logits, grad = run()
    assert dm.method._full
    begin = MoD.begin
    monkeypatch.setattr(MoD, "begin", lambda self, inputs: (begin(self, inputs), setattr(self, "_full", False))[0])
    dm, logits_general, grad_general = run()
    assert not dm.method._full
    assert torch.equal(logits, logits_general) and torch.equal(grad, grad_general)
