"""Instruction-tuning and language-modelling tasks for causal LMs (importing this package registers them).

arithmetic: gsm8k, svamp, addsub, multiarith, singleeq, mawps, aqua, reasoning/math
choice:     boolq, arc-easy, openbookqa, piqa
e2e:        e2e
text:       lm/tinyshakespeare, lm/wikitext-2, lm/pydoc
"""
from . import arithmetic, choice, e2e, text  # noqa: F401
