"""experiments/mode_engage.py's own logic: the router's rate and start tuned, then LoRA's rate around the best."""
import json
from types import SimpleNamespace

from test_experiments import script


def test_router_rate_and_start_then_lora_rate_and_recorded_runs_skipped(tmp_path, monkeypatch):
    engage = script("mode_engage")
    mode_math = engage.mode_math
    trained = {}

    def run(args, folder, seed, flags, splits, split, samples):
        trained[folder.name] = flags
        nll = 1.0 - 0.1 * ("rlr1e-1" in folder.name and "uniform" in folder.name) - 0.05 * ("lr2e-3" in folder.name)
        return {"gold_nll": nll}
    monkeypatch.setattr(mode_math, "run", run)
    monkeypatch.setattr(engage, "mixing", lambda folder, problems: {"mean_weights": [0.1, 0.2, 0.7],
                                                                    "weight_std": [0.0, 0.0, 0.0]})
    args = SimpleNamespace(results=str(tmp_path), router_lrs=engage.ROUTER_LRS)
    base = {"mode+lora": {"lr": "1e-3"}, "distill": {"options": "kl1-sum"}}
    best = engage.sweep(args, tmp_path, {"validation": tmp_path}, base)
    assert len([n for n in trained if n.startswith("mode+lora-lr1e-3-")]) == 6  # 3 router rates x 2 starts
    assert (best["router_lr"], best["init"], best["lora_lr"]) == ("1e-1", "uniform", "2e-3")
    assert sorted(n for n in trained if "lr1e-3-" not in n) == ["mode+lora-lr2e-3-rlr1e-1-uniform",
                                                                 "mode+lora-lr5e-4-rlr1e-1-uniform"]
    assert best["flags"] == ["--method", "mode", "--lr", "2e-3", "--router-lr", "1e-1", "--init-final-weight",
                             repr(1 / 3)]
    recorded = json.loads((tmp_path / "mode-engage-sweep.json").read_text())
    assert len(recorded["runs"]) == 8
    assert all(r["mixing"]["mean_weights"] == [0.1, 0.2, 0.7] for r in recorded["runs"])  # each run's weights kept
    assert "| mode+lora-lr2e-3-rlr1e-1-uniform | 0.8500 | 0.100 / 0.200 / 0.700 |" in engage.tables(tmp_path)
    trained.clear()
    assert engage.sweep(args, tmp_path, {"validation": tmp_path}, base) == best and not trained  # a resumed study trains nothing again
