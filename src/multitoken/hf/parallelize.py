"""``parallelize_hf``: a Hugging Face model with MTP made parallel from outside.

The same order as the reference GPT's (:mod:`multitoken.models.parallelize`), less tensor
parallelism, which transformers' attention and MLP modules are not split for here: context
parallelism's K/V all-gather on every attention module the adapter declared a ``kv_gather`` hook
on, ``torch.compile`` per layer, then FSDP2 (or HSDP) over the ranks that hold different tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from multitoken.errors import ConfigError
from multitoken.hf.linear_attention import LINEAR_ATTENTION_TYPES
from multitoken.hf.pipeline import HFStage, prune_hf_model
from multitoken.loss import linear_cross_entropy
from multitoken.parallel.compile import compile_modules
from multitoken.parallel.dims import ParallelDims
from multitoken.parallel.fsdp import apply_fsdp
from multitoken.parallel.kv_gather import apply_cp
from multitoken.parallel.pipeline import Pipeline, rank_stages, split_layers, stages_per_rank

__all__ = ["parallelize_hf", "check_hf_layout", "pipeline_hf"]


def check_hf_layout(tp: int, *, cp: int = 1, model_type: str | None = None) -> None:
    """Refuse a layout the Hugging Face path cannot run (one line, before anything runs)."""
    if tp > 1:
        raise ConfigError(
            f"parallel.tp={tp} with model.hf: tensor parallelism is not wired up for Hugging "
            "Face models; use parallel.tp=1 (parallel.dp and parallel.cp work)"
        )
    if model_type in LINEAR_ATTENTION_TYPES and cp > 1:
        raise ConfigError(
            f"parallel.cp={cp} with a {model_type} model: its linear-attention layers carry a "
            "recurrent state along the sequence, which context parallelism does not pass "
            "between ranks; use parallel.cp=1"
        )


def parallelize_hf(
    model: nn.Module,
    dims: ParallelDims,
    *,
    compile: bool = False,
    verbose: bool = True,
    mixed_precision: torch.dtype | None = None,
    device_type: str | None = None,
) -> Callable:
    """Make ``model`` (an :class:`~multitoken.mtp_model.MTPModel` on an
    :class:`~multitoken.hf.HFDecoder`) parallel over ``dims`` in place: CP -> compile -> FSDP2
    (gathering the parameters in ``mixed_precision``, as
    :func:`~multitoken.models.parallelize.parallelize_gpt`). Returns the cross-entropy to pass
    to :func:`~multitoken.mtp_model.step_loss`. ``device_type`` is where it trains (None = where
    its weights are): a model on the meta device, materialised after FSDP2 shards it
    (:mod:`multitoken.hf.meta`), says where it will train."""
    check_hf_layout(dims.tp)
    if dims.cp > 1:
        apply_cp(model, dims.cp_group)
    if compile:
        depths = [] if model.mtp is None else list(model.mtp.depths)
        device_type = device_type or model.head_weight.device.type
        compile_modules([*model.decoder.layers, *depths], device_type, verbose)
    if dims.token_world_size > 1:
        apply_fsdp(model, dims.fsdp_mesh, param_dtype=mixed_precision)
    return linear_cross_entropy


def pipeline_hf(
    model: nn.Module,
    dims: ParallelDims,
    schedule: str,
    microbatches: int,
    *,
    layers: tuple[int, ...] = (),
    device: torch.device | str = "cpu",
) -> Pipeline:
    """Cut a heads-only ``model`` (an :class:`~multitoken.mtp_model.MTPModel` on an
    :class:`~multitoken.hf.HFDecoder` with ``mtp.freeze_base``, the same weights on every rank)
    into this rank's pipeline stages (:func:`~multitoken.hf.pipeline.prune_hf_model`: in place,
    parameter names unchanged) and return the :class:`~multitoken.parallel.pipeline.Pipeline`
    that runs them, as :func:`~multitoken.models.parallelize.pipeline_gpt` does for the
    reference GPT. One rank per stage: no data, context or tensor parallelism with it.

    No embedding group: neither embedding copy trains (the backbone is frozen), so there is
    no gradient to sum and the copies stay equal.
    """
    if dims.world_size != dims.pp:
        raise ConfigError(
            f"a Hugging Face pipeline runs one rank per stage: parallel.pp={dims.pp} alone, "
            "with parallel.dp, parallel.cp and parallel.tp at 1"
        )
    pp, n_stages = dims.pp, dims.pp * stages_per_rank(schedule)
    counts = split_layers(model.decoder.num_layers, n_stages, layers)
    stages = rank_stages(schedule, pp, dims.pp_rank)
    prune_hf_model(model, stages, counts)
    modules = [HFStage(model, s, n_stages, counts) for s in stages]
    return Pipeline(modules, stages, n_stages, schedule, microbatches, dims.pp_group, None, device)
