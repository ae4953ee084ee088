"""multitoken: exact Multi-Token Prediction for packed, context-parallel LLM training."""

from multitoken.batch import StepBatch
from multitoken.decoder import Decoder
from multitoken.errors import (
    ConfigError,
    InputError,
    LayoutError,
    UserError,
    set_validation,
    validation,
)
from multitoken.layout import SequenceLayout
from multitoken.lookahead import IGNORE_INDEX, lookahead, mtp_inputs, next_token_labels
from multitoken.loss import LossStats, linear_cross_entropy
from multitoken.mtp import DepthLosses, MTPConfig, MultiTokenPredictor, depth_losses
from multitoken.mtp_model import MTPModel, step_loss

__all__ = [
    "SequenceLayout",
    "lookahead",
    "next_token_labels",
    "mtp_inputs",
    "IGNORE_INDEX",
    "linear_cross_entropy",
    "LossStats",
    "Decoder",
    "MTPConfig",
    "MultiTokenPredictor",
    "MTPModel",
    "StepBatch",
    "step_loss",
    "DepthLosses",
    "depth_losses",
    "UserError",
    "ConfigError",
    "LayoutError",
    "InputError",
    "set_validation",
    "validation",
]

__version__ = "0.2.0"
