"""Instruction-tuning tasks: prompt masking, answer extraction, scoring, metrics, file errors, CLI end to end.

A tiny random llama with the real SmolLM2 tokenizer (its vocabulary) stands in for a model."""
import json
import math
import os
from pathlib import Path

import datasets
import pytest
import torch
from torch import nn

from conftest import tiny
from depthmix.data import text
from depthmix.data.tasks import DataError, get_task
from depthmix.evaluation import evaluate, metrics, response_nll, scorers
from depthmix.evaluation.generation import generate
from depthmix.evaluation.loglik import loglik

SHARED = Path(os.environ.get("DEPTHMIX_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture(scope="module")
def tok():
    from depthmix.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def lm(tok):
    model = tiny("llama", layers=2)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def write(root: Path, rel: str, content) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    elif rel.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    else:
        path.write_text(json.dumps(content))
    return path


GSM = [{"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
       {"question": "A pen costs 2 dollars. What do 5 pens cost?", "answer": "2*5=<<2*5=10>>10\n#### 1,0"}]


def choice_rec(answer="answer2"):
    return {"instruction": "Please choose the correct answer to the question: Which is hot?\n\nAnswer1: ice "
                           "Answer2: fire Answer3: snow\n\nAnswer format: answer1/answer2/answer3",
            "input": "", "output": f"the correct answer is {answer}", "answer": answer}


# -- masking and padding ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_prompt_is_masked_out_of_the_loss_and_padding_too(tmp_path, tok):
    write(tmp_path, "gsm8k/train.jsonl", GSM)
    task = get_task("gsm8k")
    rows = task.load("train", str(tmp_path))
    assert rows[0]["target"] == "3+4=7\nThe answer is 7." and rows[1]["answer"] == "10"  # annotations gone
    enc = task.encode(rows, tok, 256)
    for row, e in zip(rows, enc):
        n_prompt = len(tok(row["prompt"])["input_ids"])
        response = tok(row["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert e["labels"][:n_prompt] == [-100] * n_prompt
        assert e["labels"][n_prompt:] == response == e["input_ids"][n_prompt:]
    batch = task.collator(tok)([enc[0], enc[1]])
    short = 0 if len(enc[0]["input_ids"]) < len(enc[1]["input_ids"]) else 1
    n = len(enc[short]["input_ids"])
    assert (batch["labels"][short, n:] == -100).all() and (batch["attention_mask"][short, n:] == 0).all()
    assert (batch["input_ids"][short, n:] == tok.pad_token_id).all()
    assert batch["labels"][short, :n].tolist() == enc[short]["labels"]
    # a prompt that fills max_length leaves nothing to learn: the example is dropped, not trained on as all -100
    assert len(task.encode(rows, tok, 20)) == 0


# -- answer extraction --------------------------------------------------------------------------------------
@pytest.mark.parametrize("out,expected", [
    ("48/2 = 24 clips. The answer is 72.", 72.0), ("It costs $1,234.50 in total", 1234.5),
    ("-3 degrees", -3.0), ("I do not know", None), ("The answer is 5.\n", 5.0)])
def test_number_extraction_takes_the_last_number(out, expected):
    assert metrics.extract_number(out) == expected


@pytest.mark.parametrize("out,expected", [
    ("The answer is (D).", "D"), ("(B) looks right but the answer is (C)", "C"), ("Rationale: x. (E)", "E"),
    ("so B", "B"), ("no idea", None)])
def test_letter_extraction(out, expected):
    assert metrics.extract_letter(out) == expected


def test_numeric_tolerance():
    assert metrics.is_correct(8.0, "8.0", False) and metrics.is_correct(8.0005, "8", False)
    assert not metrics.is_correct(8.01, "8", False) and not metrics.is_correct(None, "8", False)
    assert metrics.is_correct("C", "C", True) and not metrics.is_correct("A", "C", True)


@pytest.mark.slow
def test_arithmetic_accuracy_from_generated_text(tmp_path, tok, monkeypatch):
    write(tmp_path, "reasoning/SVAMP_test.json", [{"instruction": f"q{i}", "input": "", "output": "",
                                                   "answer": a} for i, a in enumerate(["8.0", "3", "1000"])])
    rows = get_task("svamp").load("eval", str(tmp_path))
    monkeypatch.setattr(scorers, "generate", lambda *a, **k: ["so 8", "The answer is 4.", "1,000 apples"])
    assert evaluate(get_task("svamp"), None, tok, rows) == {"accuracy": 2 / 3, "answered": 1.0}


# -- scoring with a model -----------------------------------------------------------------------------------
class Prefers(nn.Module):
    """A causal LM whose logits favour one token everywhere: its preferred option is known."""

    def __init__(self, model, token_id):
        super().__init__()
        self.model, self.token_id = model, token_id

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         logits_to_keep=logits_to_keep)
        out.logits[..., self.token_id] += 20.0
        return out

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


@pytest.mark.slow
def test_loglik_multiple_choice_picks_the_option_the_model_prefers(tmp_path, tok, lm):
    write(tmp_path, "reasoning/ARC-Easy_test.json", [choice_rec("answer3"), choice_rec("answer1")])
    task = get_task("arc-easy")
    rows = task.load("eval", str(tmp_path))
    assert rows[0]["labels"] == ["answer1", "answer2", "answer3"] and rows[0]["texts"][1] == "fire"
    three = tok("3", add_special_tokens=False)["input_ids"]
    assert len(three) == 1
    result = evaluate(task, Prefers(lm, three[0]), tok, rows, batch_size=2, progress=False)
    assert result == {"accuracy": 0.5, "accuracy_norm": 0.5}  # answer3 everywhere: right once, wrong once
    fire = tok("fire", add_special_tokens=False)["input_ids"][0]
    text = evaluate(task, Prefers(lm, fire), tok, rows, batch_size=2, progress=False, mode="loglik-text")
    assert text["accuracy"] == 0.0  # "fire" is answer2, the right answer of neither row


@pytest.mark.slow
def test_loglik_is_independent_of_padding_and_matches_a_plain_forward(tok, lm):
    long = "### Instruction:\nA long question about several apples and pears?\n\n### Response:\n"
    prompts = [long, "Hi", long]  # the options of the first question share a forward pass: last token differs
    conts = ["the correct answer is answer1", "yes", "the correct answer is answer2"]
    batched = loglik(lm, tok, prompts, conts, batch_size=2, progress=False)
    for p, c, (total, n) in zip(prompts, conts, batched):
        ids_p = tok(p)["input_ids"]
        ids_c = tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(lm(torch.tensor([ids_p + ids_c])).logits[0].float(), -1)
        expected = sum(float(logp[len(ids_p) - 1 + j, t]) for j, t in enumerate(ids_c))
        assert n == len(ids_c) and total == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_batched_greedy_generation_matches_one_at_a_time(tok, lm):
    prompts = ["Below is a long instruction with many words in it, to pad the other one.", "Short"]
    together = generate(lm, tok, prompts, batch_size=2, max_new_tokens=4, progress=False)
    alone = [generate(lm, tok, [p], batch_size=1, max_new_tokens=4, progress=False)[0] for p in prompts]
    assert together == alone


@pytest.mark.slow
def test_generate_mode_extracts_the_first_label(tmp_path, tok, monkeypatch):
    write(tmp_path, "reasoning/boolq_test.json", [
        {"instruction": f"Please answer the following question with true or false, question: q{i}?\n\n"
                        "Answer format: true/false", "input": "", "output": "", "answer": a}
        for i, a in enumerate(["true", "false", "false"])])
    rows = get_task("boolq").load("eval", str(tmp_path))
    monkeypatch.setattr(scorers, "generate", lambda *a, **k: ["the correct answer is true", "false, not true", "?"])
    assert evaluate(get_task("boolq"), None, tok, rows, mode="generate") == {"accuracy": 2 / 3, "answered": 2 / 3}


# -- metrics ------------------------------------------------------------------------------------------------
def test_e2e_metrics_on_toy_outputs():
    refs = [["The Eagle is a pub near the river.", "Near the river is a pub called The Eagle."],
            ["Blue Spice serves cheap food."]]
    with pytest.warns(UserWarning) as record:
        perfect = metrics.e2e_metrics([r[0] for r in refs], refs)
        poor = metrics.e2e_metrics(["cats sleep", "dogs bark loudly"], refs)
    assert perfect["bleu"] == pytest.approx(100) and perfect["rouge_l"] == pytest.approx(100)
    assert poor["bleu"] < 5 and poor["rouge_l"] < 10 and perfect["nist"] > poor["nist"]
    for name, needs in [("cider", "pycocoevalcap"), ("meteor", "WordNet")]:  # present exactly when installed
        missing = any(needs in str(w.message) for w in record)
        assert (name in perfect) != missing
        if name in perfect:
            assert perfect[name] > poor[name]


def test_e2e_groups_references_per_meaning_representation(tmp_path):
    write(tmp_path, "e2e/testset_w_refs.csv", 'mr,ref\n"name[A], food[Thai]",A serves Thai food.\n'
                                               '"name[A], food[Thai]",Thai food at A.\nname[B],B it is.\n')
    rows = get_task("e2e").load("eval", str(tmp_path))
    assert len(rows) == 2 and rows[0]["refs"] == ["A serves Thai food.", "Thai food at A."]
    assert "### Input:\nname[A], food[Thai]" in rows[0]["prompt"]


@pytest.mark.slow
def test_perplexity_is_exp_of_the_mean_token_nll(tok, lm):
    task = get_task("lm/pydoc")
    rows = task.load("eval", max_samples=2)
    result = evaluate(task, lm, tok, rows, batch_size=3, max_length=48, progress=False)
    total, count = 0.0, 0
    for block in text.blocks(rows["text"], tok, 48):  # one block at a time: the model's own mean loss
        with torch.no_grad():
            loss = lm(torch.tensor([block]), labels=torch.tensor([block])).loss
        total += float(loss) * (len(block) - 1)
        count += len(block) - 1
    assert result["tokens"] == count and result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    enc = task.encode(rows, tok, 48)
    assert all(len(e["input_ids"]) <= 48 and e["labels"] == e["input_ids"] for e in enc)


# -- files --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel,content,needles", [
    ("gsm8k/test.jsonl", [GSM[0], {"question": "q"}], ["test.jsonl: line 2", "'answer'"]),
    ("gsm8k/test.jsonl", [GSM[0], {"question": "q", "answer": "seven"}], ["line 2", "'answer'", "####"]),
    ("gsm8k/test.jsonl", '{"question": "q", "answer": "#### 1"}\n{"question": \n', ["line 2", "not valid JSON"]),
    ("reasoning/SVAMP_test.json", [{"instruction": "q", "answer": "1"}, {"instruction": "q", "answer": "many"}],
     ["SVAMP_test.json: record 1", "'answer'", "'many'"]),
    ("reasoning/SVAMP_test.json", [{"instruction": "q", "answer": "1"}, {"instruction": ["q"], "answer": "2"}],
     ["record 1", "'instruction'"]),
    ("reasoning/boolq_test.json", [{**choice_rec(), "answer": "maybe"}], ["record 0", "'answer'", "'maybe'"]),
    ("reasoning/boolq_test.json", [{"instruction": "no format line", "answer": "true"}],
     ["record 0", "'instruction'", "Answer format"]),
    ("e2e/testset_w_refs.csv", 'mr,ref\nname[A],A.\nname[B],\n', ["testset_w_refs.csv: line 3", "'ref'"]),
])
def test_malformed_files_name_file_record_and_field(tmp_path, rel, content, needles):
    write(tmp_path, rel, content)
    name = {"gsm8k": "gsm8k", "SVAMP": "svamp", "boolq": "boolq", "testset": "e2e"}
    task = next(v for k, v in name.items() if k in rel)
    with pytest.raises(DataError) as err:
        get_task(task).load("eval", str(tmp_path))
    assert all(n in str(err.value) for n in needles), str(err.value)


def test_missing_files_and_splits_are_explained(tmp_path):
    write(tmp_path, "reasoning/piqa_test.json", [choice_rec()])
    with pytest.raises(DataError, match="only piqa_test.json"):
        get_task("piqa").load("train", str(tmp_path))
    with pytest.raises(DataError, match="math_train.json"):
        get_task("svamp").load("train", str(tmp_path))


def test_hub_records_become_the_same_rows(monkeypatch):
    fake = {
        "openai/gsm8k": [{"question": "q", "answer": "x <<1+1=2>>2\n#### 2"}],
        "google/boolq": [{"question": "is it", "answer": False, "passage": "p"}],
        "allenai/ai2_arc": [{"question": "q", "answerKey": "B", "choices": {"text": ["x", "y"], "label": ["A", "B"]}}],
        "baber/piqa": [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}],
        "ChilleD/SVAMP": [{"Body": "Tom has 3.", "Question": "How many?", "Answer": 3.0}],
        "deepmind/aqua_rat": [{"question": "q", "options": ["A)1", "B)2"], "rationale": "r", "correct": "B"}],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, *a, **k: datasets.Dataset.from_list(fake[repo]))
    monkeypatch.delenv("DEPTHMIX_DATA", raising=False)
    assert get_task("gsm8k").load("eval")[0]["answer"] == "2"
    assert get_task("boolq").load("eval")[0]["answer"] == "false"
    arc = get_task("arc-easy").load("train")[0]
    assert arc["answer"] == "answer2" and arc["texts"] == ["x", "y"]
    assert get_task("piqa").load("train")[0]["answer"] == "solution2"
    assert "Tom has 3. How many?" in get_task("svamp").load("eval")[0]["prompt"]
    assert "Answer Choices: (A) 1 (B) 2" in get_task("aqua").load("eval")[0]["prompt"]
    with pytest.raises(DataError, match="no Hub copy"):
        get_task("addsub").load("eval")


@pytest.mark.skipif(not (SHARED / "gsm8k").is_dir(), reason=f"shared data not found at {SHARED}")
def test_shared_data_loads():
    counts = {("gsm8k", "train"): 7473, ("gsm8k", "eval"): 1319, ("reasoning/math", "train"): 3257,
              ("svamp", "eval"): 1000, ("aqua", "eval"): 254, ("boolq", "train"): 9427,
              ("arc-easy", "eval"): 2376, ("openbookqa", "train"): 4957, ("piqa", "eval"): 1838,
              ("e2e", "train"): 4672, ("e2e", "eval"): 630}
    for (name, split), n in counts.items():
        assert len(get_task(name).load(split, str(SHARED))) == n, (name, split)
    for name in ("lm/tinyshakespeare", "lm/wikitext-2"):
        assert len(get_task(name).load("eval", str(SHARED))) > 10


# -- command line -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_and_eval_from_the_command_line(tmp_path, tok, lm):
    from depthmix.cli.main import main
    model_dir = tmp_path / "tiny"
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data"
    write(data, "gsm8k/test.jsonl", GSM)
    write(data, "reasoning/ARC-Easy_train.json", [choice_rec("answer2"), choice_rec("answer1")] * 4)
    write(data, "reasoning/ARC-Easy_test.json", [choice_rec("answer2"), choice_rec("answer1")])
    out = tmp_path / "run"
    assert main(["train", "--method", "lora", "--model", str(model_dir), "--task", "arc-easy", "--data-dir",
                 str(data), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--max-length", "96",
                 "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and set(metrics["metrics"]) == {"accuracy", "accuracy_norm"}
    assert main(["eval", "--adapter", str(out), "--data-dir", str(data), "--mode", "generate",
                 "--max-new-tokens", "2"]) == 0
    result = json.loads((out / "eval-arc-easy.json").read_text())
    assert result["examples"] == 2 and result["mode"] == "generate" and set(result["metrics"]) == {"accuracy",
                                                                                                 "answered"}
    assert main(["eval", "--adapter", str(out), "--task", "gsm8k", "--data-dir", str(data),
                 "--max-new-tokens", "2"]) == 0
    assert json.loads((out / "eval-gsm8k.json").read_text())["examples"] == 2


def test_a_max_length_that_drops_every_example_is_refused_before_the_model_loads(tmp_path, tok, lm, monkeypatch,
                                                                              capsys):
    from depthmix.cli.main import main
    from depthmix.train import trainer
    model_dir = tmp_path / "tiny"
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    write(tmp_path / "data", "gsm8k/train.jsonl", GSM)
    write(tmp_path / "data", "gsm8k/test.jsonl", GSM)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the options were refused")
    monkeypatch.setattr(trainer, "build_model", no_model)
    assert main(["train", "--method", "lora", "--model", str(model_dir), "--task", "gsm8k", "--data-dir",
                 str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--max-length", "16",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--max-length 16: none of the 2 training examples of gsm8k" in err and "raise --max-length" in err
    assert not any((tmp_path / "run" / f).exists() for f in ("adapter_model.safetensors", "metrics.json"))


@pytest.mark.slow
def test_mode_routing_weights_are_drawn_from_the_command_line(tmp_path, tok, lm):
    from depthmix.cli.main import main
    model_dir = tmp_path / "tiny"
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "data"
    write(data, "reasoning/ARC-Easy_train.json", [choice_rec("answer2"), choice_rec("answer1")] * 4)
    write(data, "reasoning/ARC-Easy_test.json", [choice_rec("answer2"), choice_rec("answer1")])
    out = tmp_path / "run"
    assert main(["train", "--method", "mode", "--num-layers", "2", "--model", str(model_dir), "--task", "arc-easy",
                 "--data-dir", str(data), "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--max-length", "96", "--no-progress"]) == 0
    assert main(["plot", "routing", str(out), "--data-dir", str(data)]) == 0
    record = json.loads((out / "routing-arc-easy.json").read_text())
    assert record["method"] == "mode" and len(record["layers"]) == 2 and record["tokens"] > 0
    assert abs(sum(record["mean_weights"]) - 1) < 1e-6
    assert (out / "routing-arc-easy.png").stat().st_size > 1000


@pytest.mark.slow
def test_response_nll_is_the_mean_over_response_tokens_of_all_batches(tmp_path, tok, lm):
    import torch.nn.functional as F
    write(tmp_path, "gsm8k/train.jsonl", GSM)
    task = get_task("gsm8k")
    rows = task.load("train", str(tmp_path))
    got = response_nll(task, lm, tok, rows, 256, batch_size=1)  # one row per batch: the mean must weigh tokens
    total = count = 0
    for e in task.encode(rows, tok, 256):
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        logits = lm(input_ids=ids).logits[0, :-1]
        keep = labels[0, 1:] != -100
        total += float(F.cross_entropy(logits[keep], labels[0, 1:][keep], reduction="sum"))
        count += int(keep.sum())
    assert got["tokens"] == count and got["rows"] == len(rows)
    assert abs(got["gold_nll"] - total / count) < 1e-4
    with pytest.raises(ValueError, match="gsm8k: no response token to score in 2 rows at max_length=16"):
        response_nll(task, lm, tok, rows, 16)  # not a perfect 0.0
