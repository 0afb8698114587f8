from .config import MoDConfig
from .model import MoD

__all__ = ["MoDConfig", "MoD"]
