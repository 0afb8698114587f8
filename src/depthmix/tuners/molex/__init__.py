from ..base import register
from .config import MoLExConfig
from .model import MoLEx

register(MoLExConfig, MoLEx)

__all__ = ["MoLExConfig", "MoLEx"]
