"""Renamed method options: MoLEx's `routing` is `granularity`, MoDE's `router` is `mixing` (the word routing is
left to MoD's runtime mode). Adapters, config files and run records written with the old names still load; the
old names are no flags."""
import json
import re

import pytest
import torch

import depthmix
from conftest import batch, tiny
from depthmix.cli.main import build_parser, main
from depthmix.cli.train import train_options
from depthmix.depthmix_model import CONFIG_NAME
from depthmix.train.runs import RUN_NAME, check_same_run, recorded_options

# (config class, old name, new name, a value other than the default)
RENAMED = [(depthmix.MoLExConfig, "routing", "granularity", "token"),
           (depthmix.MoDEConfig, "router", "mixing", "static")]


@pytest.mark.parametrize("cls,old,new,value", RENAMED)
def test_the_old_name_loads_as_the_new_one(cls, old, new, value):
    assert cls.renamed == {old: new}
    cfg = cls.from_dict({old: value})
    assert getattr(cfg, new) == value and old not in cfg.to_dict()
    assert cfg == cls.from_dict(cfg.to_dict())
    assert cls.from_dict({old: value, new: value}) == cls(**{new: value})  # both names, the same value: fine


@pytest.mark.parametrize("cls,old,new,value", RENAMED)
def test_the_old_and_new_name_with_different_values_are_refused_naming_both(cls, old, new, value):
    default = getattr(cls(), new)
    assert default != value
    with pytest.raises(depthmix.ConfigError, match=rf"some.json: {cls.__name__} given both '{old}' = '{value}' "
                                                   rf"\(the old name of '{new}'\) and '{new}' = '{default}'"):
        cls.from_dict({old: value, new: default}, source="some.json")


@pytest.mark.parametrize("cls,old,new,value", RENAMED)
def test_the_old_name_is_no_constructor_argument(cls, old, new, value):
    with pytest.raises(TypeError, match=old):
        cls(**{old: value})


@pytest.mark.parametrize("cls,old,new,value", RENAMED)
def test_an_adapter_saved_with_the_old_name_loads_the_same_config_and_outputs(cls, old, new, value, tmp_path):
    cfg = cls(**{new: value})
    dm = depthmix.apply(tiny("llama"), cfg).eval()
    with torch.no_grad():  # non-initial method weights, so that a weight not loaded would show
        for p in dm.method.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    dm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["config"] = {(old if k == new else k): v for k, v in meta["config"].items()}  # as an older depthmix wrote it
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))

    again = depthmix.DepthMixModel.from_pretrained(tiny("llama"), tmp_path).eval()
    assert again.method_config == cfg
    ids, mask = batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).logits,
                                   dm(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)

    meta["config"][new] = getattr(cls(), new)  # both names, disagreeing: refused, naming the file
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(depthmix.ConfigError, match=re.escape(str(tmp_path / CONFIG_NAME)) + f".*'{old}'.*'{new}'"):
        depthmix.DepthMixModel.from_pretrained(tiny("llama"), tmp_path)


@pytest.mark.parametrize("cls,old,new,value", RENAMED)
def test_a_config_file_with_the_old_name_loads_and_a_flag_overrides_it(cls, old, new, value, tmp_path):
    file = tmp_path / "train.yaml"
    file.write_text(f"method: {cls.method}\nmethod_config:\n  {old}: {value}\n")
    opts = train_options(build_parser().parse_args(["train", "--config", str(file)]))
    assert cls.from_dict(opts.method_config) == cls(**{new: value})
    default = getattr(cls(), new)
    opts = train_options(build_parser().parse_args(["train", "--config", str(file), f"--{new}", default]))
    assert opts.method_config == {new: default}  # file, then flags, as for every option


def test_the_new_flags_are_in_train_help_and_the_old_ones_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "--granularity GRANULARITY" in text and "--mixing MIXING" in text
    assert not re.search(r"--routing\b|--router\b(?!-)", text)
    for method, old, value in (("molex", "--routing", "token"), ("mode", "--router", "static")):
        with pytest.raises(SystemExit) as exit:
            main(["train", "--method", method, old, value, "--output-dir", str(tmp_path / method)])
        assert exit.value.code == 2
        assert old in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_recorded_with_the_old_name_resumes_under_the_new_one(tmp_path):
    old = {"method": "molex", "model": "minilm-l6", "method_config": {"alpha": 0.7, "routing": "token"}}
    (tmp_path / RUN_NAME).write_text(json.dumps({"options": old}))
    assert recorded_options(tmp_path)["method_config"] == {"alpha": 0.7, "granularity": "token"}
    same = {"options": {**old, "method_config": {"alpha": 0.7, "granularity": "token"}}}
    check_same_run(tmp_path, same)  # not a change
    changed = {"options": {**old, "method_config": {"alpha": 0.7, "granularity": "sequence"}}}
    with pytest.raises(depthmix.ConfigError, match="molex option granularity was 'token', now 'sequence'"):
        check_same_run(tmp_path, changed)
