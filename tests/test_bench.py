import json

from conftest import tiny
from depthmix.cli.main import main


def test_bench_molex_prints_ratios_last(tmp_path, capsys):
    tiny("llama").save_pretrained(tmp_path / "model")
    assert main(["bench", "molex", "--json", "--model", str(tmp_path / "model"), "--batch-size", "2",
                 "--seq-len", "16", "--repeats", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "molex" and result["model"] == str(tmp_path / "model")
    # MoLEx runs at most two blocks per layer: between 1x and 2x the FLOPs of LoRA alone
    assert 1.0 < result["flop_ratio"] <= 2.0
    assert result["step_time_ratio"] > 0 and result["peak_mem_ratio"] > 0
    assert isinstance(result["target_met"], bool)


def test_bench_mode_prints_ratios_last(tmp_path, capsys):
    tiny("llama").save_pretrained(tmp_path / "model")
    assert main(["bench", "mode", "--json", "--model", str(tmp_path / "model"), "--batch-size", "2",
                 "--seq-len", "16", "--repeats", "2", "--num-layers", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "mode" and result["model"] == str(tmp_path / "model")
    assert result["trainable_params"]["mode+lora"] > result["trainable_params"]["lora"] > 0
    assert result["trainable_params_ratio"] > 1 and result["step_time_ratio"] > 0 and result["peak_mem_ratio"] > 0
    assert isinstance(result["targets_met"], bool)
