"""What the long studies share: a learning rate at the edge of its grid is not tuned, a run is trained by one
process at a time, and how a finished comparison (depthmix.evaluation.compare) reads in the docs."""
from __future__ import annotations

import contextlib
import fcntl
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXTEND = 2  # learning rates tried beyond the grid's edge per arm, while the best one is on that edge
RULE = (f"while an arm's best learning rate is on the edge of those tried, the next one beyond it (x2 or /2) is run "
        f"too, at most {EXTEND} per arm")


def best_lr(scores: dict[str, float], higher_is_better: bool) -> str:
    """The best learning rate; ties go to the smaller."""
    sign = 1 if higher_is_better else -1
    return max(sorted(scores, key=float), key=lambda lr: sign * scores[lr])


def edge_lr(scores: dict[str, float], grid: int, higher_is_better: bool) -> str | None:
    """The learning rate beyond the edge (x2 or /2) where the best one tried lies, at most EXTEND beyond the grid
    of `grid` rates; None where the best is bracketed."""
    lrs = sorted(scores, key=float)
    if len(lrs) < 2 or len(lrs) >= grid + EXTEND:
        return None
    top = best_lr(scores, higher_is_better)
    if top not in (lrs[0], lrs[-1]):
        return None
    return scaled(top, 2 if top == lrs[-1] else 0.5)


def around(lr: str) -> list[str]:
    """A grid of three centred on lr: lr / 2, lr, lr x 2."""
    return [scaled(lr, 0.5), lr, scaled(lr, 2)]


def scaled(lr: str, factor: float) -> str:
    """lr x factor, written as the grids write rates ("4e-3", "1.6e-2")."""
    mant, exp = f"{float(lr) * factor:e}".split("e")
    return f"{float(mant):g}e{int(exp)}"


def tune(score, grid: list[str], higher_is_better: bool) -> tuple[str, dict[str, float]]:
    """score(lr) for each rate of the grid, then beyond its edge while the best is there: (best, scores)."""
    scores = {lr: score(lr) for lr in grid}
    while (lr := edge_lr(scores, len(grid), higher_is_better)) is not None:
        scores[lr] = score(lr)
    return best_lr(scores, higher_is_better), scores


def report(result: dict, where: str = "", picture: bool = False) -> str:
    """The Markdown of one comparison: its heading, table and verdicts (and, for the docs, the picture write()
    drew)."""
    from depthmix.evaluation.compare import table
    name = result["experiment"]
    return (f"**{result['task']}, {result['metric']}{where}** (paired seeds):\n\n{table(result)}\n\n"
            + partial(result) + "\n".join(f"- {v}" for v in result["verdicts"].values())
            + (f"\n\n![{name}: every run, and the paired differences](img/{name}.png)" if picture else ""))


def partial(result: dict) -> str:
    """A line saying which planned seeds some arm has not finished (setup["seeds"]), or "": the verdicts of a
    partial comparison rest on fewer pairs than the study was powered for, and an s.d. from two is itself rough."""
    planned = set(result["setup"].get("seeds") or ())
    done = {arm: {r["seed"] for r in result["runs"] if r["arm"] == arm} & planned for arm in result["summary"]}
    if all(seeds == planned for seeds in done.values()):
        return ""
    counts = ", ".join(f"{arm} {len(seeds)}" for arm, seeds in done.items())
    return (f"**Partial: {len(planned)} seeds planned, finished so far: {counts}. The lines below are provisional, "
            "not verdicts.**\n\n")


def write(result: dict, results: Path) -> None:
    """A finished comparison as <results>/<experiment>.json and its picture <results>/../img/<experiment>.png."""
    from depthmix import plots
    plots.paired(result, results.parent / "img" / f"{result['experiment']}.png")
    publish(results / f"{result['experiment']}.json", result)


def publish(file: Path, record: dict) -> None:
    """Write a results file; where it is one of docs/results/, render the docs' tables from it at once, so a commit
    of the JSON a study wrote never leaves the docs out of date with it (tests/test_docs.py checks they agree)."""
    from depthmix.io import write_json
    before = file.read_text() if file.exists() else None
    write_json(file, record)
    # unchanged (a resumed study re-scoring its finished runs): its docs were rendered when it was written
    if Path(file).resolve().parent != ROOT / "docs" / "results" or file.read_text() == before:
        return
    with open(Path("/tmp") / "depthmix-render-docs.lock", "w") as lock:  # two lanes may finish runs at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run([sys.executable, str(ROOT / "experiments" / "render_docs.py")], cwd=ROOT,
                              capture_output=True, text=True)
    if done.returncode != 0:
        print(f"warning: the docs were not rendered from {file}:\n{done.stdout}{done.stderr[-2000:]}", flush=True)


