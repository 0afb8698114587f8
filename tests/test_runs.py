"""No lost or mixed-up runs (issue 8, part 4): one live run per output folder, --resume only from an intact
checkpoint of the same run, every mistake that can be found before loading refused before loading, and data
errors that name file, line and cause. Each probe asserts its message and that nothing was written or changed."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMALL, snapshot
from conftest import run_cli as run
from depthmix.cli.main import main
from depthmix.data import get_task
from depthmix.data.tasks import DataError
from depthmix.train.runs import LOCK_NAME, RunLock, checkpoint_problem



@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished MoLEx run (checkpoints 1 and 2, the final adapter, metrics.json)."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert main([str(a) for a in ("train", "--method", "molex", "--granularity", "token", "--alpha", 0.7, *SMALL,
                                  "--max-steps", 2, "--save-steps", 1, "--output-dir", out)]) == 0
    return out


@pytest.fixture
def interrupted(finished, tmp_path):
    """The same run as if killed after its second checkpoint: no final adapter, no metrics."""
    out = tmp_path / "interrupted"
    shutil.copytree(finished, out, ignore=lambda d, names: [] if Path(d) != finished else
                    [n for n in names if not n.startswith("checkpoint-") and n != "run_options.json"])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2", "run_options.json"]
    return out


# -- one folder, one run -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_finished_run_holds_no_lock_and_records_its_options(finished):
    assert not (finished / LOCK_NAME).exists()
    options = json.loads((finished / "run_options.json").read_text())["options"]
    assert options["method"] == "molex" and options["method_config"]["alpha"] == 0.7
    assert options["method_config"]["granularity"] == "token" and options["method_config"]["learn_alpha"] is True


def test_a_second_run_into_a_folder_a_live_run_holds_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom depthmix.train.runs import RunLock\n"
                               "RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(600)", str(out)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        before = snapshot(out)
        code, err = run(capsys, "train", *SMALL, "--output-dir", out)
        assert code == 2
        assert f"{out} is in use by another run (pid {holder.pid} on " in err and "choose another --output-dir" in err
        assert snapshot(out) == before  # the holder's lock file, untouched
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock file stays behind, but the kernel dropped its flock, so the folder is free again
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    lock = RunLock(out)
    lock.acquire()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_NAME).exists()


def test_a_lock_held_in_this_process_refuses_a_second_holder(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(ValueError, match=f"pid {os.getpid()} on .*, holds {tmp_path / LOCK_NAME}"):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released_on_error(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    data = tmp_path / "data"
    (data / "glue" / "SST-2").mkdir(parents=True)
    (data / "glue" / "SST-2" / "train.tsv").write_text("")
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "earlier"}))
    code, err = run(capsys, "train", "--task", "glue/sst2", "--data-dir", data, "--output-dir", out)
    assert code == 2 and f"{data}/glue/SST-2/train.tsv: the file is empty" in err  # got past the lock
    assert "in use" not in err and not (out / LOCK_NAME).exists()  # and released it on the error


# -- resume ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_into_a_finished_run_is_refused_and_changes_nothing(finished, capsys):
    before = snapshot(finished)
    code, err = run(capsys, "train", "--output-dir", finished, "--resume", "--max-steps", 2)
    assert code == 2
    assert f"--resume: {finished} holds a finished run (depthmix_config.json and metrics.json)" in err
    assert snapshot(finished) == before


@pytest.mark.slow
def test_a_new_run_into_an_unfinished_runs_folder_is_refused(interrupted, capsys):
    before = snapshot(interrupted)
    code, err = run(capsys, "train", *SMALL, "--output-dir", interrupted)
    assert code == 2
    assert (f"{interrupted} holds the checkpoints of an unfinished run (checkpoint-2, checkpoint-1); pass --resume"
            in err)
    assert snapshot(interrupted) == before


@pytest.mark.slow
@pytest.mark.parametrize("flags, says", [
    (("--alpha", 0.3), "molex option alpha was 0.7, now 0.3"),
    (("--lora-r", 4), "lora_r was 8, now 4"),
    (("--task", "glue/sst2"), "task was 'pydoc/topics', now 'glue/sst2'"),
    (("--method", "mod"), "method was 'molex', now 'mod'"),
])
def test_resume_with_another_option_is_refused_naming_both_values(interrupted, capsys, flags, says):
    before = snapshot(interrupted)
    code, err = run(capsys, "train", "--output-dir", interrupted, "--resume", *flags)
    assert code == 2 and f"--resume: {interrupted} was started with other options" in err and says in err
    assert snapshot(interrupted) == before


@pytest.mark.slow
def test_resume_skips_a_broken_checkpoint_and_resumes_from_the_newest_intact_one(interrupted, capsys):
    weights = interrupted / "checkpoint-2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # a save cut short
    code, err = run(capsys, "train", "--output-dir", interrupted, "--resume")  # other options from the record
    assert code == 0
    assert (f"skipping {interrupted / 'checkpoint-2'}: adapter_model.safetensors does not match the sha256 "
            "recorded in depthmix_config.json") in err
    assert f"resuming from {interrupted / 'checkpoint-1'}" in err
    metrics = json.loads((interrupted / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and metrics["options"]["method_config"]["alpha"] == 0.7


@pytest.mark.slow
def test_what_makes_a_checkpoint_unusable(finished, tmp_path):
    good = finished / "checkpoint-2"
    assert checkpoint_problem(good) is None

    def broken(name, damage):
        path = tmp_path / name
        shutil.copytree(good, path)
        damage(path)
        return checkpoint_problem(path)

    assert broken("no-state", lambda p: (p / "trainer_state.json").unlink()) == "trainer_state.json: file not found"
    assert broken("no-weights", lambda p: (p / "adapter_model.safetensors").unlink()) == \
        "adapter_model.safetensors is missing"
    assert broken("bad-config", lambda p: (p / "depthmix_config.json").write_text("{")).startswith(
        "depthmix_config.json: not valid JSON (line 1")
    assert broken("no-config", lambda p: (p / "depthmix_config.json").unlink()) == \
        "depthmix_config.json: file not found"


@pytest.mark.slow
def test_resume_with_no_intact_checkpoint_lists_why(interrupted, capsys):
    for name in ("checkpoint-1", "checkpoint-2"):
        (interrupted / name / "trainer_state.json").unlink()
    before = snapshot(interrupted)
    code, err = run(capsys, "train", "--output-dir", interrupted, "--resume")
    assert code == 2
    assert (f"--resume: no intact checkpoint in {interrupted} (checkpoint-2: trainer_state.json: file not found; "
            "checkpoint-1: trainer_state.json: file not found)") in err
    assert snapshot(interrupted) == before


# -- refused before anything is loaded ---------------------------------------------------------------------------
@pytest.mark.parametrize("flags, says", [
    (("--max-eval-samples", 0), "max_eval_samples = 0: expected an integer >= 1"),
    (("--max-eval-samples", -5), "max_eval_samples = -5: expected an integer >= 1"),
    (("--max-train-samples", 0), "max_train_samples = 0: expected an integer >= 1"),
    (("--epochs", "nan"), "epochs = nan: expected a finite number"),
    (("--epochs", "inf"), "epochs = inf: expected a finite number"),
    (("--lr", "inf"), "lr = inf: expected a finite number"),
    (("--max-steps", 0), "max_steps = 0: expected -1 (train for `epochs`) or an integer >= 1"),
    (("--data-dir", "2024"), "data_dir = '2024': no such folder"),
    (("--task", "gsm8k"), "task 'gsm8k' trains a causal language model, but model 'minilm-l6' is an encoder "
                          "(model_type 'bert'): choose a decoder model"),
    (("--method", "mode", "--distill-weight", "inf"), "MoDEConfig.distill_weight = inf: expected a finite number"),
    (("--method", "mode", "--temperature", "nan"), "MoDEConfig.temperature = nan: expected a finite number"),
    (("--method", "mod", "--aux-weight", "inf"), "MoDConfig.aux_weight = inf: expected a finite number"),
    (("--method", "molex", "--balance-weight", "inf"), "MoLExConfig.balance_weight = inf: expected a finite number"),
])
def test_bad_flags_are_refused_before_loading(tmp_path, capsys, flags, says):
    code, err = run(capsys, "train", "--model", "minilm-l6", *flags, "--output-dir", tmp_path / "out")
    assert code == 2 and says in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, says", [
    ("no-such-model", "not in the local Hugging Face cache (HF_HUB_OFFLINE is set, so the Hub is not asked)"),
    ("someone/no-such-model", "not in the local Hugging Face cache"),
    ("./not-here", "not a folder, and not a Hugging Face Hub id"),
    ("a/b/c", "not a folder, and not a Hugging Face Hub id"),
])
def test_an_unknown_model_fails_at_once_listing_the_embedded_ones(tmp_path, capsys, monkeypatch, name, says):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    code, err = run(capsys, "train", "--model", name, "--output-dir", tmp_path / "out")
    assert code == 2 and time.time() - start < 5
    assert f"model {name!r}: not an embedded model (embedded models: " in err and "minilm-l6" in err and says in err
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_a_config_is_refused(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    code, err = run(capsys, "train", "--model", tmp_path / "model", "--output-dir", tmp_path / "out")
    assert code == 2 and f"model '{tmp_path / 'model'}': the folder has no config.json" in err


@pytest.mark.parametrize("text, says", [
    ('lr: "abc"\n', "lr = 'abc': expected a number"),
    ("batch_size: 2.5\n", "batch_size = 2.5: expected an integer"),
    ('lora: "yes"\n', "lora = 'yes': expected true or false (a string such as 'false' is not a boolean)"),
    ('use_dora: "false"\n', "use_dora = 'false': expected true or false"),
    ("data_dir: 2024\n", "data_dir = 2024: expected a string (quote it in a YAML file) or null"),
    ("epochs: .nan\n", "epochs = nan: expected a finite number"),
    ("lora_targets: {q: 1}\n", "lora_targets = {'q': 1}: expected a non-empty list of strings or null"),
    ("method: molex\nmethod_config:\n  learn_alpha: 'false'\n",
     "MoLExConfig.learn_alpha = 'false': expected true or false"),
    ("method: mode\nmethod_config:\n  temperature: .inf\n", "MoDEConfig.temperature = inf: expected a finite number"),
])
def test_config_file_fields_of_the_wrong_type_are_refused(tmp_path, capsys, text, says):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(text)
    code, err = run(capsys, "train", "--config", cfg, "--output-dir", tmp_path / "out")
    assert code == 2 and says in err
    assert not (tmp_path / "out").exists()


def test_a_config_file_names_itself_and_reads_yaml_1_1_numbers(tmp_path):
    from depthmix.train.options import TrainOptions, load_options_file
    cfg = tmp_path / "train.json"
    cfg.write_text('{"lora": "false"}')
    with pytest.raises(ValueError, match=f"^{cfg}: lora = 'false': expected true or false"):
        load_options_file(cfg)
    cfg = tmp_path / "train.yaml"
    cfg.write_text("lr: 1e-4\nepochs: 2\n")  # YAML 1.1 reads 1e-4 as a string, 2 as an int
    values = load_options_file(cfg)
    assert values == {"lr": 1e-4, "epochs": 2.0} and isinstance(values["epochs"], float)
    TrainOptions(**values).validate()


# -- data errors name file, line and cause ---------------------------------------------------------------------
LATIN1 = "café".encode("latin-1")


@pytest.mark.parametrize("task, file, content, says", [
    ("glue/sst2", "glue/SST-2/train.tsv", b"", "the file is empty"),
    ("glue/sst2", "glue/SST-2/train.tsv", b"sentence\tlabel\n", "only a header line, no rows"),
    ("glue/sst2", "glue/SST-2/train.tsv", b"sentence\tlabel\ngood\t1\n" + LATIN1 + b"\t0\n",
     "line 3: not UTF-8 text (byte 0xe9)"),
    ("glue/sst2", "glue/SST-2/train.tsv", b"sentence\tlabel\ngood\t1\nbad\t0\textra\n",
     "line 3: 3 fields, but line 1 has 2 (the header)"),
    ("glue/rte", "glue/RTE/train.tsv",
     b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tnot_entailment\n",
     "line 3: 3 fields, but line 1 has 4 (the header)"),
    ("gsm8k", "gsm8k/train.jsonl", b"\n\n", "the file is empty"),
    ("gsm8k", "gsm8k/train.jsonl", b'{"question": "q", "answer": "#### 1"}\n{"question": "' + LATIN1 + b'"}\n',
     "line 2: not UTF-8 text (byte 0xe9)"),
    ("boolq", "reasoning/boolq_train.json", b"", "the file is empty"),
    ("boolq", "reasoning/boolq_train.json", b'[{"instruction": "' + LATIN1 + b'"}]',
     "line 1: not UTF-8 text (byte 0xe9)"),
    ("e2e", "e2e/devset.csv", b"", "the file is empty"),
    ("e2e", "e2e/devset.csv", b"mr,ref\n" + LATIN1 + b",x\n", "line 2: not UTF-8 text (byte 0xe9)"),
    ("e2e", "e2e/devset.csv", b'mr,ref\n"name[a], food[b]","A, quoted."\nc,d,e\n',
     "line 3: 3 fields, but line 1 has 2 (the header)"),
])
def test_data_errors_name_file_line_and_cause(tmp_path, task, file, content, says):
    path = tmp_path / file
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        get_task(task).load("train", str(tmp_path))
    assert str(e.value) == f"{path}: {says}" + ("; save the file as UTF-8" if "UTF-8" in says else "")


RANK_SCRIPT = r"""
import os, sys
from depthmix.config import ConfigError
from depthmix.train import TrainOptions, train
try:
    train(TrainOptions(output_dir=os.path.join(sys.argv[1], "run"), max_steps=1, progress=False))
    said = "trained"
