"""Issue 28: what a user sees when a command goes wrong: one line naming the problem (exit code 2 for a usage error,
1 for the machine's side, 130 for Ctrl-C), no traceback unless -v asks for it, and nothing written or changed."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL, snapshot
from conftest import run_cli as run
from depthmix.cli.main import main



def can_unshare() -> bool:
    """Whether this machine lets a user namespace mount (a read-only bind mount, a small tmpfs) for a test."""
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-rm", "true"]).returncode == 0


def in_namespace(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


needs_unshare = pytest.mark.skipif(not can_unshare(), reason="no user namespaces here (unshare -rm) to mount a "
                                                            "read-only folder or a full disk in")
DEPTHMIX = f"{sys.executable} -m depthmix.cli.main"


# -- --config and --output-dir ------------------------------------------------------------------------------------
def test_a_config_file_in_latin_1_or_a_folder_is_named_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_bytes("method: lora\n# caf\u00e9\n".encode("latin-1"))
    code, err = run(capsys, "train", "--config", cfg, "--output-dir", tmp_path / "out")
    assert code == 2 and err.strip() == (f"depthmix train: error: {cfg}: line 2: not UTF-8 text (byte 0xe9); "
                                         "save the file as UTF-8")
    code, err = run(capsys, "train", "--config", tmp_path, "--output-dir", tmp_path / "out")
    assert code == 2
    assert err.strip() == f"depthmix train: error: {tmp_path}: a folder; --config takes a YAML or JSON file"
    assert not (tmp_path / "out").exists()


def test_an_output_dir_that_is_a_file_or_empty_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    code, err = run(capsys, "train", "--output-dir", "afile", "--max-steps", 1)
    assert code == 2 and "output_dir = 'afile': " in err and "afile is a file, not a folder" in err
    code, err = run(capsys, "train", "--output-dir", "", "--max-steps", 1)
    assert code == 2 and "output_dir = '': expected a folder" in err
    code, err = run(capsys, "train", "--output-dir", "afile/run", "--max-steps", 1)
    assert code == 2 and "afile is a file, not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no run_options.json in the working directory
    assert (tmp_path / "afile").read_text() == "mine"


@needs_unshare
def test_an_output_dir_on_a_read_only_file_system_is_refused_in_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    done = in_namespace(f"mount --bind -o ro {ro} {ro} && {DEPTHMIX} train --output-dir {ro}/run --max-steps 1",
                        tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (f"depthmix train: error: output_dir = '{ro}/run': {ro} cannot "
                                                    "be written (a read-only file system, or no permission)")
    assert "Traceback" not in done.stderr and list(ro.iterdir()) == []


# -- a run stopped half way: Ctrl-C, a full disk -----------------------------------------------------------------
@pytest.fixture
def interrupt_at_step_2(monkeypatch):
    """Ctrl-C during the second training step (after checkpoint-1 was saved)."""
    from depthmix.train.trainer import DepthMixTrainer
    step = DepthMixTrainer.training_step
    calls = []

    def stopped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(DepthMixTrainer, "training_step", stopped)


@pytest.fixture
def logged():
    """The messages transformers logs (its own handler writes to whichever stream it was made with)."""
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.slow
def test_ctrl_c_says_interrupted_and_how_to_resume_without_a_traceback(tmp_path, capfd, logged, interrupt_at_step_2):
    from depthmix.train.runs import checkpoint_problem
    out = tmp_path / "run"
    capfd.readouterr()
    code = main([str(a) for a in ("train", *SMALL, "--max-steps", 4, "--save-steps", 1, "--output-dir", out)])
    stdout, err = capfd.readouterr()
    assert code == 130
    assert err.strip().splitlines()[-1] == (f"depthmix train: interrupted; {out / 'checkpoint-1'} is intact: resume "
                                            "with the same command and --resume")
    assert "Traceback" not in err and checkpoint_problem(out / "checkpoint-1") is None
    # quiet by default: transformers' report of the new classifier head and DeepSpeed's warnings are not shown
    assert not any("LOAD REPORT" in m for m in logged) and "[WARNING]" not in stdout + err


@pytest.mark.slow
def test_with_v_the_libraries_reports_and_the_traceback_show(tmp_path, logged, interrupt_at_step_2):
    with pytest.raises(KeyboardInterrupt):
        main([str(a) for a in ("train", *SMALL, "--max-steps", 4, "--save-steps", 1, "-v",
                               "--output-dir", tmp_path / "run")])
    assert any("LOAD REPORT" in m for m in logged)


@pytest.mark.slow
def test_deepspeed_warnings_only_with_v(tmp_path):
    code = ("import sys\nfrom depthmix.cli.main import quiet_libraries\nimport contextlib\n"
            "with quiet_libraries() if sys.argv[1] == 'quiet' else contextlib.nullcontext():\n"
            "    from deepspeed.accelerator import get_accelerator\n    get_accelerator()\n")
    said = {how: subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
            for how in ("quiet", "verbose")}
    assert all(done.returncode == 0 for done in said.values()), said["quiet"].stderr[-2000:]
    assert "Setting accelerator to CPU" in said["verbose"].stdout + said["verbose"].stderr
    assert "Setting accelerator to CPU" not in said["quiet"].stdout + said["quiet"].stderr


@pytest.mark.slow
@needs_unshare
def test_a_full_disk_names_the_folder_and_keeps_the_saved_checkpoint(tmp_path):
    """A 3 MB tmpfs: checkpoint-1 fits, checkpoint-2 does not (torch.save says only "unexpected pos")."""
    from depthmix.train.runs import checkpoint_problem
    disk = tmp_path / "disk"
    disk.mkdir()
    flags = " ".join(str(a) for a in (*SMALL, "--method", "molex", "--max-steps", 4, "--save-steps", 1))
    done = in_namespace(f"mount -t tmpfs -o size=3m tmpfs {disk} && {DEPTHMIX} train {flags} --output-dir {disk}/run"
                        f"; code=$?; cp -r {disk}/run {tmp_path}/copy; exit $code", tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("depthmix train: error: the disk is full (") and "Traceback" not in done.stderr
    assert (f"while writing in {disk}/run; the files saved before are intact (saves are atomic). Free some space; "
            f"{disk}/run/checkpoint-1 is intact: resume with the same command and --resume") in last
    assert checkpoint_problem(tmp_path / "copy" / "checkpoint-1") is None


# -- plot ------------------------------------------------------------------------------------------------------
def test_plot_loss_of_a_corrupt_history_and_plot_routing_of_no_samples_are_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log_history.json").write_text('{"log_history": [\n')
    code, err = run(capsys, "plot", "loss", run_dir, "--output", tmp_path / "loss.png")
    assert code == 2 and err.strip() == (f"depthmix plot loss: error: {run_dir / 'log_history.json'}: not valid JSON "
                                         "(line 2: Expecting value)")
    (run_dir / "log_history.json").write_text('{"log_history": 3}')
    code, err = run(capsys, "plot", "loss", run_dir, "--output", tmp_path / "loss.png")
    assert code == 2 and "expected {\"log_history\": [{...}, ...]} (a Trainer's log history)" in err
    code, err = run(capsys, "plot", "routing", run_dir, "--max-samples", 0)
    assert code == 2 and err.strip() == "depthmix plot routing: error: --max-samples 0: expected an integer >= 1"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["log_history.json", "run"]


def test_a_loss_curve_of_one_logged_point_draws_it(tmp_path, monkeypatch):
    """A 13-step run logs one loss (at step 10): the picture shows it, where a line of one point draws nothing."""
    import matplotlib.image
    import numpy as np

    from depthmix import plots
    where = []
    save = plots.save

    def located(fig, path):  # the point's pixel in the saved PNG (savefig's dpi, rows from the top)
        fig.tight_layout()  # as save does, before the point is located
        fig.canvas.draw()
        x, y = fig.axes[0].transData.transform((10, 1.25)) * 120 / fig.dpi
        where.append((int(round(fig.get_figheight() * 120 - y)), int(round(x))))
        return save(fig, path)

    monkeypatch.setattr(plots, "save", located)
    path = plots.loss_curve([{"step": 10, "loss": 1.25}, {"step": 13, "train_runtime": 2.0}], tmp_path / "loss.png")
    row, col = where[0]
    around = matplotlib.image.imread(path)[row - 1:row + 2, col - 1:col + 2, :3]
    assert (np.abs(around - np.array([0x1f, 0x77, 0xb4]) / 255).max(-1) < 0.1).all()  # tab:blue, the first curve


def test_plot_compare_labels_of_four_long_arm_names_do_not_overlap(tmp_path, monkeypatch):
    from depthmix import plots
    result = json.loads((Path(__file__).resolve().parents[1] / "docs/results/molex-pydoc.json").read_text())
    names = {a: f"{a}-with-a-long-descriptive-name" for a in result["summary"]}
    assert len(names) == 4
    result["summary"] = {names[a]: v for a, v in result["summary"].items()}
    result["paired"] = {names[a]: v for a, v in result["paired"].items()}
    result["runs"] = [{**r, "arm": names[r["arm"]]} for r in result["runs"]]
    result["baseline"] = names[result["baseline"]]
    boxes = []
    save = plots.save

    def checked(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            boxes.append([t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()])
            legend = ax.get_legend()
            if legend is not None:  # the seeds' legend is not drawn over the runs
                assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
        return save(fig, path)

    monkeypatch.setattr(plots, "save", checked)
    assert plots.paired(result, tmp_path / "cmp.png").stat().st_size > 1000
    assert [len(b) for b in boxes] == [4, 3]
    for labels in boxes:
        assert not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1:])


# -- flops -----------------------------------------------------------------------------------------------------
def test_flops_of_an_unknown_model_is_one_line(capsys):
    code, err = run(capsys, "flops", "--model", "/nonexistent")
    assert code == 2 and err.strip().startswith("depthmix flops: error: model '/nonexistent': not an embedded model")
    assert "not a folder, and not a Hugging Face Hub id" in err


def test_flops_gives_the_same_numbers_each_run_and_says_why_causal_differs_from_the_asked_capacity(tmp_path, capsys):
    from conftest import tiny
    tiny("llama").save_pretrained(tmp_path / "llama")
    printed = []
    for _ in range(2):
        capsys.readouterr()
        assert main(["flops", "--model", str(tmp_path / "llama"), "--seq-len", "32", "--capacity", "0.25"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]
    line, record = printed[0].strip().splitlines()
    record = json.loads(record)
    assert record["capacity"] == 0.25 and record["seed"] == 0
    assert (f"at realized capacity {record['realized_capacity_causal']}, asked 0.25: what an untrained predictor "
            "(seed 0) lets through, not a trained router's share; pass --adapter for a trained one") in line
    assert record["realized_capacity_note"].startswith("what an untrained predictor (seed 0)")


def test_lm_eval_without_lm_eval_installed_gives_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` finds when it is not installed
    monkeypatch.setitem(sys.modules, "lm_eval.utils", None)
    code, err = run(capsys, "lm-eval", "--model", "minilm-l6", "--tasks", "arc_easy")
    assert code == 2 and err.strip() == ("depthmix lm-eval: error: lm-eval runs lm-evaluation-harness, which is not "
                                         "installed: pip install 'lm-eval>=0.4' (or pip install -e '.[eval]' in a "
                                         "depthmix checkout)")


# -- the README's next commands: eval and plot routing of a finished run ------------------------------------------
@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    """The README's run, small: MoLEx on glue/sst2 with --data-dir; (folder, what train printed)."""
    import contextlib
    import io

    from conftest import shared_data
    out = tmp_path_factory.mktemp("readme") / "sst2"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(a) for a in ("train", "--method", "molex", *SMALL[:2], "--task", "glue/sst2", "--data-dir",
                                      shared_data(), *SMALL[4:], "--max-steps", 2, "--output-dir", out)]) == 0
    return out, printed.getvalue()


