import json

import pytest

from conftest import tiny, tiny_lm_folder
from depthmix.cli.main import main


@pytest.mark.slow
def test_bench_molex_prints_ratios_last(tmp_path, capsys):
    tiny("llama").save_pretrained(tmp_path / "model")
    assert main(["bench", "molex", "--json", "--model", str(tmp_path / "model"), "--batch-size", "2",
                 "--seq-len", "16", "--repeats", "2", "--budget", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "molex" and result["model"] == str(tmp_path / "model")
    # MoLEx runs at most two blocks per layer: between 1x and 2x the FLOPs of LoRA alone
    assert 1.0 < result["flop_ratio"] <= 2.0
    assert result["step_time_ratio"] > 0 and result["peak_mem_ratio"] > 0
    assert isinstance(result["target_met"], bool)
    spread = result["step_time_ratio_spread"]  # paired per-round ratios: their median is the reported ratio
    assert spread["n"] >= 2 and spread["median"] == result["step_time_ratio"]
    assert spread["ci95"][0] <= spread["median"] <= spread["ci95"][1] and "rounds" in result["timing"]


@pytest.mark.slow
def test_bench_mode_prints_ratios_last(tmp_path, capsys):
    tiny("llama").save_pretrained(tmp_path / "model")
    assert main(["bench", "mode", "--json", "--model", str(tmp_path / "model"), "--batch-size", "2",
                 "--seq-len", "16", "--repeats", "2", "--budget", "0", "--num-layers", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "mode" and result["model"] == str(tmp_path / "model")
    assert result["trainable_params"]["mode+lora"] > result["trainable_params"]["lora"] > 0
    assert result["trainable_params_ratio"] > 1 and result["step_time_ratio"] > 0 and result["peak_mem_ratio"] > 0
    assert isinstance(result["targets_met"], bool) and "step_time_ratio <= 1.05 * flop_ratio" in result["targets"]
    assert result["step_time_ratio_spread"]["median"] == result["step_time_ratio"]


def test_spread_of_paired_ratios():
    from depthmix.bench.common import spread
    s = spread([float(v) for v in range(1, 21)])
    assert s["median"] == 10.5 and s["iqr"] == [5.75, 15.25] and s["n"] == 20
    assert s["ci95"] == [6.0, 15.0]  # order statistics 6 and 15 of 20 bracket the median with >= 95% confidence


def test_timing_goes_on_until_the_ratio_is_tight_or_the_budget_ends():
    import itertools

    from depthmix.bench.common import interleaved_times
    noisy = itertools.cycle([0.0, 0.02])  # every other call of b is slow: a wide ratio spread that never narrows
    import time
    r = interleaved_times({"a": lambda: None, "b": lambda: time.sleep(next(noisy))}, 3, warmup=0, progress=False,
                          pairs=[("b", "a")], budget_s=0.3)
    assert len(r.seconds["a"]) > 3 and "time budget" in r.stopped
    r = interleaved_times({"a": lambda: time.sleep(0.01), "b": lambda: time.sleep(0.01)}, 3, warmup=0,
                          progress=False, pairs=[("b", "a")], budget_s=5, max_rel_iqr=0.5)
    assert len(r.seconds["a"]) == 3 and "within" in r.stopped


def test_a_round_whose_timed_difference_is_not_positive_measures_nothing():
    # a decoding step is timed as generate(n) - generate(1); noise can make it negative, and a negative speed-up
    # must never be printed: the round is left out and counted, and timing goes on (past the budget) until one counts
    import itertools
    import time

    from depthmix.bench.common import Rounds, interleaved_times
    r = Rounds(["a", "b"])
    r.seconds = {"a": [1.0, 1.0, 1.0], "b": [2.0, -0.5, 3.0]}
    s = r.ratio("b", "a")
    assert s["median"] == 2.5 and s["n"] == 2 and s["dropped"] == 1
    assert r.ratio(lambda t: t["b"] - 5, "a") == {"median": None, "n": 0, "dropped": 3}

    late = itertools.chain([0.0] * 5, itertools.repeat(0.02))  # slow - fast < 0 in the first 5 rounds only
    fns = {"fast": lambda: time.sleep(0.01), "slow": lambda: time.sleep(next(late))}
    t = interleaved_times(fns, 2, warmup=0, progress=False, budget_s=0,
                          pairs=[(lambda rnd: rnd["slow"] - rnd["fast"], "fast")])
    assert len(t.seconds["fast"]) == 6 and "5 rounds without a positive time left out" in t.stopped
    assert t.ratio(lambda rnd: rnd["slow"] - rnd["fast"], "fast")["median"] > 0
    with pytest.raises(RuntimeError, match="could not time .* no round gave a positive time"):
        interleaved_times({"a": lambda: None}, 2, warmup=0, progress=False, budget_s=0,
                          pairs=[(lambda rnd: -1.0, "a")])


@pytest.mark.slow
def test_bench_mod_prints_ratios_last_with_causal_forward(tmp_path, capsys):
    tiny_lm_folder(tmp_path / "model")
    assert main(["bench", "mod", "--json", "--model", str(tmp_path / "model"), "--task", "lm/pydoc",
                 "--batch-size", "2", "--seq-len", "32", "--repeats", "2", "--budget", "0", "--capacity", "0.5",
                 "--layers", "[1, 3]", "--tune-steps", "1", "--feature-batches", "1", "--eval-blocks", "4",
                 "--prompt-len", "8", "--new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "mod" and result["layers"] == [1, 3]
    # causal routing, timed on real held-out rows beside top-k: what it processed is what it cost in FLOPs
    assert 0 < result["flop_ratio_causal"] < 1 and 0 <= result["realized_capacity_forward_causal"] <= 1
    assert result["forward_flops"]["mod_causal"] < result["forward_flops"]["dense_rows"]
    for name in ("forward_time_ratio", "forward_causal_time_ratio", "train_step_time_ratio",
                 "decode_tokens_per_s_ratio"):
        assert result[name] > 0 and result["spreads"][name]["median"] == result[name]
    assert "rounds" in result["timing"]["forward_causal"]


def test_bench_latency_table_json_and_picture(tmp_path, capsys):
    tiny("llama").save_pretrained(tmp_path / "model")
    out = tmp_path / "latency"
    assert main(["bench", "latency", "--json", "--model", str(tmp_path / "model"), "--prompt-lens", "8",
                 "--batch-sizes", "1,2", "--new-tokens", "3", "--repeats", "2", "--budget", "0", "--capacity", "0.5",
                 "--layers", "[1, 3]", "--device", "cpu", "--out", str(out), "--compile", "--compile-backend",
                 "eager"]) == 0  # eager: dynamo traces the routed forward, no code generated (the eager run: below)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["compile"] and json.loads((out / "latency.json").read_text())["cells"] == result["cells"]
    assert (out / "latency.png").stat().st_size > 0 and result["skipped"] == []
    assert [(c["prompt_len"], c["batch"]) for c in result["cells"]] == [(8, 1), (8, 2)]
    for c in result["cells"]:
        assert c["prefill_time_ratio"] > 0 and c["spreads"]["prefill_time_ratio"]["median"] == c["prefill_time_ratio"]
        assert c["spreads"]["decode_tokens_per_s_ratio"]["n"] >= 1
        # counted on what ran: routed blocks at capacity 0.5 cost less than dense, and the ceilings say > 1
        assert 0 < c["prefill_flop_ratio"] < 1 and c["prefill_ceiling"] > 1 and c["decode_ceiling"] > 1
        # measured after the timings (see below): a tiny model's generate may then fit in pages the process holds
        assert all(isinstance(v, int) and v >= 0 for v in c["peak_memory_bytes"].values())
        # the untrained predictors' bias is calibrated: some tokens run the routed blocks, not all
        assert 0 < c["realized_capacity"]["prefill"] < 1


def test_bench_latency_measures_memory_only_after_every_timing(tmp_path, monkeypatch):
    """On the CPU, measuring peak memory fixes glibc's mmap threshold for the rest of the process, which slows the
    side that allocates more in every later timing: no cell is timed after a memory measurement."""
    from depthmix.bench import common, latency
    calls = []
    timed, measured = common.interleaved_times, common.peak_memory
    monkeypatch.setattr(latency, "interleaved_times", lambda *a, **k: calls.append("time") or timed(*a, **k))
    monkeypatch.setattr(latency, "peak_memory", lambda *a, **k: calls.append("memory") or measured(*a, **k))
    tiny("llama").save_pretrained(tmp_path / "model")
    assert main(["bench", "latency", "--model", str(tmp_path / "model"), "--prompt-lens", "8", "--batch-sizes",
                 "1,2", "--new-tokens", "3", "--repeats", "1", "--budget", "0", "--capacity", "0.5", "--layers",
                 "[1, 3]", "--device", "cpu", "--out", str(tmp_path / "latency")]) == 0
    assert calls == ["time", "time"] + ["memory"] * 4


def test_bench_latency_time_limit_skips_what_does_not_fit(tmp_path, capsys):
    tiny("llama").save_pretrained(tmp_path / "model")
    assert main(["bench", "latency", "--json", "--model", str(tmp_path / "model"), "--prompt-lens", "8,16",
                 "--batch-sizes", "1", "--time-limit", "0.001", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["cells"] == [] and [s["prompt_len"] for s in result["skipped"]] == [8, 16]
    assert "--time-limit" in result["skipped"][0]["why"] and not (tmp_path / "latency.png").exists()


def test_bench_latency_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "latency", "--prompt-lens", "128,x"])
    assert "'128,x': expected whole numbers" in capsys.readouterr().err
    from depthmix.bench.gpu import shapes
    assert shapes("2x256, 4X512") == [(2, 256), (4, 512)]
    with pytest.raises(ValueError, match="--shapes '2x'"):
        shapes("2x")


@pytest.mark.slow
def test_bench_gpu_runs_every_bench_on_the_cpu(tmp_path, capsys):
    # the accelerator script with the device as the only difference: tiny sizes on the CPU
    tiny_lm_folder(tmp_path / "model")
    out = tmp_path / "gpu"
    assert main(["bench", "gpu", "--out", str(out), "--device", "cpu", "--dtype", "float32", "--model",
                 str(tmp_path / "model"), "--shapes", "2x16", "--time-limit", "900", "--no-compile",
                 "--latency-flags", "--prompt-lens 8 --batch-sizes 1 --new-tokens 3 --repeats 2 --budget 0 "
                 "--capacity 0.5 --layers [1,3]",
                 "--mod-flags", "--task lm/pydoc --repeats 2 --budget 0 --capacity 0.5 --layers [1,3] "
                 "--tune-steps 1 --feature-batches 1 --eval-blocks 4 --prompt-len 8 --new-tokens 4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device_name"] == "cpu" and set(summary["runs"]) == {"latency", "mod-2x16"}
    assert all("error" not in run for run in summary["runs"].values()), summary["runs"]
    eager = json.loads((out / "latency.json").read_text())
    assert not eager["compile"] and len(eager["cells"]) == 1 and (out / "latency.png").exists()
    assert summary["runs"]["latency"]["P8xB1"]["decode_ceiling"] == eager["cells"][0]["decode_ceiling"]
    forward = json.loads((out / "mod-2x16.json").read_text())
    assert forward["batch_size"] == 2 and forward["seq_len"] == 16 and forward["forward_time_ratio"] > 0
    assert summary["runs"]["mod-2x16"]["train_step_time_ratio"] == forward["train_step_time_ratio"]


def test_bench_ops_counts_what_routing_adds(capsys):
    assert main(["bench", "ops", "--json", "--hidden", "18", "--num-layers", "4", "--seq-len", "16",
                 "--prompt-len", "8", "--new-tokens", "3", "--decode-batch", "2", "--capacity", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["layers"] == [1, 3] and set(result["counts"]["mod"]) == {
        "forward_topk", "train_step", "forward_causal", "generate_b1", "generate_b2"}
    # the same model and inputs: the dense counts are positive and MoD's routing adds operators to a forward
    assert all(v > 0 for v in result["counts"]["dense"].values())
    assert result["mod_minus_dense"]["forward_topk"] > 0
    assert result["per_routed_block"]["forward_topk"] == round(result["mod_minus_dense"]["forward_topk"] / 2, 1)
