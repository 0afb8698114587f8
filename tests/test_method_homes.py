"""A method's knowledge lives in its folder (src/depthmix/tuners/<method>/); the registry (tuners/__init__.py,
tuners/base.py) and the package's public names (depthmix/__init__.py) list the methods; everything else reaches
them through the registry (METHODS) and the Method contract. So no other module imports a method's package,
names its config or Method class, or spells its name in code (a string such as "mod"). A recipe about one method
(a benchmark of it against its baseline, a command for its studies) is that method's own: bench/<method>.py, or a
module of bench/ or cli/ that says so with `METHOD = "<method>"`; it may name that method, and no other."""
import ast
from pathlib import Path

import pytest

from depthmix.tuners import METHODS

SRC = Path(__file__).resolve().parents[1] / "src" / "depthmix"
NAMES = set(METHODS)
CLASSES = {cls.__name__: name for name, pair in METHODS.items() for cls in pair}
REGISTRY = ("__init__.py", "tuners/__init__.py", "tuners/base.py")
OTHER_WORDS = {  # strings that are the word, not the method: (file, string) -> what it means there
    ("train/trainer.py", "mode"): "task.evaluate's keyword for the evaluation mode (loglik, generate)",
    ("cli/train.py", "mode"): "the same keyword, from `eval --mode`",
}


def own_method(rel: str, tree: ast.Module | None = None) -> str | None:
    """The method whose home `rel` is in, if any."""
    parts = rel.split("/")
    if parts[0] == "tuners" and len(parts) > 2 and parts[1] in NAMES:
        return parts[1]
    if parts[0] == "bench" and Path(parts[-1]).stem in NAMES:
        return Path(parts[-1]).stem
    if parts[0] in ("bench", "cli") and tree is not None:
        for node in tree.body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["METHOD"] \
                    and isinstance(node.value, ast.Constant) and node.value.value in NAMES:
                return node.value.value
    return None


def named_methods(rel: str, tree: ast.AST):
    """(line, method, how) for each place the module names a method."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for part in (node.module or "").split("."):
                if part in NAMES and "tuners" in (node.module or "") or (node.level and part in NAMES):
                    yield node.lineno, part, f"imports from {node.module}"
            for alias in node.names:
                if alias.name in CLASSES:
                    yield node.lineno, CLASSES[alias.name], f"imports {alias.name}"
                if node.module in (None, "tuners", "depthmix.tuners") and alias.name in NAMES:
                    yield node.lineno, alias.name, f"imports the package {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if "tuners" in parts and NAMES & set(parts):
                    yield node.lineno, (NAMES & set(parts)).pop(), f"imports {alias.name}"
        elif isinstance(node, ast.Name) and node.id in CLASSES:
            yield node.lineno, CLASSES[node.id], node.id
        elif isinstance(node, ast.Attribute) and node.attr in CLASSES:
            yield node.lineno, CLASSES[node.attr], node.attr
        elif isinstance(node, ast.Constant) and node.value in NAMES and (rel, node.value) not in OTHER_WORDS:
            yield node.lineno, node.value, repr(node.value)


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel not in REGISTRY:
            yield rel


@pytest.mark.parametrize("rel", list(modules()))
def test_only_a_methods_home_names_it(rel):
    tree = ast.parse((SRC / rel).read_text())
    own = own_method(rel, tree)
    bad = [f"{rel}:{line}: {how}" for line, method, how in named_methods(rel, tree) if method != own]
    assert bad == []


def test_the_rule_sees_what_it_forbids():
    """The checks find each kind of naming they exist for (else the test above would pass on anything)."""
    method = sorted(NAMES)[0]
    config = next(cls.__name__ for cls, _ in [METHODS[method]])
    code = (f"from ..tuners.{method}.config import X\nfrom ..tuners import {config}\nimport depthmix.tuners.{method}\n"
            f"y = {config}()\nz = depthmix.{config}\nif m == {method!r}:\n    pass\n")
    found = [how for _, _, how in named_methods("cli/x.py", ast.parse(code))]
    assert len(found) == 6, found
    assert own_method(f"tuners/{method}/model.py") == own_method(f"bench/{method}.py") == method
    assert own_method("bench/common.py") is None
    declared = ast.parse(f"METHOD = {method!r}\n")
    assert own_method("cli/x.py", declared) == method and own_method("train/x.py", declared) is None
