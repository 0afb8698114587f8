from .config import MoLExConfig
from .model import MoLEx

__all__ = ["MoLExConfig", "MoLEx"]