@contextlib.contextmanager
def claim(folder: Path):
    """Hold the run in `folder` for this process: a second lane of the same study (another process, --reverse)
    waits here until the first has finished it, then finds it done instead of training it again beside it. The
    lock file sits beside the folder, which a restarted run may delete; the OS drops the lock if the holder dies."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file(folder), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def busy(folder: Path) -> bool:
    """Whether another lane holds the run in `folder` (claim): phase 2 moves on to its next run instead of waiting,
    since the holder records this one; phase 1 waits, as it needs every rate's result to choose."""
    file = lock_file(folder)
    if not file.exists():
        return False
    with open(file) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(lock, fcntl.LOCK_UN)
        return False


def lock_file(folder: Path) -> Path:
    """Beside the run's folder, which a restarted run may delete."""
    return folder.parent / f".{folder.name}.lock"


def ordered(args, items: list) -> list:
    """A study's runs in the order this lane takes them: a second lane (--reverse) starts from the other end."""
    return items[::-1] if args.reverse else items


def recorded(file: Path, same_setup) -> dict[str, dict]:
    """The runs a results file records, by name (name_of), where it was written with the settings this process runs
    (same_setup(its JSON) is true): the run folders (runs/, not committed) do not outlive a session's machine, so the
    committed results files are a study's durable record. A recorded run counts as finished: it is neither trained
    again nor dropped from the files this process rewrites (merged)."""
    if not file.exists():
        return {}
    rec = json.loads(file.read_text())
    if not same_setup(rec):
        print(f"{file}: written with other settings than this run's; its runs are not reused", flush=True)
        return {}
    return {name_of(r): r for r in rec["runs"]}


def name_of(run: dict) -> str:
    """A run's name: a phase-1 run carries its own ("lora-lr1e-3"), a phase-2 run is <arm>-s<seed>."""
    return run.get("run") or f"{run['arm']}-s{run['seed']}"


def merged(found: list[dict], kept: dict[str, dict]) -> list[dict]:
    """The runs found in run folders, then the recorded ones (an earlier session's) that no folder holds."""
    names = {name_of(r) for r in found}
    return found + [r for name, r in sorted(kept.items()) if name not in names]


PHASE1_SEED = 0
REUSED = ("phase 2's seed-0 run of an arm tuned in phase 1 is phase 1's run at the chosen options (the same seed, "
          "training rows and flags train the same model: tests/test_experiments.py), scored on phase 2's data "
          "rather than trained again; where that run's folder is gone (a phase 1 recorded by an earlier session), "
          "seed 0 is trained again with the same flags")


def rescore(program: list[str], trained: Path, folder: Path, flags: list[str], output: str) -> dict:
    """Phase 2's seed-0 run (REUSED): `program eval` scores the phase-1 run `trained` on phase 2's data (flags)
    into folder/output, and folder/metrics.json is trained's record with that evaluation in place of its own."""
    from depthmix.io import write_json
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [*program, "eval", "--adapter", str(trained), *flags, "--output", str(folder / output)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    evaluation = json.loads((folder / output).read_text())
    record = json.loads((trained / "metrics.json").read_text())
    record.update(metrics=evaluation["metrics"], method_state=evaluation["method_state"],
                  routing=evaluation.get("routing", record.get("routing")), trained_in=str(trained))
    write_json(folder / "metrics.json", record)  # last, atomic: its presence marks the run finished
    return record


def phase1_table(rec: dict, heading: str, where: str, columns: dict) -> str:
    """The Markdown of a phase-1 sweep file: its heading, then a row per finished run (columns: header -> the cell
    of a run; the training minutes come last)."""
    columns = {**columns, "train minutes": lambda r: f"{r['train_seconds'] / 60:.0f}"}
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    runs = sorted(rec["runs"], key=lambda r: (r["arm"], float(r["lr"])))
    lines += ["| " + " | ".join(cell(r) for cell in columns.values()) + " |" for r in runs]
    done = f"{len(rec['runs'])} run{'s' * (len(rec['runs']) != 1)} finished"
    return (f"**{heading}** (seed {PHASE1_SEED}; {rec['metric']} on the {where}; {done}; "
            f"{rec['planned']} planned, plus edge extensions; a run resumed from a checkpoint shows the minutes of its "
            f"last process only):\n\n" + "\n".join(lines))
