"""One folder per method: its config, its layer-level code and its model-level wiring."""
from .molex import MoLEx, MoLExConfig

METHODS = {"molex": (MoLExConfig, MoLEx)}

__all__ = ["METHODS", "MoLExConfig"]
