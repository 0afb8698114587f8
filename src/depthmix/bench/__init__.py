"""Benchmarks: each reports ratios of a method over its baseline, measured side by side in one run.

Every module here with `add_args(parser)` and `run(args) -> dict` is a `depthmix bench <module>` sub-command; every
one with `tour(args, out) -> dict` and `summary(result) -> str` is a part of `depthmix demo` (bench/tour.py), named
by its METHOD (else by the module)."""
import importlib
import pkgutil

BENCHES = {}
TOURS = {}
for _info in pkgutil.iter_modules(__path__):
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    if hasattr(_module, "add_args") and hasattr(_module, "run"):
        BENCHES[_info.name] = (_module.add_args, _module.run)
    if hasattr(_module, "tour") and hasattr(_module, "summary"):
        TOURS[getattr(_module, "METHOD", _info.name)] = _module