def edited_copy(run_dir: Path, to: Path, name: str, edit) -> Path:
    """A copy of a finished run whose JSON file `name` was changed by edit(data) (in place)."""
    moved = to / run_dir.name
    shutil.copytree(run_dir, moved)
    data = json.loads((moved / name).read_text())
    edit(data)
    (moved / name).write_text(json.dumps(data))
    return moved


@pytest.mark.slow
def test_train_prints_the_examples_evaluated_and_where_the_adapter_went(sst2):
    out, printed = sst2
    assert printed.strip().splitlines()[-1] == f"glue/sst2: 8 examples evaluated; adapter and metrics.json in {out}"
    assert json.loads(printed[printed.rindex("{\n"):printed.rindex("}") + 1])["examples"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["examples"] == 8 and metrics["routing"] is None  # MoLEx routes no tokens: null, not "n/a"


@pytest.mark.slow
def test_eval_and_plot_routing_read_the_data_folder_the_run_recorded(sst2, capsys, monkeypatch):
    out, _ = sst2
    monkeypatch.delenv("DEPTHMIX_DATA", raising=False)  # a new shell: only the run's record knows the data
    code, err = run(capsys, "eval", "--adapter", out, "--max-eval-samples", 8)
    assert code == 0, err
    assert json.loads((out / "eval-glue_sst2.json").read_text())["examples"] == 8
    code, err = run(capsys, "plot", "routing", out, "--task", "glue/sst2", "--max-samples", 8)
    assert code == 0, err
    assert (out / "routing-glue_sst2.png").exists()


@pytest.mark.slow
def test_eval_offline_without_its_data_folder_fails_in_one_line_naming_the_fix(sst2, tmp_path, capsys, monkeypatch):
    moved = edited_copy(sst2[0], tmp_path, "run_options.json",
                        lambda record: record["options"].update(data_dir=str(tmp_path / "gone")))
    monkeypatch.delenv("DEPTHMIX_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = snapshot(moved)
    code, err = run(capsys, "eval", "--adapter", moved, "--max-eval-samples", 8)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == (f"depthmix: the data folder {moved}/run_options.json records ({tmp_path / 'gone'}) is not "
                        "there; reading the Hub instead")
    assert lines[-1].startswith("depthmix eval: error: glue/sst2: cannot load nyu-mll/glue/sst2 (validation) from "
                                "the Hub (") and lines[-1].endswith("pass --data-dir or set DEPTHMIX_DATA to read "
                                                                    "local files")
    assert snapshot(moved) == before


@pytest.mark.slow
def test_eval_of_a_classifier_on_gsm8k_names_the_task_model_mismatch(sst2, capsys):
    out, _ = sst2
    before = snapshot(out)
    code, err = run(capsys, "eval", "--adapter", out, "--task", "gsm8k")
    assert code == 2 and err.strip() == (f"depthmix eval: error: --task gsm8k: the adapter in {out} was trained on "
                                         "glue/sst2, a classifier with 2 labels; gsm8k needs a causal language model. "
                                         "Score it on a task with the same head, or train an adapter on gsm8k")
    code, err = run(capsys, "plot", "routing", out, "--task", "glue/mnli")
    assert code == 2 and "glue/mnli needs a classifier with 3 labels" in err
    assert snapshot(out) == before


@pytest.mark.slow
def test_eval_output_that_is_a_folder_is_refused_before_loading(sst2, tmp_path, capsys):
    out, _ = sst2
    before = snapshot(out)
    code, err = run(capsys, "eval", "--adapter", out, "--output", tmp_path)
    assert code == 2 and err.strip() == (f"depthmix eval: error: --output {tmp_path}: a folder; give a file path, "
                                         f"e.g. {tmp_path / 'eval.json'}")
    assert list(tmp_path.iterdir()) == [] and snapshot(out) == before


@pytest.mark.slow
def test_eval_of_an_adapter_whose_base_model_folder_is_gone(sst2, tmp_path, capsys):
    moved = edited_copy(sst2[0], tmp_path, "depthmix_config.json",
                        lambda meta: meta["info"].update(base_model=str(tmp_path / "deleted-model")))
    before = snapshot(moved)
    code, err = run(capsys, "eval", "--adapter", moved, "--max-eval-samples", 8)
    assert code == 2 and "Traceback" not in err
    assert err.strip().startswith(f"depthmix eval: error: {moved}: the base model recorded in depthmix_config.json "
                                  f"cannot be found (model '{tmp_path / 'deleted-model'}': not an embedded model")
    assert err.strip().endswith("pass --model with its folder or name")
    assert snapshot(moved) == before


@pytest.mark.slow
@pytest.mark.parametrize("config, says", [
    (b"\x8f\x00binary", "not UTF-8 text"),
    (None, "config"),
])
def test_eval_of_a_binary_or_null_adapter_config_is_one_line(sst2, tmp_path, capsys, config, says):
    moved = edited_copy(sst2[0], tmp_path, "depthmix_config.json", lambda meta: meta.update(config=None))
    if config is not None:
        (moved / "depthmix_config.json").write_bytes(config)
    before = snapshot(moved)
    code, err = run(capsys, "eval", "--adapter", moved, "--max-eval-samples", 8)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"depthmix eval: error: {moved / 'depthmix_config.json'}") and says in err
    assert snapshot(moved) == before


# -- refused in preflight, not after training ------------------------------------------------------------------
def test_mod_routing_block_0_on_a_generation_task_is_refused_before_loading(tmp_path, capsys):
    from conftest import tiny

    from depthmix.train.options import TrainOptions
    from depthmix.train.preflight import preflight
    tiny("llama").save_pretrained(tmp_path / "llama")  # config.json only is read: no tokenizer needed to refuse
    code, err = run(capsys, "train", "--method", "mod", "--layers", "all", "--model", tmp_path / "llama",
                    "--task", "gsm8k", "--output-dir", tmp_path / "out")
    assert code == 2 and err.strip() == (
        "depthmix train: error: task 'gsm8k' is scored by generating text, and MoDConfig.layers = 'all': block 0 "
        "cannot be routed (skip='block') when decoding with a KV cache (the model reads its cache length from block "
        "0); route blocks from 1 on (every_other, or a list without 0)")
    assert not (tmp_path / "out").exists()
    # the same layers on a task scored without decoding, and blocks from 1 on for gsm8k, pass the preflight
    for task, layers in (("lm/tinyshakespeare", "all"), ("gsm8k", [1, 2, 3])):
        preflight(TrainOptions(method="mod", model=str(tmp_path / "llama"), task=task, output_dir=str(tmp_path / "o"),
                               method_config={"layers": layers}))
