"""The model a run trains: built from the config, then made parallel by its own
``parallelize_<model>`` (the reference GPT's or the Hugging Face adapter's)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from multitoken.models.parallelize import parallelize_gpt, pipeline_gpt
from multitoken.mtp_model import MTPModel
from multitoken.parallel import ParallelDims
from multitoken.parallel.pipeline import Pipeline, parse_layers
from multitoken.train.config import TrainConfig

__all__ = ["build_model", "build_pipeline", "mixed_precision"]


def mixed_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The dtype FSDP2 gathers parameters in: bf16 when the step runs under bf16 autocast
    (``train.bf16`` on CUDA, as the trainer's autocast), else None (the parameters' fp32)."""
    return torch.bfloat16 if device.type == "cuda" and cfg.train.bf16 else None


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
        from multitoken.train.hf import build_hf_model, materialize_hf_model

        # Sharded by FSDP2, the model is built on the meta device (no storage, no weight read)
        # and each rank materialises its shard only, once fully_shard has cut it: no rank,
        # host or GPU, ever holds the whole fp32 model (hf/meta.py).
        sharded = dims.token_world_size > 1
        model = build_hf_model(cfg, pad_id, device, meta=sharded)
        cross_entropy = parallelize_hf(
            model, dims, compile=cfg.train.compile, verbose=dims.is_main,
            mixed_precision=mixed_precision(cfg, device), device_type=device.type,
        )  # fmt: skip
        if sharded:
            materialize_hf_model(model, cfg, device)
        return model, cross_entropy
    model = MTPModel.from_config(cfg.model_config(vocab_size), cfg.mtp, pad_id=pad_id)
    model.to(device)
    cross_entropy = parallelize_gpt(
        model,
        dims,
        sequence_parallel=cfg.parallel.sequence_parallel,
        compile=cfg.train.compile,
        verbose=dims.is_main,
        mixed_precision=mixed_precision(cfg, device),
    )
    return model, cross_entropy


def build_pipeline(
    cfg: TrainConfig, model: MTPModel, cross_entropy: Callable, dims: ParallelDims, device
) -> Pipeline | None:
    """Under ``parallel.pp > 1``: ``model`` (from :func:`build_model`) cut to this rank's
    stages in place, FSDP2 over each stage when DP x CP > 1, and the pipeline that runs them;
    None otherwise. Build the optimiser after it (it sees the rank's parameters only)."""
    if dims.pp == 1:
        return None
    p = cfg.parallel
    if cfg.model.hf:  # heads-only, one rank a stage (checked with the configuration)
        from multitoken.hf.parallelize import pipeline_hf

        return pipeline_hf(model, dims, p.pp_schedule, p.microbatches,
                           layers=parse_layers(p.pp_layers), device=device)  # fmt: skip
    return pipeline_gpt(
        model, dims, p.pp_schedule, p.microbatches, layers=parse_layers(p.pp_layers),
        device=device, cross_entropy=cross_entropy,
        mixed_precision=mixed_precision(cfg, device),
    )  # fmt: skip
