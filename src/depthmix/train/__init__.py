from .options import TrainOptions
from .trainer import DepthMixTrainer, build_model, load_trained, train

__all__ = ["TrainOptions", "DepthMixTrainer", "build_model", "load_trained", "train"]
