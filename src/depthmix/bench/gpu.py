"""Every MoD speed benchmark on one accelerator within a time limit: a lent GPU's minutes give the whole table.

Runs, each as its own process stopped at its share of --time-limit (what it wrote so far is kept): the latency
table (`depthmix bench latency`, eager), the forward and training-step ratios of `depthmix bench mod` at each
--shapes entry, then the latency table again under torch.compile (CUDA graphs on CUDA). Writes to --out:
latency.json and latency.png, mod-BxS.json per shape, compiled/latency.json and .png, and summary.json naming the
device with each run's headline numbers. The device argument
is the only difference between a GPU run and a CPU one.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import DTYPES

METHOD = "mod"  # the method whose benchmarks this runs


def add_args(p) -> None:
    p.add_argument("--out", required=True, help="folder the JSON files (and the latency PNGs) are written to")
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds for everything (default: %(default)s)")
    p.add_argument("--device", default="cuda", help="where both sides run (default: %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="dtype of the weights and activations: %(choices)s (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="the causal LM measured: a name, a folder or a Hub id")
    p.add_argument("--shapes", default="2x256,4x512", help="batch x sequence length of the forward and "
                   "training-step ratios (`depthmix bench mod`), comma-separated (default: %(default)s)")
    p.add_argument("--latency-flags", default="", help='more flags for `depthmix bench latency`, e.g. "--prompt-lens '
                   '128,512 --batch-sizes 1,4 --capacity 0.25"')
    p.add_argument("--mod-flags", default="", help='more flags for `depthmix bench mod`, e.g. "--adapter DIR '
                   '--data-dir /data"')
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile latency table")


def shapes(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or any(len(s) != 2 or min(s) < 1 for s in out):
        raise ValueError(f"--shapes {text!r}: expected BATCHxLENGTH entries such as 2x256,4x512")
    return out


def bench(name: str, flags: list[str], seconds: float) -> dict:
    """`depthmix bench NAME --json FLAGS` in its own process, stopped after `seconds`: its JSON, or why none."""
    cmd = [sys.executable, "-m", "depthmix.cli.main", "bench", name, "--json", *flags]
    print(f"\n== {shlex.join(cmd[2:])} ({seconds:.0f} s at most) ==", flush=True)
    if seconds < 1:
        return {"error": "no time left of --time-limit"}
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped at its {seconds:.0f} s share of --time-limit"}
    lines = done.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    if done.returncode != 0 or not lines:
        return {"error": f"exit status {done.returncode}", "output": lines[-20:]}
    return json.loads(lines[-1])


def run(args) -> dict:
    from ..io import write_json
    start = time.perf_counter()
    out = Path(args.out)
    sizes = shapes(args.shapes)
    common = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    extra_latency, extra_mod = shlex.split(args.latency_flags), shlex.split(args.mod_flags)
    # shares of the time limit: eager latency 45%, each forward/training shape 30% / len(shapes), compiled the rest
    plan = [("latency", common + ["--out", str(out)] + extra_latency, 0.45)]
    plan += [(f"mod-{b}x{s}", common + ["--batch-size", str(b), "--seq-len", str(s)] + extra_mod, 0.3 / len(sizes))
             for b, s in sizes]
    if not args.no_compile:
        plan.append(("latency-compiled", common + ["--out", str(out / "compiled"), "--compile"] + extra_latency, 0.25))
    total = sum(share for *_, share in plan)
    device = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "cpu"
    summary = {"device": args.device, "device_name": device, "dtype": args.dtype, "model": args.model,
               "time_limit": args.time_limit, "runs": {}}
    spent_share = 0.0
    for name, flags, share in plan:
        spent_share += share
        elapsed = time.perf_counter() - start
        # a run gets its share plus whatever earlier runs left unused, never beyond the limit
        seconds = args.time_limit * spent_share / total - elapsed
        if name.startswith("latency"):  # its own limit: ends cleanly, with a table, before being stopped
            flags = flags + ["--time-limit", str(max(1.0, 0.85 * seconds))]
            result = bench("latency", flags, seconds)  # it writes its own latency.json, cell by cell
        else:
            result = bench("mod", flags, seconds)
            write_json(out / f"{name}.json", result)
        summary["runs"][name] = headline(result)
        write_json(out / "summary.json", summary)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_json(out / "summary.json", summary)
    print(json.dumps(summary["runs"], indent=1))
    return summary


def headline(result: dict) -> dict:
    """The numbers of a run that its summary line shows."""
    if "error" in result:
        return {"error": result["error"]}
    if result.get("bench") == "latency":
        return {f"P{c['prompt_len']}xB{c['batch']}": {"prefill_speedup": c["prefill_speedup"],
                                                      "decode_speedup": c["decode_tokens_per_s_ratio"],
                                                      "decode_ceiling": c["decode_ceiling"]}
                for c in result["cells"]}
    keys = ("flop_ratio", "forward_time_ratio", "forward_causal_time_ratio", "train_flop_ratio",
            "train_step_time_ratio", "decode_tokens_per_s_ratio")
    return {k: result.get(k) for k in keys}
