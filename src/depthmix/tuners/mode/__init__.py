from ..base import register
from .config import MoDEConfig
from .model import MoDE

register(MoDEConfig, MoDE)

__all__ = ["MoDEConfig", "MoDE"]