except ConfigError as e:
    said = str(e)
from accelerate import PartialState
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".txt"), "w") as f:
    f.write(f"{PartialState().num_processes} {PartialState().is_main_process}\n{said}")
"""


@pytest.mark.distributed
def test_under_torchrun_every_rank_stops_when_the_folder_is_held(tmp_path):
    """Only the main process takes the lock; the others learn its refusal from it instead of training alone
    (and hanging at their first collective)."""
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(port), str(script), str(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=240)
    finally:
        lock.release()
    assert done.returncode == 0, done.stderr[-2000:]
    for rank, main_process in ((0, True), (1, False)):
        state, said = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert state == f"2 {main_process}"
        assert said.startswith(f"{tmp_path / 'run'} is in use by another run (pid {os.getpid()} on "), said
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("flags, says", [
    (("--max-eval-samples", 0), "--max-eval-samples 0: expected an integer >= 1"),
    (("--batch-size", -1), "--batch-size -1: expected an integer >= 1"),
    (("--data-dir", "2024"), "data_dir = '2024': no such folder"),
])
def test_eval_refuses_bad_flags_before_loading(finished, capsys, flags, says):
    before = snapshot(finished)
    code, err = run(capsys, "eval", "--adapter", finished, *flags)
    assert code == 2 and says in err
    assert snapshot(finished) == before


@pytest.mark.parametrize("flags, says", [
    (("--lr", "nan"), "lr = nan: expected a finite number"),
    (("--flops", "inf"), "flops = inf: expected a finite number"),
    (("--max-steps", 0), "max_steps = 0: expected an integer >= 1"),
    (("--warmup", 1.5), "warmup = 1.5: expected a fraction in [0, 1)"),
])
def test_pretrain_refuses_bad_flags_before_building(tmp_path, capsys, flags, says):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text " * 100)
    code, err = run(capsys, "pretrain", "--corpus", corpus, *flags, "--output-dir", tmp_path / "out")
    assert code == 2 and says in err
    assert not (tmp_path / "out").exists()


def test_max_length_past_the_models_positions_is_refused_before_loading(tmp_path, capsys):
    code, err = run(capsys, "train", "--model", "minilm-l6", "--max-length", 4096, "--output-dir", tmp_path / "out")
    assert code == 2
    assert ("max_length = 4096: model 'minilm-l6' has learned positions for 512 tokens at most "
            "(max_position_embeddings in its config.json)") in err
    assert not (tmp_path / "out").exists()
