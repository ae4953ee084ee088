"""AdamW and its learning-rate schedule (linear warmup, cosine decay)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from multitoken.train.config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_lambda"]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, over the trainable parameters (the MTP heads
    alone under ``mtp.freeze_base``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr`` over ``train.steps``."""
    t = cfg.train

    def factor(step: int) -> float:  # step = optimiser steps taken so far
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        floor = t.min_lr / t.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of :func:`lr_lambda` on ``optimizer``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
