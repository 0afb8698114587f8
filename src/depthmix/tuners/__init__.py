"""One folder per method: its config, its layer-level code and its model-level wiring; each registers itself."""
from .base import METHODS, register
from .mod import MoD, MoDConfig
from .mode import MoDE, MoDEConfig
from .molex import MoLEx, MoLExConfig

DEMO = "molex"  # the method `depthmix demo` trains beside LoRA alone, on an encoder's sentence task

__all__ = ["METHODS", "DEMO", "register", "MoLExConfig", "MoDEConfig", "MoDConfig"]
