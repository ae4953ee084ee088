"""Training: configuration, data preparation, the loop, checkpoints, metrics and plots."""

from multitoken.train.config import ConfigError, TrainConfig, load_config

__all__ = ["TrainConfig", "ConfigError", "load_config"]
