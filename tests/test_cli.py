"""End to end through the command line, on the embedded MiniLM-L6 and the pydoc/topics task (no download)."""
import json
import shutil
from pathlib import Path

import pytest

from depthmix.cli.main import main


def run(*argv):
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "molex"
    cfg = out.parent / "train.yaml"
    cfg.write_text("method: molex\nmodel: minilm-l6\ntask: pydoc/topics\nmax_train_samples: 48\n"
                   "max_eval_samples: 40\nmax_length: 48\nbatch_size: 8\nmethod_config:\n  granularity: token\n")
    assert run("train", "--config", cfg, "--output-dir", out, "--max-steps", 4, "--save-steps", 2,
               "--alpha", 0.7, "--no-progress", "--logging-steps", 2) == 0
    return out


@pytest.mark.slow
def test_train_writes_adapter_metrics_and_pictures(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["method"] == "molex" and metrics["train_steps"] == 4
    assert 0 <= metrics["metrics"]["accuracy"] <= 1
    adapter = json.loads((trained / "depthmix_config.json").read_text())
    assert adapter["config"]["granularity"] == "token" and adapter["config"]["alpha"] == 0.7  # file, then flags
    assert (trained / "adapter_model.safetensors").exists() and (trained / "loss.png").exists()
    assert not list(trained.glob("*.bin")) and not list(trained.glob("*.pt"))  # adapter: safetensors + json
    assert (trained / "checkpoint-4" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_eval_and_routing_plot(trained, capsys):
    assert run("eval", "--adapter", trained, "--max-eval-samples", 40) == 0
    again = json.loads((trained / "eval-pydoc_topics.json").read_text())["metrics"]
    assert again == json.loads((trained / "metrics.json").read_text())["metrics"]  # same model, same rows
    assert run("plot", "routing", trained, "--max-samples", 16) == 0
    counts = json.loads((trained / "routing-pydoc_topics.json").read_text())["counts"]
    assert len(counts) == 6 and all(sum(row) > 0 for row in counts)
    assert (trained / "routing-pydoc_topics.png").stat().st_size > 1000


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(trained, tmp_path):
    killed = tmp_path / "killed"  # the run as if killed after its last checkpoint (a finished run is not resumed)
    shutil.copytree(trained, killed, ignore=lambda d, names: [] if Path(d) != trained else
                    [n for n in names if not n.startswith("checkpoint-") and n != "run_options.json"])
    assert run("train", "--config", trained.parent / "train.yaml", "--output-dir", killed, "--max-steps", 6,
               "--resume", "--no-progress") == 0
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["train_steps"] == 6 and metrics["options"]["method_config"]["alpha"] == 0.7  # from the record


@pytest.mark.slow
def test_refuses_to_overwrite_and_names_bad_options(trained, tmp_path, capsys):
    assert run("train", "--output-dir", trained, "--max-steps", 1) == 2
    assert "already holds a trained adapter" in capsys.readouterr().err
    assert run("train", "--method", "lora", "--alpha", 0.3, "--output-dir", tmp_path / "x") == 2
    assert "--alpha is not an option of method 'lora'" in capsys.readouterr().err
    assert run("train", "--method", "molex", "--granularity", "batch", "--output-dir", tmp_path / "y") == 2
    assert "MoLExConfig.granularity = 'batch'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    assert run("train", "--config", bad) == 2
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_compare_prints_both_methods_and_draws(tmp_path, capsys):
    assert run("demo", "--compare", "--output-dir", tmp_path, "--max-train-samples", 32, "--max-eval-samples", 32,
               "--epochs", 1) == 0
    out = capsys.readouterr().out
    assert "LoRA " in out and "MoLEx + LoRA" in out
    assert (tmp_path / "loss.png").exists() and (tmp_path / "routing.png").exists()


@pytest.mark.slow
def test_demo_tours_the_three_methods(tmp_path, capsys):
    """The tour at tiny sizes: MoD against dense and a block drop (measured, side by side), MoLEx's and MoDE's
    routing pictures, every number in demo.json."""
    assert run("demo", "--output-dir", tmp_path, "--tune-steps", 1, "--train-steps", 1, "--new-tokens", 3,
               "--repeats", 1) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "demo.json").read_text())
    rows = result["mod"]["rows"]
    assert set(rows) == {"dense", "drop 4 blocks", "MoD"}
    assert rows["dense"]["flop_ratio"] == 1.0 and 0.8 < rows["drop 4 blocks"]["flop_ratio"] < 0.95
    assert 0.8 < rows["MoD"]["flop_ratio"] < 1.0 and 0 < rows["MoD"]["realized_capacity"] < 1
    assert all(r["nll"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    assert "held-out NLL" in out and "than dropping blocks" in out
    for method in ("molex", "mode"):
        assert Path(result[method]["picture"]).is_file()
    assert len(result["mode"]["routing"]["mean_weights"]) == 3


def test_every_flag_has_a_help_line_with_its_default(capsys):
    """Every flag of every (sub-)command, `depthmix bench METHOD` included (its flags are declared in
    depthmix.bench), with the choices where there are choices; and every sub-command in its parent's help."""
    import argparse

    from depthmix.cli.main import build_parser, parsers
    parser = build_parser()
    bare, no_default, no_choices = [], [], []
    for p in parsers(parser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                said = {c.dest for c in action._choices_actions if (c.help or "").strip()}
                bare += [f"{p.prog} {name}" for name in action.choices if name not in said]
            if not action.option_strings or action.dest in ("help", "version"):
                continue
            text = p._get_formatter()._expand_help(action) if action.help else ""
            if not text.strip() or text.lstrip().startswith("(default"):
                bare.append(f"{p.prog} {action.option_strings[0]}")
            elif action.default not in (None, False) and "default" not in text and "(required)" not in text:
                no_default.append(f"{p.prog} {action.option_strings[0]}")
            if action.choices and not all(str(c) in text for c in action.choices):
                no_choices.append(f"{p.prog} {action.option_strings[0]}")
    assert bare == [] and no_default == [] and no_choices == []


def test_train_help_lists_methods_tasks_and_embedded_models(capsys):
    with pytest.raises(SystemExit):
        run("train", "--help")
    text = " ".join(capsys.readouterr().out.split())
    from depthmix.train.options import METHOD_NAMES
    assert f"choices: {', '.join(METHOD_NAMES)}. (default: lora)" in text
    assert {"lora", "molex", "mod", "mode"} <= set(METHOD_NAMES)
    assert "glue/sst2" in text and "gsm8k" in text and "pydoc/topics" in text and "lm/tinyshakespeare" in text
    assert "choices: smollm2-135m, minilm-l6 (embedded: no Hub needed), or a folder or Hub id." in text
    assert "--capacity CAPACITY fraction of each sequence's tokens that a routed block processes, in (0, 1]. " \
           "(default: 0.125)" in text
    assert "--lora, --no-lora train LoRA adapters" in text and "(default: true)" in text
    layers = text.split("--layers VALUE ")[-1]  # one flag for both methods' `layers`, each meaning said
    assert "molex options: 'all' or a list" in layers and "mod options: 'every_other'" in layers
    with pytest.raises(SystemExit):
        run("--version")
    from depthmix import __version__
    assert capsys.readouterr().out.strip() == f"depthmix {__version__}"
