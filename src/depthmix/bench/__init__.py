"""Benchmarks: each reports ratios of a method over its baseline, measured side by side in one run."""
from . import mod, mode, molex

BENCHES = {"molex": (molex.add_args, molex.run), "mode": (mode.add_args, mode.run), "mod": (mod.add_args, mod.run)}
