"""lm-evaluation-harness on a depthmix model, offline: a tiny local task (YAML + jsonl) on a tiny random llama."""
import copy
import json

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM

import depthmix
from depthmix.evaluation.lm_eval import evaluate

pytestmark = pytest.mark.slow

DOCS = [{"question": "The sky is", "choices": ["blue", "green", "made of cheese"], "label": 0, "answer": "blue"},
        {"question": "Two plus two is", "choices": ["four", "five"], "label": 0, "answer": "four"},
        {"question": "Fire is", "choices": ["cold", "hot"], "label": 1, "answer": "hot"}]
MC = """task: depthmix_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
GEN = """task: depthmix_toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tok():
    from depthmix.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def models(tok):
    """(plain llama, the same llama with a non-zero LoRA adapter) of the tokenizer's vocabulary."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    plain = LlamaForCausalLM(cfg).eval()
    dm = depthmix.apply(copy.deepcopy(plain), None, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return plain, dm.eval()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    data = root / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "toy_mc.yaml").write_text(MC.format(data=data))
    (root / "toy_gen.yaml").write_text(GEN.format(data=data))
    return root


def lm_eval_loglik(model, tok, context, continuation):
    """log p(continuation | context) the way lm_eval encodes a pair (whole string, split after the context)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_multiple_choice_scores_come_from_the_depthmix_model(models, tok, task_dir):
    plain, dm = models
    out = evaluate(dm, tok, ["depthmix_toy_mc"], include_path=str(task_dir), batch_size=2, log_samples=True)
    acc = out["results"]["depthmix_toy_mc"]["acc,none"]
    samples = out["samples"]["depthmix_toy_mc"]
    assert len(samples) == 3
    correct = 0
    for s in samples:
        doc = s["doc"]
        got = [float(r[0][0]) for r in s["resps"]]
        want = [lm_eval_loglik(dm, tok, doc["question"], " " + c) for c in doc["choices"]]
        base = [lm_eval_loglik(plain, tok, doc["question"], " " + c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-3)  # the adapter is applied...
        assert got != pytest.approx(base, abs=1e-3)  # ...and it matters
        correct += max(range(len(want)), key=want.__getitem__) == doc["label"]
    assert acc == pytest.approx(correct / 3)


def test_generation_task_runs_through_generate(models, tok, task_dir):
    out = evaluate(models[1], tok, ["depthmix_toy_gen"], include_path=str(task_dir), batch_size=3, log_samples=True)
    assert "exact_match,none" in out["results"]["depthmix_toy_gen"]
    assert all(isinstance(s["resps"][0][0], str) for s in out["samples"]["depthmix_toy_gen"])


def test_command_line(models, tok, task_dir, tmp_path):
    from depthmix.cli.main import main
    plain, dm = models
    base_dir, adapter = tmp_path / "base", tmp_path / "adapter"
    plain.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    dm.save_pretrained(adapter, info={"base_model": str(base_dir)})
    assert main(["lm-eval", "--adapter", str(adapter), "--tasks", "depthmix_toy_mc", "--include-path",
                 str(task_dir), "--batch-size", "4"]) == 0
    result = json.loads((adapter / "lm-eval.json").read_text())
    direct = evaluate(dm, tok, ["depthmix_toy_mc"], include_path=str(task_dir))
    assert result["results"]["depthmix_toy_mc"]["acc,none"] == direct["results"]["depthmix_toy_mc"]["acc,none"]
    assert main(["lm-eval", "--tasks", "x"]) == 2  # neither --adapter nor --model
