"""`depthmix eval --layer-lens`: MoDE's premise measured from the command line, on a tiny Llama."""
import json

import pytest

from conftest import shared_data, tiny_lm_folder
from depthmix.cli.main import main

pytestmark = pytest.mark.slow  # trains two adapters end to end


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return tiny_lm_folder(tmp_path_factory.mktemp("lens") / "tiny-llama")


def train(model, out, *flags):
    assert main([str(a) for a in ("train", "--model", model, "--task", "singleeq", "--data-dir", shared_data(),
                                  "--max-train-samples", 8, "--max-eval-samples", 2, "--max-length", 96,
                                  "--eval-max-new-tokens", 4, "--max-steps", 1, "--no-progress", "--output-dir", out,
                                  *flags)]) == 0


def test_eval_layer_lens_of_a_mode_adapter_and_a_lora_one_refused(tiny_lm, tmp_path, capsys):
    train(tiny_lm, tmp_path / "mode", "--method", "mode", "--num-layers", 3)
    assert main(["eval", "--adapter", str(tmp_path / "mode"), "--max-eval-samples", "6", "--max-new-tokens", "2",
                 "--layer-lens", "--output", str(tmp_path / "eval.json")]) == 0
    lens = json.loads((tmp_path / "eval.json").read_text())["layer_lens"]
    assert lens["layers"] == [1, 2, 3] and lens["tokens"] > 0
    assert all(n > 0 for n in lens["nll"]) and lens["right_where_final_wrong"][-1] == 0
    train(tiny_lm, tmp_path / "lora", "--method", "lora")
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "lora"), "--max-eval-samples", "6", "--layer-lens"]) == 2
    assert "--layer-lens" in capsys.readouterr().err and not (tmp_path / "lora" / "eval-singleeq.json").exists()
