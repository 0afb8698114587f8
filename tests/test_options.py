"""Options are declared once: help, types and flags come from the dataclass fields; bad values are refused."""
import dataclasses
import inspect

import pytest

from depthmix.cli.main import main
from depthmix.config import ConfigError, MethodConfig
from depthmix.train.options import TrainOptions, load_options_file
from depthmix.train.pretrain import PretrainOptions
from depthmix.tuners import METHODS, MoDConfig, MoDEConfig, MoLExConfig, register
from depthmix.tuners.base import Method


def run(capsys, *argv):
    """(exit code, stderr) of `depthmix ...` run in this process; argparse's own errors exit through SystemExit."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


OPTION_CLASSES = [TrainOptions, PretrainOptions, *(cfg for cfg, _ in METHODS.values())]


@pytest.mark.parametrize("cls", OPTION_CLASSES, ids=lambda c: c.__name__)
def test_every_option_has_its_help_in_its_field(cls):
    bare = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help", "").strip()]
    assert bare == []
    doc = inspect.getdoc(cls) or ""
    assert [f.name for f in dataclasses.fields(cls) if f"\n{f.name}: " in doc] == []  # not written twice


def test_flag_help_is_the_field_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no line breaks inside words (sub-layer)
    with pytest.raises(SystemExit):
        main(["flops", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("capacity", "layers", "causal", "skip"):  # MoD's flags of `flops` come from MoDConfig
        field = next(f for f in dataclasses.fields(MoDConfig) if f.name == name)
        assert " ".join(field.metadata["help"].split()) in text


def test_a_method_field_named_like_a_training_option_is_refused_when_it_registers():
    @dataclasses.dataclass
    class ClashConfig(MethodConfig):
        method = "clash"
        lr: float = dataclasses.field(default=0.1, metadata={"help": "a learning rate of its own"})

    with pytest.raises(ConfigError, match=r"ClashConfig: field\(s\) \['lr'\] are also options of TrainOptions"):
        register(ClashConfig, Method)
    assert "clash" not in METHODS


@pytest.mark.parametrize("make, says", [
    (lambda: MoDEConfig(temperature=1e-200), "MoDEConfig.temperature = 1e-200: expected a number in [0.01, 100]"),
    (lambda: MoDEConfig(temperature=1e200), "MoDEConfig.temperature = 1e+200: expected a number in [0.01, 100]"),
    (lambda: MoDEConfig(distill_weight=1e308), "MoDEConfig.distill_weight = 1e+308: expected a number in [0, 100]"),
    (lambda: MoDConfig(aux_weight=1e308), "MoDConfig.aux_weight = 1e+308: expected a number in [0, 100]"),
    (lambda: MoLExConfig(balance_weight=1e308), "MoLExConfig.balance_weight = 1e+308: expected a number in [0, 100]"),
    (lambda: MoLExConfig(alpha=True), "MoLExConfig.alpha = True: expected a number"),
    (lambda: MoLExConfig(balance_weight=True), "MoLExConfig.balance_weight = True: expected a number"),
    (lambda: MoDConfig(capacity=True), "MoDConfig.capacity = True: expected a number"),
    (lambda: MoDConfig(keep_first="yes"), "MoDConfig.keep_first = 'yes': expected true or false"),
    (lambda: MoDEConfig(num_layers=3.0), "MoDEConfig.num_layers = 3.0: expected an integer"),
])
def test_extreme_and_boolean_values_are_refused(make, says):
    with pytest.raises(ConfigError) as e:
        make()
    assert str(e.value).startswith(says)


def test_the_bounds_themselves_are_accepted():
    assert MoDEConfig(temperature=0.01, distill_weight=100).temperature == 0.01
    assert MoLExConfig(balance_weight=100, alpha=1e-3).balance_weight == 100
    assert MoDConfig(aux_weight=0, capacity="0.5").capacity == 0.5  # YAML 1.1 reads 5e-1 as a string


@pytest.mark.parametrize("name, text", [
    ("train.yaml", "lr: 0.1\nseed: 1\nlr: 0.2\n"),
    ("train.json", '{"lr": 0.1, "seed": 1, "lr": 0.2}'),
    ("nested.yaml", "method: mod\nmethod_config:\n  capacity: 0.5\n  capacity: 0.25\n"),
])
def test_a_config_file_with_a_duplicated_key_is_refused_naming_it(tmp_path, capsys, name, text):
    cfg = tmp_path / name
    cfg.write_text(text)
    key = "capacity" if "capacity" in text else "lr"
    with pytest.raises(ConfigError, match=f"^{cfg}: (line \\d+: )?key '{key}' is given twice"):
        load_options_file(cfg)
    code, err = run(capsys, "train", "--config", cfg, "--output-dir", tmp_path / "out")
    assert code == 2 and f"key '{key}' is given twice" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, says", [
    (("train", "--seed", "-1"), "seed = -1: expected an integer in [0, 2**32 - 1]"),
    (("train", "--seed", str(2**32)), "seed = 4294967296: expected an integer in [0, 2**32 - 1]"),
    (("flops", "--seq-len", "0"), "argument --seq-len: 0: expected an integer >= 1"),
    (("flops", "--batch-size", "-2"), "argument --batch-size: -2: expected an integer >= 1"),
    (("bench", "mod", "--budget", "-1"), "argument --budget: -1: expected a number >= 0"),
    (("bench", "molex", "--repeats", "0"), "argument --repeats: 0: expected an integer >= 1"),
    (("flops", "--capacity", "2"), "MoDConfig.capacity = 2.0: expected a number in (0, 1]"),
])
def test_bad_numbers_on_the_command_line_are_one_line_usage_errors(tmp_path, capsys, argv, says):
    code, err = run(capsys, *argv, *(("--output-dir", tmp_path / "out") if argv[0] == "train" else ()))
    *usage, last = err.strip().splitlines()  # argparse prints its usage first
    assert code == 2 and last.startswith(f"depthmix {' '.join(argv[:2 if argv[0] == 'bench' else 1])}: error: ")
    assert says in last and all(line.startswith(("usage: ", " ")) for line in usage)
