"""Layering, as torchtune keeps it: method code, the model wrapper and the architecture registry import nothing from
the command line, the trainer or the benchmarks; the benchmarks import nothing from the command line; data/ imports no
scoring (evaluation/) and no recipe."""
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "depthmix"
RULES = {  # files -> packages they must not import
    "tuners": ("cli", "train", "bench"), "depthmix_model.py": ("cli", "train", "bench"),
    "architectures.py": ("cli", "train", "bench"),
    "blocks.py": ("cli", "train", "bench"), "bench": ("cli",), "evaluation": ("cli", "bench", "train"),
    "data": ("cli", "bench", "train", "evaluation"),
}


def files(entry):
    path = SRC / entry
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


@pytest.mark.parametrize("entry", list(RULES))
def test_lower_layers_do_not_import_higher_ones(entry):
    bad = []
    for file in files(entry):
        for line in file.read_text().splitlines():
            m = re.match(r"\s*from (\.+|depthmix\.)(\w+)", line)
            if m and m.group(2) in RULES[entry]:
                bad.append(f"{file.relative_to(SRC)}: {line.strip()}")
    assert bad == []
