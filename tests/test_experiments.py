"""The experiment scripts' own logic: the splits they tune on, the sizes they plan, the minima they report."""
import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import shared_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1] / "experiments"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the scripts import sweeps.py from beside them
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def isoflop():
    return script("mod_isoflop_sizes")


@pytest.mark.parametrize("shape", [(2, 16), (2, 48), (4, 64), (8, 96)])
def test_planned_size_is_the_built_size(isoflop, shape):
    from depthmix.train.pretrain import PretrainOptions, build
    layers, hidden = shape
    model = build(PretrainOptions(layers=layers, hidden=hidden, heads=max(1, hidden // 16), seq_len=64), vocab=256)
    total = sum(p.numel() for p in model.parameters())
    assert total - 256 * hidden == isoflop.llama_nonembedding(layers, hidden)  # tied embedding, no position table


def test_grid_is_centred_on_the_compute_optimal_size(isoflop):
    for budget in (1e12, 3e12, 1e13):
        shapes = isoflop.grid(budget)
        assert len(shapes) == isoflop.SWEEP
        sizes = [isoflop.llama_nonembedding(*s) for s in shapes]
        assert sizes == sorted(sizes)
        nearest = min(isoflop.LADDER, key=lambda s: abs(math.log(isoflop.llama_nonembedding(*s) / isoflop.n_opt(budget))))
        assert shapes[len(shapes) // 2] == nearest


def test_parabola_minimum_and_the_edge():
    curves = script("isoflop_curves")
    points = [(10 ** x, 2.0 + 0.5 * (x - 4.3) ** 2) for x in (3.5, 4.0, 4.5, 5.0, 5.5)]
    fit = curves.parabola_min(points)
    assert fit["bracketed"] and fit["params"] == pytest.approx(10 ** 4.3, rel=1e-6)
    assert fit["loss"] == pytest.approx(2.0, abs=1e-9)
    falling = [(p, -math.log(p)) for p, _ in points]
    edge = curves.parabola_min(falling)
    assert not edge["bracketed"] and edge["index"] == len(points) - 1


def test_loglog_interpolation_is_exact_on_a_power_law():
    curves = script("isoflop_curves")
    xs = [1e3, 1e4, 1e5]
    ys = [x ** 0.7 for x in xs]
    assert curves.loglog_interp(xs, ys, 3e3) == pytest.approx(3e3 ** 0.7)
    assert curves.loglog_interp(xs, ys, 1.0) == ys[0] and curves.loglog_interp(xs, ys, 1e9) == ys[-1]


def test_molex_study_tunes_on_rows_carved_from_train_never_on_dev(tmp_path):
    data = shared_data()
    molex = script("molex_sst2")
    args = SimpleNamespace(data_dir=str(data), validation_size=50, train_size=200, eval_size=None)
    folders = molex.prepare(args, "sst2", tmp_path / "sst2")
    read = lambda folder, split: json.loads((folders[folder] / f"{split}.json").read_text())  # noqa: E731
    train, validation, dev = read("validation", "train"), read("validation", "eval"), read("final", "eval")
    assert read("final", "train") == train and len(train["label"]) == 200 and len(validation["label"]) == 50
    # disjoint rows of train: no row is used twice (SST-2's train set itself repeats a few phrases)
    from depthmix.data.tasks import get_task
    source = Counter(zip(*get_task("glue/sst2").load("train", args.data_dir).to_dict().values()))
    drawn = Counter(zip(*train.values())) + Counter(zip(*validation.values()))
    assert not drawn - source
    assert not set(validation["text_a"]) & set(dev["text_a"])
    assert len(dev["label"]) == 872  # all of SST-2's dev set, scored only in phase 2
    again = molex.prepare(args, "sst2", tmp_path / "again")  # the same split on every call
    assert json.loads((again["validation"] / "eval.json").read_text()) == validation


def test_phase_two_seed_zero_is_phase_one_run_scored_on_dev(tmp_path):
    """sweeps.REUSED: what a run is evaluated on does not touch its training, so phase 2's seed 0 (the phase-1 run
    at the chosen rate, scored on dev) is the run phase 2 would have trained."""
    from safetensors.torch import load_file
    molex = script("molex_sst2")
    args = SimpleNamespace(data_dir=str(shared_data()), validation_size=8, train_size=32, eval_size=12, epochs=1,
                           save_steps=100)
    folders = molex.prepare(args, "pydoc", tmp_path / "data")
    flags = [*molex.ARMS["molex-ours"], "--lr", "1e-3"]  # random gates and a learnt alpha: all drawn at the start
    phase1 = tmp_path / "sweep" / "molex-ours-lr1e-3"
    molex.run(args, "pydoc", phase1, 0, flags, folders["validation"])
    fresh = molex.run(args, "pydoc", tmp_path / "fresh", 0, flags, folders["final"])
    reused = molex.rescore("pydoc", tmp_path / "final" / "molex-ours-s0", phase1, folders["final"])
    assert reused["trained_in"] == str(phase1) and reused["train_loss"] == fresh["train_loss"]
    assert reused["metrics"] == fresh["metrics"]
    assert json.loads((tmp_path / "final" / "molex-ours-s0" / "eval-dev.json").read_text())["examples"] == 12
    weights = [load_file(folder / "adapter_model.safetensors") for folder in (phase1, tmp_path / "fresh")]
    assert weights[0].keys() == weights[1].keys()
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])
    # how the gates chose on the validation rows (depthmix plot routing beside the run), as the sweep records it
    choice = molex.choices("pydoc", phase1, folders["validation"])
    counts = json.loads((phase1 / "routing.json").read_text())["counts"]
    assert len(choice["most_chosen"]) == len(counts) == 6 and (phase1 / "routing.png").exists()
    assert 1 / 6 <= choice["top_share"] <= 1 and 0 <= choice["next_share"] <= choice["top_share"]
    assert choice["most_chosen"][0] == counts[0].index(max(counts[0]))


@pytest.mark.parametrize("norms_win", [True, False])
def test_mode_study_reuses_the_phase_one_run_with_phase_two_flags(tmp_path, monkeypatch, norms_win):
    mode = script("mode_math")
    trained = {}  # phase-1 run name -> its flags

    def run(args, folder, seed, flags, *rest):
        assert trained.setdefault(folder.name, flags) == flags  # a run asked for again (then skipped): same flags
        # LoRA best at 1e-3, MoDE + LoRA at 2e-3; options other than the paper's worse, but for the norms option
        # (norms_win), best at 4e-3
        name = folder.name
        nll = 1.0 - 0.1 * (("2e-3" if name.startswith("mode+lora") else "1e-3") in name)
        if name.startswith("mode-lr"):  # MoDE alone: best at 1e-2
            nll = 1.0 - 0.1 * ("lr1e-2" in name)
        if any(name.endswith(f"-{options}") for options in mode.DISTILL):
            nll += 0.05
            if norms_win and name.endswith("-kl0.1-mean-norms"):
                nll -= 0.2 + 0.2 * ("4e-3" in name)
        return {"gold_nll": nll}
    monkeypatch.setattr(mode, "run", run)
    monkeypatch.setattr(mode, "write_sweep", lambda *a: None)
    best = mode.sweep(SimpleNamespace(results=str(tmp_path)), tmp_path, {})  # no results file: nothing recorded
    assert best["lora"]["lr"] == "1e-3" and best["distill"]["lr"] == "2e-3"
    assert trained["mode+lora-lr2e-3"] == ["--method", "mode", "--lr", "2e-3"]  # the paper's options: the defaults
    assert not any(name.endswith(mode.PAPER) for name in trained)  # ... trained once, in the rate sweep
    for arm in mode.ARMS:
        assert trained[mode.phase1_run(arm, best)] == mode.final_flags(arm, best)
    retuned = sorted(n for n in trained if n.startswith("mode+lora-") and n.endswith("-kl0.1-mean-norms"))
    if norms_win:  # MoDE + LoRA's rate re-tuned at the chosen options, around the rate they ran at (2e-3)
        assert best["distill"]["options"] == "kl0.1-mean-norms" and best["mode+lora"]["lr"] == "4e-3"
        assert mode.phase1_run("mode+lora", best) == "mode+lora-lr4e-3-kl0.1-mean-norms"
        assert retuned == [f"mode+lora-lr{lr}-kl0.1-mean-norms" for lr in ("1e-3", "2e-3", "4e-3", "8e-3")]
    else:  # the paper's options win: no second sweep
        assert best["distill"]["options"] == mode.PAPER and best["mode+lora"]["lr"] == "2e-3"
        assert mode.phase1_run("mode+lora", best) == "mode+lora-lr2e-3"
        assert retuned == ["mode+lora-lr2e-3-kl0.1-mean-norms"]
    # MoDE alone: its own rate (the norms' and router's), swept at the chosen options
    options = "" if best["distill"]["options"] == mode.PAPER else "-" + best["distill"]["options"]
    assert sorted(name for name in trained if name.startswith("mode-")) == [
        f"mode-lr{lr}{options}" for lr in sorted(mode.LRS["mode"])]
    assert mode.phase1_run("mode", best) == f"mode-lr1e-2{options}"
    assert trained[mode.phase1_run("mode", best)][:4] == ["--method", "mode", "--no-lora", "--router-lr"]


def test_a_stopped_study_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    mode = script("mode_math")
    calls = []

    def train(cmd, check):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--output-dir") + 1])
        (out / "metrics.json").write_text("{}")
        (out / "nll-validation.json").write_text('{"gold_nll": 1.0}')
    monkeypatch.setattr(mode.subprocess, "run", train)
    args = SimpleNamespace(epochs="2")
    for name, stopped in (("fresh", False), ("stopped", True)):
        folder = tmp_path / name
        (folder / "checkpoint-50" if stopped else folder).mkdir(parents=True)
        mode.run(args, folder, 0, ["--method", "lora"], {"train": tmp_path}, "validation", 8)
    assert ["--resume" in cmd for cmd in calls] == [False, True]
    assert "--save-steps" in calls[0] and mode.run(args, tmp_path / "fresh", 0, [], {}, "validation", 8)  # done: skipped
    assert len(calls) == 2


def test_runs_an_earlier_session_recorded_are_not_trained_again(tmp_path, monkeypatch):
    """runs/ does not outlive a session's machine: the committed results files are the study's record
    (sweeps.recorded), read where they were written with this run's settings, and kept when they are rewritten."""
    molex = script("molex_sst2")
    args = SimpleNamespace(data_dir=str(shared_data()), validation_size=8, train_size=32, eval_size=12, epochs=1,
                           save_steps=100, results=str(tmp_path / "results"), lrs=["1e-3", "2e-3"],
                           arms=["lora", "molex-ours"], reverse=False)
    folders = molex.prepare(args, "pydoc", tmp_path / "data")
    trained = []

    def train(cmd, check):
        out = Path(cmd[cmd.index("--output-dir") + 1])
        trained.append(out.name)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text('{"metrics": {"accuracy": 0.5}, "train_seconds": 1, "train_steps": 2}')
    monkeypatch.setattr(molex.subprocess, "run", train)
    monkeypatch.setattr(molex, "choices", lambda name, folder, data: {"top_share": 0.5})
    record = Path(args.results) / "molex-pydoc-sweep.json"
    record.parent.mkdir()
    earlier = [{"run": f"lora-lr{lr}", "arm": "lora", "lr": lr, "seed": 0, "value": v, "train_seconds": 60,
                "train_steps": 20} for lr, v in (("5e-4", 0.6), ("1e-3", 0.7), ("2e-3", 0.65))]
    record.write_text(json.dumps({"arms": molex.ARMS, "settings": molex.run_settings(args, "pydoc", folders),
                                  "runs": earlier}))
    best = molex.sweep(args, "pydoc", tmp_path / "run", folders)
    assert best["lora"] == "1e-3" and trained and not any(name.startswith("lora") for name in trained)
    rewritten = json.loads(record.read_text())["runs"]
    assert [r for r in rewritten if r["arm"] == "lora"] == sorted(earlier, key=lambda r: r["run"])
    assert all(r["choice"] == {"top_share": 0.5} for r in rewritten if r["arm"] == "molex-ours")  # a gate's choices
    # an arm whose flags changed since it was recorded is run again; the other arms' runs stay
    stale = json.loads(record.read_text())
    stale["arms"]["molex-ours"] = ["--method", "molex", "--an-old-flag"]
    record.write_text(json.dumps(stale))
    trained.clear()
    assert molex.sweep(args, "pydoc", tmp_path / "again", folders)["lora"] == "1e-3"
    assert {"molex-ours-lr1e-3", "molex-ours-lr2e-3"} <= set(trained)
    assert all(name.startswith("molex-ours-") for name in trained)
    assert sorted(r["run"] for r in rewritten if r["arm"] != "lora") == sorted(trained)
    assert molex.sweep_record(SimpleNamespace(**{**vars(args), "epochs": 2}), "pydoc", folders) == {}  # other settings


@pytest.mark.parametrize("study", ["molex_sst2", "mode_math"])
def test_two_lanes_of_a_study_train_each_run_once(tmp_path, monkeypatch, study):
    """--reverse runs a second process beside the first: where both reach the same run, the one that claimed it
    trains it and the other waits, then takes its result (threads here: flock also excludes two open()s)."""
    import threading
    import time
    module = script(study)
    trained = []

    def train(cmd, check):
        trained.append(cmd)
        time.sleep(0.5)  # the other lane arrives while this one trains
        out = Path(cmd[cmd.index("--output-dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text('{"metrics": {"accuracy": 0.75}}')
        (out / "nll-heldout.json").write_text('{"gold_nll": 1.0}')
    monkeypatch.setattr(module.subprocess, "run", train)
    args = SimpleNamespace(epochs="1", save_steps=10, reverse=False)
    folder = tmp_path / "final" / "lora-s1"
    if study == "molex_sst2":
        lane = lambda: module.run(args, "pydoc", folder, 1, ["--lr", "1e-3"], tmp_path)  # noqa: E731
    else:
        lane = lambda: module.run(args, folder, 1, ["--lr", "1e-3"], {"train": tmp_path}, "heldout", 8)  # noqa: E731
    results = []
    lanes = [threading.Thread(target=lambda: results.append(lane())) for _ in range(2)]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join(timeout=30)
    assert len(trained) == 1 and len(results) == 2 and results[0] == results[1]
    assert results[0]["metrics"] == {"accuracy": 0.75}
    assert script("sweeps").ordered(SimpleNamespace(reverse=True), ["lora", "molex-ours"]) == ["molex-ours", "lora"]


def test_phase_two_moves_past_a_run_the_other_lane_holds(tmp_path):
    """busy() tells a run another process has claimed (phase 2 skips it: the holder records it), without taking it."""
    import multiprocessing
    sweeps = script("sweeps")
    folder = tmp_path / "final" / "lora-s1"
    assert not sweeps.busy(folder)  # never claimed
    started, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(folder, started, release))
    holder.start()
    try:
        assert started.wait(30)
        assert sweeps.busy(folder) and sweeps.busy(folder)  # asking does not take it
    finally:
        release.set()
        holder.join(30)
    assert not sweeps.busy(folder)  # released


def test_publish_renders_the_docs_when_a_results_file_changes_and_only_then(tmp_path, monkeypatch):
    """A resumed study re-scores its finished runs and publishes each: rendering every doc again for an unchanged
    file cost both lanes minutes of a session before their first training."""
    sweeps = script("sweeps")
    monkeypatch.setattr(sweeps, "ROOT", tmp_path)
    rendered = []
    monkeypatch.setattr(sweeps.subprocess, "run",
                        lambda cmd, **kw: rendered.append(cmd) or SimpleNamespace(returncode=0, stdout="", stderr=""))
    file = tmp_path / "docs" / "results" / "x.json"
    file.parent.mkdir(parents=True)
    sweeps.publish(file, {"runs": [1]})
    sweeps.publish(file, {"runs": [1]})
    assert len(rendered) == 1 and json.loads(file.read_text()) == {"runs": [1]}
    sweeps.publish(file, {"runs": [1, 2]})
    assert len(rendered) == 2
    sweeps.publish(tmp_path / "elsewhere.json", {"runs": [3]})  # not a docs results file: nothing to render
    assert len(rendered) == 2 and (tmp_path / "elsewhere.json").exists()


def _hold(folder, started, release):
    with script("sweeps").claim(folder):
        started.set()
        release.wait(30)


def test_mode_study_splits_are_disjoint_and_complete(tmp_path):
    data = shared_data()
    mode = script("mode_math")
    folders = mode.prepare(data, tmp_path, train_size=100, validation_size=20, heldout_size=30)
    parts = {k: json.loads((v / "reasoning" / "math_train.json").read_text()) for k, v in folders.items()}
    assert {k: len(v) for k, v in parts.items()} == {"validation": 20, "heldout": 30, "train": 100}
    keys = {k: {json.dumps(r, sort_keys=True) for r in v} for k, v in parts.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["heldout"]
    assert not keys["validation"] & keys["heldout"]
    assert all((v / "reasoning" / "SingleEq_test.json").is_file() for v in folders.values())
    with pytest.raises(SystemExit, match="math_train.json has"):
        mode.prepare(data, tmp_path / "big", train_size=10 ** 6, validation_size=20, heldout_size=30)


def test_a_comparison_short_of_its_planned_seeds_is_reported_as_provisional():
    sweeps = script("sweeps")
    from depthmix.evaluation.compare import compare
    runs = [{"arm": arm, "seed": seed, "value": 0.8 + 0.01 * seed + 0.02 * (arm == "b")}
            for arm in ("a", "b") for seed in (0, 1, 2)]
    done = compare("x", "t", "accuracy", True, "a", runs, {"seeds": [0, 1, 2]})
    assert "Partial" not in sweeps.report(done)
    short = compare("x", "t", "accuracy", True, "a", runs[:-1], {"seeds": [0, 1, 2]})
    said = "**Partial: 3 seeds planned, finished so far: a 3, b 2. The lines below are provisional"
    assert said in sweeps.report(short)
    assert "Partial" not in sweeps.report(compare("x", "t", "accuracy", True, "a", runs[:-1], {}))  # no plan: no claim


def test_a_learning_rate_sweep_goes_past_the_edge_where_its_best_lies():
    sweeps = script("sweeps")
    grid = ["5e-4", "1e-3", "2e-3"]
    assert sweeps.edge_lr({"5e-4": 0.86, "1e-3": 0.87, "2e-3": 0.88}, 3, True) == "4e-3"
    assert sweeps.edge_lr({"5e-4": 0.86, "1e-3": 0.87, "2e-3": 0.88}, 3, False) == "2.5e-4"  # NLL: lower is better
    assert sweeps.edge_lr({"5e-4": 0.86, "1e-3": 0.89, "2e-3": 0.88}, 3, True) is None  # bracketed
    assert sweeps.edge_lr({"5e-4": 0.88, "1e-3": 0.88, "2e-3": 0.88}, 3, True) == "2.5e-4"  # ties: the smaller
    curve = {"2.5e-4": 0.5, "5e-4": 0.6, "1e-3": 0.7, "2e-3": 0.8, "4e-3": 0.9, "8e-3": 0.95, "1.6e-2": 0.99}
    tried = []
    best, scores = sweeps.tune(lambda lr: tried.append(lr) or curve[lr], grid, higher_is_better=True)
    assert tried == grid + ["4e-3", "8e-3"] and best == "8e-3"  # at most EXTEND beyond the grid
    peaked = {"5e-4": 0.80, "1e-3": 0.81, "2e-3": 0.85, "4e-3": 0.83}
    assert sweeps.tune(peaked.get, grid, higher_is_better=True) == ("2e-3", {k: peaked[k] for k in peaked})
    assert sweeps.around("8e-3") == ["4e-3", "8e-3", "1.6e-2"] and sweeps.around("1e-3") == grid


def test_a_finished_comparison_reads_in_the_docs_as_heading_table_and_verdicts():
    from depthmix.evaluation.compare import compare, table
    sweeps = script("sweeps")
    runs = [{"arm": arm, "seed": s, "value": v + (0.01 if arm == "molex" else 0)}
            for s, v in enumerate([0.80, 0.82, 0.81]) for arm in ("lora", "molex")]
    result = compare("molex-sst2", "glue/sst2", "accuracy", True, "lora", runs, {})
    text = sweeps.report(result, " on dev")
    assert text.startswith("**glue/sst2, accuracy on dev** (paired seeds):\n\n" + table(result))
    assert all(f"- {v}" in text for v in result["verdicts"].values()) and result["verdicts"]


def test_mod_retrofit_st_smoke_runs_every_arm_once_and_resumes(tmp_path):
    """experiments/mod_retrofit_st.py at a tiny budget on a tiny Llama: the gated MoD arm with LoRA healing, the
    attention-drop arm healed on the same tokens, the oracle with the MoD point's router agreement and the tuning
    curve; the results file has issue 25's keys; a second run finds every point done and runs none again."""
    from conftest import tiny_lm_folder
    data = shared_data()
    tiny_lm_folder(tmp_path / "tiny")
    study = script("mod_retrofit_st")
    argv = ["--model", str(tmp_path / "tiny"), "--data-dir", str(data), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out.json"), "--img", str(tmp_path / "map.png"), "--capacities", "0.75",
            "--healing", "lora", "--static", "attndrop", "--steps", "2", "--batch", "2", "--train-len", "16",
            "--seq-len", "16", "--eval-blocks", "2", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1",
            "--budget", "0", "--oracle-blocks", "1", "--oracle-seqs", "1", "--oracle-len", "6", "--oracle-chunk",
            "5", "--calib-blocks", "2", "--curve-every", "1", "--oracle-router", "mod-st-c0.75-lora"]
    study.main(argv)
    rec = json.loads((tmp_path / "out.json").read_text())
    arms = Counter((p["arm"], p["healing"]) for p in rec["points"])
    assert arms == Counter({("mod-st", "lora"): 1, ("attndrop", "lora"): 1, ("oracle", "none"): 1})
    for p in rec["points"]:
        assert {"tuning_tokens", "healing", "decode_speedup_b4", "nll_second_corpus", "flop_ratio", "nll"} <= set(p)
        assert math.isfinite(p["nll"]) and 0 < p["flop_ratio"] <= 1.01
    st = next(d for d in rec["details"] if d["name"] == "mod-st-c0.75-lora")
    assert [c["tuning_tokens"] for c in st["curve"]] == [32, 64]
    assert st["realized_capacity_calibration"] == pytest.approx(0.75, abs=0.05)
    assert st["tuning_device"] == "cpu"  # --device (where routers train) is recorded with tuning_seconds
    oracle = next(d for d in rec["details"] if d["name"] == "oracle-c0.75")
    assert set(oracle["router_agreement"]) == {"1.attention", "1.mlp"}
    # how unevenly the skip cost is spread: the cheapest quarter of the tokens carries at most a quarter of it
    assert set(oracle["skipped_cost_share"]) == set(oracle["unit_cost"]) == {"1.attention", "1.mlp"}
    assert all(0 <= v <= 0.25 + 1e-6 for v in oracle["skipped_cost_share"].values())
    drop = oracle["blockdrop_same_text"]
    assert len(drop["blocks"]) == 1 and math.isfinite(drop["nll"]) and 0 < drop["flop_ratio"] < 1
    table = study.oracle_table(tmp_path / "out.json")
    assert "| 0.75 |" in table and f"{drop['nll']:.4f}" in table
    assert (tmp_path / "runs" / "mod-st-c0.75-lora" / "depthmix_config.json").exists() and (tmp_path / "map.png").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    study.main(argv)  # resumed: nothing left to run
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == stamps
    before = (tmp_path / "out.json").read_bytes()
    with pytest.raises(SystemExit, match="rewriting it from .* would lose them"):  # a results file it cannot rebuild
        study.main([*argv[:argv.index("--runs") + 1], str(tmp_path / "other-runs"), *argv[argv.index("--runs") + 2:]])
    assert (tmp_path / "out.json").read_bytes() == before


def test_the_oracle_skips_a_token_as_mod_does():
    """The oracle's hooks on a dense model give what MoD computes when a routed unit skips exactly that token: for
    attention, no update and no key/value for later tokens (MoD's subset never computes them)."""
    import torch

    import depthmix
    from conftest import VOCAB, tiny
    study = script("mod_retrofit_st")
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    skip = torch.zeros(1, 10, dtype=torch.bool)
    skip[0, 4] = True
    for kind in ("attention", "mlp"):
        dense = tiny("llama").eval()
        hooks = study.skipping(study.unit_module(dense, 1, kind), skip, kind)
        with torch.no_grad():
            oracle = dense(input_ids=ids, use_cache=False).logits
        for h in hooks:
            h.remove()
        mod = depthmix.apply(tiny("llama"), depthmix.MoDConfig(capacity=0.5, layers=[1], skip=kind, update="gated",
                                                               causal="threshold")).eval()
        # route every token through block 1's unit but token 4 (threshold decisions: processed where r > 0)
        mod.method.router = lambda i, x: torch.where(skip.to(x.device), -1.0, 1.0).expand(x.shape[:2])
        with torch.no_grad():
            routed = mod(input_ids=ids, use_cache=False).logits
        assert mod.method.summary()["realized_capacity"] == 0.9
        torch.testing.assert_close(oracle, routed, rtol=1e-4, atol=1e-4)
        if kind == "attention":  # the hidden key matters: without it the later tokens differ
            dense = tiny("llama").eval()
            update_only = study.unit_module(dense, 1, kind).register_forward_hook(
                lambda m, a, out: (out[0].masked_fill(skip.unsqueeze(-1), 0.0), *out[1:]))
            with torch.no_grad():
                approx = dense(input_ids=ids, use_cache=False).logits
            update_only.remove()
            assert not torch.allclose(approx[:, 5:], routed[:, 5:], atol=1e-4)
            torch.testing.assert_close(approx[:, :5], routed[:, :5], rtol=1e-4, atol=1e-4)
