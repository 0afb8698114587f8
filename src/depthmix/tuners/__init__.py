"""One folder per method: its config, its layer-level code and its model-level wiring; each registers itself."""
from .base import METHODS, register
from .mod import MoD, MoDConfig
from .mode import MoDE, MoDEConfig
from .molex import MoLEx, MoLExConfig

__all__ = ["METHODS", "register", "MoLExConfig", "MoDEConfig", "MoDConfig"]
