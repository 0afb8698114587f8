import numpy as np
import pytest

from conftest import shared_data
from depthmix.data import DataError, get_task
from depthmix.evaluation.metrics import glue_metrics


def test_local_glue_sst2_and_rte_load():
    root = shared_data()
    sst2, rte = get_task("glue/sst2"), get_task("glue/rte")
    assert len(sst2.load("train", str(root))) == 67349 and len(sst2.load("eval", str(root))) == 872
    rows = rte.load("eval", str(root / "glue"))  # the glue folder itself works too
    assert len(rows) == 277 and set(rows["label"]) == {0, 1} and rows[0]["text_b"]
    assert len(sst2.load("train", str(root), max_samples=100, seed=3)) == 100


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_bad_label_names_file_line_and_field(tmp_path):
    write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n")
    with pytest.raises(DataError, match=r"train.tsv: line 3: field 'label' has value 'maybe'"):
        get_task("glue/rte").load("train", str(tmp_path))


def test_missing_column_is_named(tmp_path):
    write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tlabel\n0\ta\tentailment\n")
    with pytest.raises(DataError, match=r"dev.tsv: line 1: missing column 'sentence2'"):
        get_task("glue/rte").load("eval", str(tmp_path))


def test_missing_file_and_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHMIX_DATA", str(tmp_path))
    with pytest.raises(DataError, match="no SST-2/train.tsv under"):
        get_task("glue/sst2").load("train")


@pytest.mark.parametrize("char", ["\u2028", "\x0b", "\x85", "\x0c"], ids=["U+2028", "VT", "NEL", "FF"])
def test_rows_with_unicode_line_separators_inside_a_field_load(tmp_path, char):
    """pandas ends a line at \\n and \\r only; the field check must split the file the same way."""
    write(tmp_path / "SST-2" / "dev.tsv", f"sentence\tlabel\nfine{char}film\t1\nbad one\t0\n")
    rows = get_task("glue/sst2").load("eval", str(tmp_path))
    assert rows["text_a"] == [f"fine{char}film", "bad one"] and rows["label"] == [1, 0]
    write(tmp_path / "SST-2" / "train.tsv", f"sentence\tlabel\nfine{char}film\t1\nbad\tone\t0\n")
    with pytest.raises(DataError, match="train.tsv: line 3: 3 fields, but line 1 has 2"):  # still counted right
        get_task("glue/sst2").load("train", str(tmp_path))


def test_headerless_cola_and_regression_stsb(tmp_path):
    write(tmp_path / "CoLA" / "dev.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tBreeze the rode.\n")
    rows = get_task("glue/cola").load("eval", str(tmp_path))
    assert rows["label"] == [1, 0] and rows[1]["text_a"] == "Breeze the rode."
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    write(tmp_path / "STS-B" / "dev.tsv", header + "0\tg\tf\ty\t0\ts\ts\tA man.\tA person.\t4.2\n")
    task = get_task("glue/stsb")
    assert task.num_labels == 1 and task.load("eval", str(tmp_path))["label"] == [pytest.approx(4.2)]
    write(tmp_path / "STS-B" / "train.tsv", header + "0\tg\tf\ty\t0\ts\ts\tA man.\tA person.\thigh\n")
    with pytest.raises(DataError, match="line 2: field 'score' has value 'high'; expected a number"):
        task.load("train", str(tmp_path))


def test_official_metrics():
    preds, labels = np.array([1, 0, 1, 1, 0, 0]), np.array([1, 0, 0, 1, 0, 1])
    m = glue_metrics(["accuracy", "f1", "matthews_correlation"], preds, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["matthews_correlation"] == pytest.approx(1 / 3)
    r = glue_metrics(["pearson", "spearman"], np.array([1.0, 2.0, 3.0, 5.0]), np.array([2.0, 4.0, 6.0, 7.0]))
    assert r["spearman"] == pytest.approx(1.0) and 0.9 < r["pearson"] < 1.0


def test_unknown_task_lists_known_ones():
    with pytest.raises(KeyError, match="glue/sst2"):
        get_task("glue/sst3")
