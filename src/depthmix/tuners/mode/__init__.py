from .config import MoDEConfig
from .model import MoDE

__all__ = ["MoDEConfig", "MoDE"]
