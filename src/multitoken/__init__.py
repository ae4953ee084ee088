"""multitoken: exact Multi-Token Prediction for packed, context-parallel LLM training."""

from multitoken.layout import LayoutError, SequenceLayout
from multitoken.lookahead import IGNORE_INDEX, lookahead, mtp_inputs, next_token_labels
from multitoken.loss import LossStats, linear_cross_entropy
from multitoken.mtp import DepthLosses, MTPConfig, MultiTokenPredictor, depth_losses

__all__ = [
    "SequenceLayout",
    "LayoutError",
    "lookahead",
    "next_token_labels",
    "mtp_inputs",
    "IGNORE_INDEX",
    "linear_cross_entropy",
    "LossStats",
    "MTPConfig",
    "MultiTokenPredictor",
    "DepthLosses",
    "depth_losses",
]

__version__ = "0.1.0"
