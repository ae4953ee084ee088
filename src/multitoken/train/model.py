"""The model a run trains: built from the config, then made parallel by its own
``parallelize_<model>`` (the reference GPT's or the Hugging Face adapter's)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from multitoken.models.parallelize import parallelize_gpt
from multitoken.mtp_model import MTPModel
from multitoken.parallel import ParallelDims
from multitoken.train.config import TrainConfig

__all__ = ["build_model"]


def build_model(
    cfg: TrainConfig, vocab_size: int, pad_id: int, dims: ParallelDims, device: torch.device
) -> tuple[MTPModel, Callable]:
    """The run's model, seeded by ``train.seed``, on ``device``, parallel over ``dims`` (TP ->
    CP -> compile -> FSDP2); returns it with the cross-entropy its layout needs (pass it to
    :func:`~multitoken.mtp_model.step_loss`)."""
    torch.manual_seed(cfg.train.seed)
    if cfg.model.hf:
        # The optional [hf] extra: imported only by runs that use it.
        from multitoken.hf.parallelize import parallelize_hf
        from multitoken.train.hf import build_hf_model

        model = build_hf_model(cfg, pad_id, device)
        return model, parallelize_hf(model, dims, compile=cfg.train.compile, verbose=dims.is_main)
    model = MTPModel.from_config(cfg.model_config(vocab_size), cfg.mtp, pad_id=pad_id)
    model.to(device)
    cross_entropy = parallelize_gpt(
        model,
        dims,
        sequence_parallel=cfg.parallel.sequence_parallel,
        compile=cfg.train.compile,
        verbose=dims.is_main,
    )
    return model, cross_entropy
