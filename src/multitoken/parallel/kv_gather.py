"""``apply_cp(model, cp_group)``: context parallelism's attention, applied from outside.

Under CP each rank holds a shard of every row (:mod:`.context`). Attention is the only layer
that mixes tokens, and it only needs the keys and values of the whole row: every
:class:`~multitoken.models.attention.Attention` gets a ``kv_gather`` hook that all-gathers its
rotated K and V over the CP group along the sequence dim (reduce-scatter in the backward),
while the queries stay local and the mask is built from global positions and document ids
(``kv_layout``). This is the approach Llama 3 used at 128k context: it supports document masks
and grouped-query attention directly, and with GQA only the KV heads travel.

The model never imports ``torch.distributed``; this module sets the hooks. It knows no model's
attribute names: it looks for modules that declare the hook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from multitoken.errors import InputError

__all__ = [
    "apply_cp",
    "SequenceGather",
    "gather_sequence",
    "all_gather_into",
    "reduce_scatter_into",
]


def all_gather_into(out: Tensor, x: Tensor, group: dist.ProcessGroup) -> None:
    # all_gather_single is the torch >= 2.10 name; the older one warns there.
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, x, group=group)
    else:
        dist.all_gather_into_tensor(out, x, group=group)


def reduce_scatter_into(out: Tensor, x: Tensor, group: dist.ProcessGroup) -> None:
    if hasattr(dist, "reduce_scatter_single"):
        dist.reduce_scatter_single(out, x, group=group)
    else:
        dist.reduce_scatter_tensor(out, x, group=group)


class _GatherSequence(torch.autograd.Function):
    """All-gather along ``dim`` forward; reduce-scatter (sum) of the gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        world = dist.get_world_size(group)
        # Collectives concatenate along dim 0; move the sequence there and back.
        local = x.movedim(dim, 0).contiguous()  # (T, ...)
        out = local.new_empty((world * local.shape[0], *local.shape[1:]))  # (cp * T, ...)
        all_gather_into(out, local, group)
        return out.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        world = dist.get_world_size(ctx.group)
        full = grad.movedim(ctx.dim, 0).contiguous()  # (cp * T, ...)
        out = full.new_empty((full.shape[0] // world, *full.shape[1:]))
        reduce_scatter_into(out, full, ctx.group)
        return out.movedim(0, ctx.dim), None, None


def gather_sequence(x: Tensor, group: dist.ProcessGroup, dim: int = 2) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in rank order, differentiably.

    The gradient of the result is summed over the ranks and each rank gets the slice of its
    own input, so gradients of the gathered keys computed by every rank's queries flow back.

    Example (2 ranks, ``x = [[r, r]]`` on rank r)::

        >>> gather_sequence(x, cp_group, dim=1)
        tensor([[0, 0, 1, 1]])
    """
    return _GatherSequence.apply(x, group, dim)


class SequenceGather:
    """The ``Attention.kv_gather`` hook: ``[B, Hkv, T_local, d] -> [B, Hkv, cp * T_local, d]``.

    A class rather than a closure so the model stays picklable and the hook prints its group.
    """

    def __init__(self, group: dist.ProcessGroup, dim: int = 2):
        self.group, self.dim = group, dim

    def __call__(self, x: Tensor) -> Tensor:
        return gather_sequence(x, self.group, self.dim)

    def __repr__(self) -> str:
        ranks = dist.get_process_group_ranks(self.group)
        return f"SequenceGather(ranks={ranks}, dim={self.dim})"


def apply_cp(model: nn.Module, cp_group: dist.ProcessGroup | None) -> nn.Module:
    """Apply context parallelism's attention to ``model`` in place and return it.

    Sets ``kv_gather`` on every attention module that declares the hook (an attribute named
    ``kv_gather``: the reference :class:`~multitoken.models.attention.Attention`, and every
    attention module of a Hugging Face model wrapped by :class:`~multitoken.hf.HFDecoder`), main
    layers and MTP depths, to an all-gather over ``cp_group``; with ``cp_group`` None (or of one
    rank) it clears the hooks. Feed the model :meth:`CPShard.step_batch` so the mask sees the
    gathered keys' layout.

    Args:
        model: any module containing attention modules that declare ``kv_gather``.
        cp_group: the CP group (:attr:`~multitoken.parallel.dims.ParallelDims.cp_group`), or
            None.
    """
    hook = None
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        hook = SequenceGather(cp_group, dim=3)  # [2 (K, V), B, Hkv, T, d]
    found = 0
    for module in model.modules():
        if hasattr(module, "kv_gather"):
            module.kv_gather = hook
            found += 1
    if hook is not None and not found:
        raise InputError(
            f"apply_cp found no attention module with a kv_gather hook in "
            f"{type(model).__name__}: context parallelism would silently attend to local keys "
            "only; use parallel.cp=1"
        )
    return model
