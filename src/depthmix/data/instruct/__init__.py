"""Instruction-tuning tasks for causal LMs (importing this package registers them).

arithmetic: gsm8k, svamp, addsub, multiarith, singleeq, mawps, aqua, reasoning/math
choice:     boolq, arc-easy, openbookqa, piqa
e2e:        e2e
"""
from . import arithmetic, choice, e2e  # noqa: F401
