"""One folder per method: its config, its layer-level code and its model-level wiring."""
from .mode import MoDE, MoDEConfig
from .mod import MoD, MoDConfig
from .molex import MoLEx, MoLExConfig

METHODS = {"molex": (MoLExConfig, MoLEx), "mode": (MoDEConfig, MoDE), "mod": (MoDConfig, MoD)}

__all__ = ["METHODS", "MoLExConfig", "MoDEConfig", "MoDConfig"]
