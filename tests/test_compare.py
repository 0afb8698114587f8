import pytest
from depthmix.evaluation.compare import compare, paired_test, table


def runs(base, arm):
    return [{"arm": "lora", "seed": s, "value": v} for s, v in enumerate(base)] + \
           [{"arm": "mode", "seed": s, "value": v} for s, v in enumerate(arm)]


def test_schema_and_paired_differences():
    r = compare("mode-math", "reasoning/math", "gold_nll", False, "lora",
                runs([1.0, 1.2, 1.1], [0.9, 1.1, 0.95]), {"epochs": 2})
    assert set(r) >= {"experiment", "task", "metric", "higher_is_better", "baseline", "runs", "summary", "paired",
                      "setup"}
    assert r["summary"]["lora"] == {"mean": pytest.approx(1.1), "std": pytest.approx(0.1), "n": 3}
    p = r["paired"]["mode"]
    assert p["mean_diff"] == pytest.approx(-0.1166667) and p["n"] == 3 and p["seeds"] == [0, 1, 2]
    assert p["sd_diff"] == pytest.approx(0.0288675)
    assert "lora" not in r["paired"]
    # every difference favours mode and they agree closely: lower NLL wins, the CI excludes 0
    assert r["verdicts"]["mode"].startswith("mode beats lora") and "smallest detectable" in r["verdicts"]["mode"]
    assert "| mode |" in table(r)


def test_noise_is_reported_as_undetectable_with_its_power():
    r = compare("x", "t", "accuracy", True, "lora", runs([0.5, 0.6, 0.7], [0.52, 0.55, 0.72]), {})
    assert "no difference detectable at this scale" in r["verdicts"]["mode"]
    p = r["paired"]["mode"]
    # (t_{0.975,2} + t_{0.8,2}) * sd / sqrt(3): more than the observed mean difference
    assert p["min_detectable_diff"] > abs(p["mean_diff"])


def test_only_seeds_both_arms_finished_are_paired():
    r = compare("x", "t", "accuracy", True, "lora", runs([0.5, 0.6, 0.7], [0.52]), {})
    assert r["paired"]["mode"]["n"] == 1 and "no test possible" in r["verdicts"]["mode"]


def test_equal_paired_differences_are_no_evidence_of_certainty():
    """Two seeds each one example apart (a discrete metric) have a sample s.d. of 0: no p = 0, no CI of one point."""
    p = paired_test([0.1, 0.1])
    assert p["sd_diff"] == 0 and p["ci95"] is None and p["p_value"] is None and p["min_detectable_diff"] is None
    assert paired_test([218 / 271 - 219 / 271, 217 / 271 - 218 / 271])["ci95"] is None  # equal but for rounding
    assert paired_test([0.0, 0.0])["ci95"] is None
    r = compare("x", "t", "accuracy", True, "lora", runs([0.5, 0.6], [0.4, 0.5]), {})
    verdict = r["verdicts"]["mode"]
    assert "no test possible" in verdict and "beats" not in verdict and "p =" not in verdict
    assert "| mode | 0.4500 ± 0.0707 (n=2) | — | — |" in table(r)


def test_a_comparison_is_drawn_and_a_wrong_file_is_refused_naming_it(tmp_path, capsys):
    import json

    from depthmix.cli.main import main
    r = compare("x", "glue/sst2", "accuracy", True, "lora", runs([0.5, 0.6, 0.7], [0.52, 0.55, 0.72]), {})
    file = tmp_path / "x.json"
    file.write_text(json.dumps(r))
    assert main(["plot", "compare", str(file)]) == 0
    png = tmp_path / "x.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    del r["paired"]
    file.write_text(json.dumps(r))
    assert main(["plot", "compare", str(file), "--output", str(tmp_path / "y.png")]) != 0
    err = capsys.readouterr().err
    assert str(file) in err and "missing: paired" in err and not (tmp_path / "y.png").exists()


def test_a_control_pair_is_tested_beside_the_baseline():
    rows = runs([0.8, 0.82, 0.81], [0.7, 0.72, 0.71]) + \
        [{"arm": "frozen", "seed": s, "value": v} for s, v in enumerate([0.75, 0.78, 0.74])]
    r = compare("x", "t", "accuracy", True, "lora", rows, {}, controls=(("mode", "frozen"), ("mode", "absent")))
    c = r["controls"]["mode vs frozen"]
    assert c["mean_diff"] == pytest.approx(-0.0466667) and c["seeds"] == [0, 1, 2]
    assert r["verdicts"]["mode vs frozen"].startswith("mode loses to frozen")
    assert set(r["controls"]) == {"mode vs frozen"} and set(r["paired"]) == {"mode", "frozen"}
    assert "controls" not in compare("x", "t", "accuracy", True, "lora", rows, {})
