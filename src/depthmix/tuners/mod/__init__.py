from ..base import register
from .config import MoDConfig
from .model import MoD

register(MoDConfig, MoD)

__all__ = ["MoDConfig", "MoD"]
