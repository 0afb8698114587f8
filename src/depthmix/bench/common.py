"""Measuring side by side: interleaved timing, FLOPs of what really runs, peak memory of a step."""
from __future__ import annotations

import ctypes
import statistics
import time

import torch
from tqdm.auto import tqdm

from ..flags import at_least
from ..flops import count as count_flops  # (it also counts the CPU SDPA kernel)


def add_timing_args(p, repeats: int, budget: float) -> None:
    """The flags every bench shares: how long to time, and where both sides run."""
    p.add_argument("--repeats", type=at_least(1), default=repeats,
                   help="timing rounds at least, per measurement (default: %(default)s)")
    p.add_argument("--budget", type=at_least(0, float), default=budget, help="seconds, per measurement, to go on "
                   "timing while a ratio's spread is wide (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where both sides run, e.g. cpu, cuda or cuda:1 (default: cuda when a GPU is visible, "
                   "else cpu)")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_dtype_arg(p) -> None:
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and activations of both "
                   "sides (bfloat16 on a GPU; default: %(default)s)")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Rounds:
    """Seconds per call of each timed function, one list entry per round (every function once per round, in turn),
    so a ratio is taken within a round: load that comes and goes hits both sides of it alike."""

    def __init__(self, names):
        self.seconds = {name: [] for name in names}

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratio(self, num, den) -> dict:
        """Median, quartiles and a 95% confidence interval of the median of the per-round ratios num/den; num and
        den are names or functions of one round's {name: seconds}."""
        rounds = [dict(zip(self.seconds, values)) for values in zip(*self.seconds.values())]
        pick = lambda f, r: r[f] if isinstance(f, str) else f(r)  # noqa: E731
        pairs = [(pick(num, r), pick(den, r)) for r in rounds]
        # a difference of two timings (a decoding step: generate(n tokens) - generate(1 token)) comes out at or
        # below zero when noise outweighs it; such a round measured nothing, so it is left out and counted
        kept = [a / b for a, b in pairs if a > 0 and b > 0]
        if not kept:
            return {"median": None, "n": 0, "dropped": len(pairs)}
        return {**spread(kept), "dropped": len(pairs) - len(kept)}


def spread(values: list[float]) -> dict:
    """Median, interquartile range and a distribution-free 95% CI of the median (order statistics)."""
    from scipy.stats import binom
    v = sorted(values)
    n = len(v)
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if n > 1 else (v[0], v[0], v[0])
    lo = max(int(binom.ppf(0.025, n, 0.5)) - 1, 0)  # ranks of the order statistics bracketing the median
    hi = min(n - 1 - lo, n - 1)
    med = statistics.median(v)
    return {"median": round(med, 4), "iqr": [round(q1, 4), round(q3, 4)], "ci95": [round(v[lo], 4), round(v[hi], 4)],
            "rel_iqr": round((q3 - q1) / med, 4) if med else None, "n": n}


def interleaved_times(fns: dict, repeats: int, warmup: int = 2, device="cpu", progress=True,
                      pairs=(), budget_s: float = 0.0, max_rel_iqr: float = 0.03,
                      max_rounds_unmeasured: int = 10) -> Rounds:
    """Time each fn once per round, in turn (A B A B ...), for at least `repeats` rounds; then, while `budget_s`
    seconds are left, go on until the per-round ratio of every (num, den) in `pairs` has `repeats` measured rounds
    and an interquartile range within `max_rel_iqr` of its median. `Rounds.stopped` says which ended it. A ratio
    with no measured round at all (see `Rounds.ratio`) is timed on past the budget, and after
    `max_rounds_unmeasured` x `repeats` rounds it is an error rather than a number."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rounds = Rounds(fns)
    start = time.perf_counter()
    bar = tqdm(desc="timing", unit="round", total=repeats, disable=not progress)
    while True:
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            rounds.seconds[name].append(time.perf_counter() - t)
        bar.update()
        n = len(rounds.seconds[next(iter(fns))])
        if n < repeats:
            continue
        stats = {p: rounds.ratio(*p) for p in pairs}
        wide = [p for p, s in stats.items() if s["n"] < repeats or (s["rel_iqr"] or 0) > max_rel_iqr]
        if not wide:
            rounds.stopped = f"{n} rounds" + (f", ratio IQR within {max_rel_iqr:.0%} of the median" if pairs else "")
            break
        unmeasured = [f"{_label(a)}/{_label(b)}" for (a, b), s in stats.items() if s["n"] == 0]
        if unmeasured and n >= max_rounds_unmeasured * repeats:
            bar.close()
            raise RuntimeError(f"could not time {unmeasured}: in {n} rounds no round gave a positive time on both "
                               "sides (the difference timed is below the timing noise); time longer calls")
        if time.perf_counter() - start > budget_s and not unmeasured:
            dropped = sum(stats[p]["dropped"] for p in wide)
            rounds.stopped = f"{n} rounds, time budget of {budget_s:.0f} s spent (IQR still wider than " \
                             f"{max_rel_iqr:.0%} for {[f'{_label(a)}/{_label(b)}' for a, b in wide]}" + \
                             (f", {dropped} rounds without a positive time left out)" if dropped else ")")
            break
    bar.close()
    return rounds


def _label(f) -> str:
    return f if isinstance(f, str) else f.__name__


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(step, device="cpu") -> int:
    """Peak bytes one call of `step` adds on top of what is already allocated: the CUDA allocator's peak on a
    GPU; on the CPU the process's resident-set high-water mark (Linux), reset just before the call. On the CPU
    it fixes glibc's mmap threshold for the rest of the process (below), which slows every later large
    allocation: measure it after the timings, never before."""
    # a first call allocates what any call allocates (optimizer state, caches)
    if torch.device(device).type == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    libc = ctypes.CDLL("libc.so.6")
    # glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which freed tensors
    # stay in the heap and the high-water mark counts memory that is no longer live (measured: +12% on a
    # smollm2 training step against the profiler's tensor accounting). A fixed threshold (M_MMAP_THRESHOLD = -3)
    # makes every tensor over 128 KiB its own mapping, returned on free, so RSS follows live memory.
    libc.mallopt(-3, 128 * 1024)
    step()
    libc.malloc_trim(0)  # hand freed heap back, so the baseline is what is really live
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss("VmRSS")
    step()
    return _rss("VmHWM") - base


def training_step(model, batch):
    """One optimizer step of the model on the batch, as a function to time."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    return step


def forward_backward(model, batch):
    def run():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def training_ratios(models: dict, batch: dict, repeats: int, device, budget_s: float = 0.0) -> dict:
    """A training step of models["method"] against models["lora"] on one batch: interleaved times, FLOPs and peak
    memory, each as the method's ratio to LoRA alone, with the raw numbers of both."""
    steps = {k: training_step(m, batch) for k, m in models.items()}
    times = interleaved_times(steps, repeats, device=device, pairs=[("method", "lora")], budget_s=budget_s)
    flops = {k: count_flops(forward_backward(m, batch)) for k, m in models.items()}
    mem = {k: peak_memory(steps[k], device) for k in models}
    step = times.ratio("method", "lora")
    return {
        "step_time_ratio": step["median"],
        "step_time_ratio_spread": step,
        "timing": times.stopped,
        "flop_ratio": round(flops["method"] / flops["lora"], 4),
        "peak_mem_ratio": round(mem["method"] / mem["lora"], 4),
        "step_seconds": {k: round(times.median(k), 4) for k in steps},
        "train_flops": flops,
        "step_peak_bytes": mem,
    }
