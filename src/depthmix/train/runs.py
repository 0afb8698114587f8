"""One output folder, one run: the lock a live run holds, the options a run started with, and the checkpoint a
`--resume` continues from."""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from .. import io
from ..config import ConfigError
from ..io import AdapterError
from ..depthmix_model import CONFIG_NAME, WEIGHTS_NAME

LOCK_NAME = "train.lock"
RUN_NAME = "run_options.json"  # the options a run started with; a --resume must keep its IDENTITY
METRICS_NAME = "metrics.json"
IDENTITY = ("model", "task", "method", "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "use_dora",
            "train_pooler")


class RunLock:
    """An exclusive flock on OUT/train.lock. The kernel drops it when its process dies, so a killed run never
    blocks the folder; the file names the holder's pid and host for the message of the run that is refused."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl
        self.folder.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(f"{self.folder} is in use by another run ({self.holder()}); wait for it to "
                                  "end or choose another --output-dir") from None
            if _same_file(self.path, fd):
                self.fd = fd
            else:  # the holder released (and unlinked) the file between our open and our flock: try again
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())

    def holder(self) -> str:
        try:
            owner = json.loads(self.path.read_text())
            return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}, holds {self.path}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"it holds {self.path}"

    def release(self) -> None:
        if self.fd is None:
            return
        os.unlink(self.path)  # before unlocking: a waiting process then sees a new file, not ours
        os.close(self.fd)
        self.fd = None


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def begin(lock: RunLock, opts, record: dict) -> str | None:
    """Takes the lock and decides how the run starts: None (a new run; its options are recorded) or the
    checkpoint a --resume continues from. Refusals release the lock and leave the folder as it was."""
    out = Path(opts.output_dir)
    if opts.resume and not out.is_dir():
        raise ConfigError(f"--resume: {out} does not exist")
    lock.acquire()
    try:
        if opts.resume:
            return resume_point(out, record)
        start_new(out, record)
        return None
    except BaseException:
        lock.release()
        raise


def start_new(out: Path, record: dict) -> None:
    if (out / CONFIG_NAME).exists():
        raise ConfigError(f"{out} already holds a trained adapter; choose another --output-dir or delete it")
    found = checkpoints(out)
    if found:
        raise ConfigError(f"{out} holds the checkpoints of an unfinished run ({', '.join(p.name for p in found)}); "
                          "pass --resume to continue it, or choose another --output-dir")
    io.write_json(out / RUN_NAME, record)


def resume_point(out: Path, record: dict) -> str:
    if (out / CONFIG_NAME).exists() and (out / METRICS_NAME).exists():
        raise ConfigError(f"--resume: {out} holds a finished run ({CONFIG_NAME} and {METRICS_NAME}); a resumed "
                          "run would overwrite them. Choose another --output-dir to train again")
    check_same_run(out, record)
    found = checkpoints(out)
    if not found:
        raise ConfigError(f"--resume: no checkpoint-* folder in {out}")
    problems = []
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            print(f"depthmix train: resuming from {path}", file=sys.stderr)
            return str(path)
        problems.append(f"{path.name}: {problem}")
        print(f"depthmix train: skipping {path}: {problem}", file=sys.stderr)
    raise ConfigError(f"--resume: no intact checkpoint in {out} ({'; '.join(problems)})")


def checkpoints(out: Path) -> list[Path]:
    """The checkpoint-N folders of out, newest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None: it can): what a save cut short or a damaged disk leaves."""
    try:
        meta = io.read_json(path / CONFIG_NAME)
        io.read_json(path / "trainer_state.json")
        weights = path / WEIGHTS_NAME
        if not weights.exists():
            return f"{weights.name} is missing"
        if io.sha256(weights) != meta.get("weights_sha256"):
            return f"{weights.name} does not match the sha256 recorded in {CONFIG_NAME}"
        io.load_tensors(weights)
    except AdapterError as e:
        return str(e).replace(f"{path}{os.sep}", "")
    return None


def resume_hint(out) -> str:
    """What a stopped run left in OUT for a --resume."""
    intact = next((p for p in checkpoints(Path(out)) if checkpoint_problem(p) is None), None)
    if intact is None:
        return f"no checkpoint was saved in {out} yet: run the same command again to start over"
    return f"{intact} is intact: resume with the same command and --resume"


def disk_full(error: BaseException, out) -> bool:
    """Whether a failure while writing into OUT came from a full disk: an ENOSPC anywhere in its chain, or
    (torch.save says only "unexpected pos" or "file write failed") no space left where OUT lies."""
    import errno
    import shutil
    e = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    folder = next((p for p in (Path(out), *Path(out).parents) if p.exists()), None)
    try:
        return folder is not None and shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def run_record(opts, method_config: dict) -> dict:
    """What a run is: its options, with the method config in full (defaults included), as JSON reads it back."""
    options = {k: v for k, v in vars(opts).items() if k != "resume"}
    options["method_config"] = method_config
    return json.loads(json.dumps({"options": options}))


def recorded_options(out) -> dict | None:
    """The options OUT's run started with (None when it has no record), method options under their names now (a
    run recorded before a rename is resumed and compared as it would be recorded today)."""
    from ..tuners import METHODS
    path = Path(out) / RUN_NAME
    if not path.exists():
        return None
    try:
        options = io.read_json(path)["options"]
    except (AdapterError, KeyError) as e:
        raise ConfigError(f"{path}: unreadable run record ({e})") from None
    if options.get("method") in METHODS and isinstance(options.get("method_config"), dict):
        options["method_config"] = METHODS[options["method"]][0].upgrade(options["method_config"], str(path))
    return options


def check_same_run(out: Path, record: dict) -> None:
    """A resumed run keeps what defines it: refuse a changed model, task, method, method or LoRA option."""
    old = recorded_options(out)
    if old is None:
        print(f"depthmix train: {out} has no {RUN_NAME}: cannot check that the options are those the run "
              "started with", file=sys.stderr)
        return
    new = record["options"]
    diffs = [f"{k} was {old[k]!r}, now {new.get(k)!r}" for k in IDENTITY if k in old and old[k] != new.get(k)]
    if old.get("method") == new["method"]:
        a, b = old.get("method_config") or {}, new["method_config"]
        diffs += [f"{new['method']} option {k} was {a.get(k)!r}, now {b.get(k)!r}"
                  for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise ConfigError(f"--resume: {out} was started with other options ({out / RUN_NAME}): {'; '.join(diffs)}. "
                          "A resumed run keeps its model, task, method and LoRA options: leave them out or "
                          "give the same values, or train into another --output-dir")
