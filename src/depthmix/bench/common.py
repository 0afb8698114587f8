"""Measuring side by side: interleaved timing, FLOPs of what really runs, peak memory of a step."""
from __future__ import annotations

import ctypes
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .. import flops as _flops  # noqa: F401  (registers a FLOP formula for the CPU SDPA kernel, else counted as 0)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(fns: dict, repeats: int, warmup: int = 2, device="cpu", progress=True) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn (A B A B ...) so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc="timing", disable=not progress):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(step, device="cpu") -> int:
    """Peak bytes one call of `step` adds on top of what is already allocated: the CUDA allocator's peak on a
    GPU; on the CPU the process's resident-set high-water mark (Linux), reset just before the call."""
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
