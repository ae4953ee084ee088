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
from multitoken.loss import linear_cross_entropy
from multitoken.parallel.compile import compile_modules
from multitoken.parallel.dims import ParallelDims
from multitoken.parallel.fsdp import apply_fsdp
from multitoken.parallel.kv_gather import apply_cp

__all__ = ["parallelize_hf", "check_hf_layout"]


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
