"""data/ holds datasets, formatting, tokenisation and task definitions; scoring a model lives in evaluation/. The task
registry is filled by importing depthmix.data, and a task module that fails to import fails loudly."""
import ast
import subprocess
import sys
from pathlib import Path

from depthmix.data import TASKS
from depthmix.evaluation import SCORERS

DATA = Path(__file__).resolve().parents[1] / "src" / "depthmix" / "data"
RUNS_A_MODEL = {"generate", "log_softmax", "cross_entropy", "no_grad", "evaluating", "device_of"}


def scoring_in(file: Path) -> list[str]:
    """What in a source file runs or scores a model: a function taking a model, a call of generate / log-softmax /
    cross-entropy / no_grad / eval mode, an import of the evaluation package."""
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [a.arg for a in node.args.args + node.args.kwonlyargs]
            if "model" in names:
                found.append(f"{node.name}() takes a model (line {node.lineno})")
        elif isinstance(node, ast.Attribute) and node.attr in RUNS_A_MODEL:
            found.append(f".{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.Name) and node.id in RUNS_A_MODEL:
            found.append(f"{node.id} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and "evaluation" in (node.module or ""):
            found.append(f"imports {node.module} (line {node.lineno})")
    return found


def test_no_module_in_data_runs_or_scores_a_model():
    bad = {str(f.relative_to(DATA)): s for f in sorted(DATA.rglob("*.py")) if (s := scoring_in(f))}
    assert bad == {}


def test_the_check_finds_scoring_code(tmp_path):
    """The check above can fail: the scoring that used to live in data/ would be caught."""
    sample = tmp_path / "scoring.py"
    sample.write_text("import torch\nfrom ..evaluation import loglik\n\n@torch.no_grad()\n"
                      "def predict(self, model, rows):\n    return model.generate(rows)\n")
    found = scoring_in(sample)
    assert len(found) == 4 and "predict() takes a model (line 5)" in found


def test_every_task_names_a_known_scorer_and_scores_nothing_itself():
    assert len(TASKS) >= 25  # GLUE, pydoc/topics, the instruction tasks and the plain-text ones, all registered
    for task in TASKS.values():
        assert task.scorer in SCORERS, task.name
        assert not any(hasattr(task, a) for a in ("evaluate", "predict", "response_nll")), task.name


def test_a_task_module_that_fails_to_import_raises_instead_of_vanishing():
    """A typo in one task module must not make its tasks disappear from the registry (a KeyError much later)."""
    code = (
        "import importlib.abc, sys\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'depthmix.data.instruct.choice':\n"
        "            raise ImportError('cannot import name typo from depthmix.data.instruct.common')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "from depthmix.data import get_task\n"
        "print(get_task('gsm8k').name)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "gsm8k" not in proc.stdout
    assert "ImportError: cannot import name typo" in proc.stderr
