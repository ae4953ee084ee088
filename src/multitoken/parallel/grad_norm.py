"""Gradient-norm clipping over parameters sharded on different meshes (TP, FSDP2, both).

``torch.nn.utils.clip_grad_norm_`` needs every gradient on one mesh: under tensor parallelism
the norms' gradients are plain tensors next to DTensor ones, and under FSDP2 + TP the
TP-sharded weights live on the 2-D ``(dp_cp, tp)`` mesh while the others live on ``dp_cp``
alone. Here each gradient contributes the squared sum of its *local* shard, summed over the
mesh dims along which it is sharded (never over a dim where it is replicated: TP peers hold
equal copies of a replicated weight's gradient, and so do the replicas of HSDP, whose
gradients are ``(Replicate(), Shard(0))`` on the ``(dp_replicate, dp_shard x cp)`` mesh).
Gradients sharded the same way share one all-reduce per mesh dim of more than one rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

__all__ = ["grad_norm", "clip_grad_norm"]


def _shard_groups(grad: Tensor) -> tuple[dist.ProcessGroup, ...]:
    """The groups of the mesh dims of more than one rank that ``grad`` is sharded along (empty
    for a plain tensor)."""
    if not isinstance(grad, DTensor):
        return ()
    if any(placement.is_partial() for placement in grad.placements):
        raise ValueError(f"a gradient with pending sums ({grad.placements}): reduce it first")
    # Not "is_shard()": FSDP2 + TP shards along dp_cp with _StridedShard, which is no Shard.
    mesh = grad.device_mesh
    return tuple(
        mesh.get_group(dim)
        for dim, placement in enumerate(grad.placements)
        if not placement.is_replicate() and mesh.size(dim) > 1
    )


def grad_norm(
    parameters: Iterable[nn.Parameter], device: torch.device | str | None = None
) -> Tensor:
    """The L2 norm of all gradients of ``parameters`` as one unsharded vector (fp32 scalar).

    Collective over the groups the gradients are sharded on: call it on every rank. Ranks
    iterate the parameters in the same order, so they issue the same all-reduces.

    Args:
        parameters: the parameters (those without a gradient count 0).
        device: where the norm of no gradient at all lives (the model's device, so that it
            stacks with the trainer's other flags); None = the first parameter's, else CPU.
    """
    parameters = list(parameters)
    # Shard group names -> (those groups, the squared sum of their gradients' local shards).
    squares: dict[tuple, tuple[tuple, Tensor]] = {}
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        groups = _shard_groups(grad)
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        key = tuple(group.group_name for group in groups)
        if key not in squares:
            squares[key] = (groups, torch.zeros((), dtype=torch.float32, device=local.device))
        squares[key][1].add_(local.detach().float().pow(2).sum())
    total = None
    for groups, square in squares.values():
        for group in groups:
            dist.all_reduce(square, group=group)
        total = square if total is None else total + square
    if total is None:
        if device is None:
            device = parameters[0].device if parameters else "cpu"
        return torch.zeros((), dtype=torch.float32, device=device)
    return total.sqrt()


def clip_grad_norm(
    parameters: Iterable[nn.Parameter], max_norm: float, device: torch.device | str | None = None
) -> Tensor:
    """Scale the gradients so that their global L2 norm is at most ``max_norm``.

    The drop-in for ``torch.nn.utils.clip_grad_norm_`` (same scaling rule) under tensor
    parallelism and FSDP2. Returns the norm before clipping (on ``device`` when no parameter
    has a gradient, see :func:`grad_norm`).
    """
    parameters = list(parameters)
    params = [p for p in parameters if p.grad is not None]
    if device is None and parameters:
        device = parameters[0].device
    norm = grad_norm(params, device)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for param in params:
            grad = param.grad
            local = grad.to_local() if isinstance(grad, DTensor) else grad  # a view
            local.mul_(scale.to(local.dtype))
    return norm
