"""`depthmix drop` (a block-dropped plain Hugging Face checkpoint) and the attention-drop baseline (issue 25)."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import VOCAB, tiny
from depthmix.cli.main import main
from depthmix.config import ConfigError
from depthmix.tuners.mod.importance import block_influence, drop_attention, drop_blocks, least_important
from test_mod_retrofit import model_dir  # noqa: F401  (a tiny Llama saved with a tokenizer)


def ids(b=2, s=12, seed=3):
    return torch.randint(3, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def test_drop_writes_a_plain_checkpoint_equal_to_the_dropped_model(model_dir, tmp_path):  # noqa: F811
    from depthmix.bench.mod import text_blocks
    from depthmix.models import load_tokenizer
    out = tmp_path / "dropped"
    args = ["drop", "--model", str(model_dir), "--blocks", "2", "--task", "lm/pydoc", "--calib-blocks", "4",
            "--calib-len", "16", "--output-dir", str(out)]
    assert main(args) == 0
    rec = json.loads((out / "depthmix_drop.json").read_text())
    assert rec["blocks_before"] == 4 and rec["blocks_after"] == 2 and 0 not in rec["dropped"]
    # the blocks are the least influential ones on the calibration text
    calib = text_blocks("lm/pydoc", "train", load_tokenizer(str(model_dir)), 16, None, limit=4)
    scores = block_influence(AutoModelForCausalLM.from_pretrained(model_dir).eval(), calib)
    assert rec["influence"] == pytest.approx(scores, abs=1e-5) and rec["dropped"] == least_important(scores, 2)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no depthmix
    ours = drop_blocks(AutoModelForCausalLM.from_pretrained(model_dir).eval(), rec["dropped"])
    assert plain.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.equal(plain(ids()).logits, ours(ids()).logits)
    # an existing folder is never overwritten, and nothing changes in it
    before = sorted(p.name for p in out.iterdir())
    assert main(args) == 2 and sorted(p.name for p in out.iterdir()) == before
    assert main(["drop", "--model", str(model_dir), "--layers", "1,9", "--output-dir", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_attention_drop_removes_the_branch_and_its_compute():
    model = tiny("llama")
    zeroed = tiny("llama")
    with torch.no_grad():
        for i in (1, 3):
            zeroed.model.layers[i].self_attn.o_proj.weight.zero_()  # the same function, computed
    calls = []
    dropped = drop_attention(model, [1, 3])
    for i, block in enumerate(dropped.model.layers):
        block.mlp.register_forward_pre_hook(lambda m, a: calls.append("mlp"))
        if i in (1, 3):
            assert not any(p.numel() for p in block.self_attn.parameters())
    x = ids()
    with torch.no_grad():
        assert torch.allclose(dropped(x).logits, zeroed(x).logits, atol=1e-6)
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(dropped.generate(x[:1], **kw), dropped.generate(x[:1], use_cache=False, **kw))
    assert calls.count("mlp") >= 4  # the MLPs still run
    with pytest.raises(ConfigError, match="plain Hugging Face"):
        dropped.save_pretrained("/nonexistent")
    with pytest.raises(ConfigError, match="block 0"):
        drop_attention(tiny("llama"), [0])
