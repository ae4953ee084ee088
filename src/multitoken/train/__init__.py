"""Training: configuration, data preparation, the loop, checkpoints, metrics and plots."""

from multitoken.train.config import ConfigError, TrainConfig
from multitoken.train.config_io import load_config

__all__ = ["TrainConfig", "ConfigError", "load_config"]
