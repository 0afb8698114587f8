"""depthmix: Mixture-of-Depths (MoD), Mixture-of-Depths Ensembles (MoDE) and Mixture of Layer Experts (MoLEx)
for Hugging Face models."""
from .config import ConfigError
from .io import AdapterError
from .depthmix_model import DepthMixModel, apply
from .architectures import UnsupportedModelError
from .tuners import MoDConfig, MoDEConfig, MoLExConfig
from . import models  # (depthmix.models.load_model: embedded models, Hub ids, folders)

__version__ = "0.1.0"
__all__ = ["apply", "DepthMixModel", "MoLExConfig", "MoDEConfig", "MoDConfig", "ConfigError", "AdapterError", "UnsupportedModelError",
           "models"]
