"""The collectives of a data- and context-parallel step: normalise, sync gradients, log.

Normalisation is global (docs/design.md#context-parallelism): every rank divides its local loss sum
by the
number of valid targets summed over the DP x CP group, per depth. Summing the ranks' losses
then gives the unsharded loss, and summing their gradients gives its gradient, so the gradient
sync is a plain sum. A rank without a valid target at some depth contributes ``0 / N = 0``.

Every function takes its process group explicitly; ``group=None`` means "not distributed" and
skips the collective (never the default world group).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from multitoken.errors import InputError, renamed_kwarg, validation_enabled
from multitoken.lookahead import IGNORE_INDEX
from multitoken.mtp import DepthLosses
from multitoken.parallel.context import CPShard
from multitoken.parallel.halo import ShardMismatchError, check_cp_group

__all__ = ["global_normalizer", "sync_gradients", "MetricSums", "ReducedMetrics"]


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def global_normalizer(
    depth_labels,
    group: dist.ProcessGroup | None,
    ignore_index=IGNORE_INDEX,
    *,
    tp_size: int = 1,
    device: torch.device | str | None = None,
):
    """``[D + 1]`` int64 valid-target counts per depth, summed over ``group`` (one all_reduce).

    Args:
        depth_labels: ``[D + 1, B, T]`` targets of this rank, or a
            :class:`~multitoken.parallel.context.CPShard`. A shard is counted without its
            halo (so the fallback exchange may come later) and the same all_reduce checks that
            the CP peers sharded the same plan: make it the step's first collective, and
            ranks fed different batches fail together here instead of aborting inside a
            collective of mismatched sizes.
        group: the DP x CP group (or the CP group); None = this rank only. Never a group
            with tensor-parallel peers: they hold the same tokens, so they would be counted
            twice.
        ignore_index: the "no target" label (tensor input only; a shard knows its own).
        tp_size: the mesh's tensor-parallel size (to check a shard's group, see
            :func:`~multitoken.parallel.halo.check_cp_group`).
        device: where the counts are reduced (an NCCL group reduces device tensors): the
            batch may be counted on the host, where it was sharded; None = the batch's device.

    With value checks off (:func:`~multitoken.errors.set_validation`) the plan fingerprints
    still travel but are not read back: reading them is a host sync on a GPU.

    Raises:
        ShardMismatchError: on every rank, when some CP peers disagree on the plan.

    Example (one rank, D = 1)::

        >>> global_normalizer(torch.tensor([[[5, -100, 7]], [[-100, -100, 2]]]), None)
        tensor([2, 1])
    """
    check = None
    if isinstance(depth_labels, CPShard):
        shard = depth_labels
        counts = shard.target_counts()
        check = (shard.plan.fingerprint(), shard.cp_size, shard.cp_rank)
    else:
        if not isinstance(depth_labels, Tensor) or depth_labels.dim() not in (2, 3):
            raise InputError("depth_labels must be a [D + 1, B, T] tensor or a CPShard")
        labels = depth_labels if depth_labels.dim() == 3 else depth_labels[None]
        counts = (labels != ignore_index).sum((1, 2))
    if device is not None and torch.device(device).type == "cuda" and counts.device.type == "cpu":
        # Pinned: a copy from pageable memory would wait for the device's queue first.
        counts = counts.pin_memory().to(device, non_blocking=True)
    elif device is not None:
        counts = counts.to(device)
    if group is None:
        return counts
    if check is None:
        dist.all_reduce(counts, group=group)
        return counts
    fingerprint, cp, cp_rank = check
    check_cp_group(group, cp, cp_rank, "global_normalizer", tp_size)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    # One slot per DP replica holds the sum and the sum of squares of its CP ranks'
    # fingerprints: n * sum(h^2) == sum(h)^2 iff they are all equal (exact in int64).
    replicas, slot = size // cp, rank // cp
    n_counts = counts.numel()  # D + 1
    vec = torch.zeros(n_counts + 2 * replicas, dtype=torch.long, device=counts.device)
    vec[:n_counts] = counts
    vec[n_counts + slot] = fingerprint
    vec[n_counts + replicas + slot] = fingerprint * fingerprint
    dist.all_reduce(vec, group=group)
    if not validation_enabled():
        return vec[:n_counts]
    sums, squares = vec[n_counts : n_counts + replicas], vec[n_counts + replicas :]
    bad = torch.nonzero(cp * squares != sums * sums).view(-1).tolist()
    if bad:
        raise ShardMismatchError(
            f"the CP ranks of data-parallel replica(s) {bad} hold shards of different plans: "
            "every rank of a CP group must shard the same global batch with the same cp_size"
        )
    return vec[:n_counts]


def sync_gradients(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Sum every parameter gradient over ``group`` (the DP x CP group) in ONE all_reduce.

    The gradients are flattened into one buffer (fp32 when parameter dtypes differ), so the
    cost is one collective per step whatever the number of parameters. A missing gradient
    counts as zero, so ranks that skipped a parameter still send buffers of the same size.
    Sums, not means: the loss is already normalised by the global target count.
    """
    if _size(group) == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    # Under tensor parallelism a gradient is a DTensor: its local shard is what the ranks
    # holding the same shard (the DP x CP group) sum.
    grads = [_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p)) for p in params]
    dtypes = {g.dtype for g in grads}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
    dist.all_reduce(flat, group=group)
    for p, grad, part in zip(params, grads, flat.split([g.numel() for g in grads])):
        part = part.view_as(grad).to(grad.dtype)
        if p.grad is None and isinstance(p, DTensor):
            p.grad = DTensor.from_local(part.clone(), p.device_mesh, p.placements)
        elif p.grad is None:
            p.grad = part.clone()
        else:
            grad.copy_(part)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: writing to it writes the DTensor); else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


class ReducedMetrics(NamedTuple):
    """Per-depth metrics over ranks (:meth:`MetricSums.reduce_all`); lists are main first.

    ``agree`` and ``accept`` are per MTP depth (depth 1 first), None when no step since the
    last reduction measured them.
    """

    losses: list[float]
    accuracies: list[float]
    tokens: list[float]
    agree: list[float] | None
    accept: list[float] | None


class MetricSums:
    """Per-depth loss sums, valid targets and top-1 hits over steps, reduced sum/sum over ranks.

    The one way metrics are reduced: every rank adds its share of each step, and
    :meth:`reduce` sums the three vectors over the group in one all_reduce and divides once, so
    the logged loss is the unsharded loss (never a mean of per-rank ratios). The sums stay on
    the outputs' device (an NCCL group reduces only device tensors; no per-step host sync).
    The steps that measured acceptance (:attr:`~multitoken.mtp.DepthLosses.agree`) add their
    agreements, acceptance sums and valid targets too, divided by those steps' targets only.

    Example (one rank, D = 1)::

        >>> sums = MetricSums(num_depths=1)
        >>> sums.add(losses)                    # a DepthLosses, after each step
        >>> losses, accuracies, tokens = sums.reduce(group)   # at a logging step; resets
    """

    @renamed_kwarg("depth", "num_depths")
    def __init__(self, num_depths: int, device: torch.device | str = "cpu"):
        # Rows: loss sums, targets, top-1 hits; agreements, acceptance, targets of the steps
        # that measured them (column 0, the main head, stays 0 in those three).
        self.sums = torch.zeros(6, num_depths + 1, dtype=torch.float64, device=device)
        self.measured = False

    def add(self, losses: DepthLosses) -> None:
        """Add one step's local loss sums, valid targets and top-1 hits per depth (and its
        agreements and acceptance, when it measured them)."""
        self.sums[0] += losses.loss_sum.double()
        self.sums[1] += losses.depth_tokens.double()
        self.sums[2] += losses.depth_correct.double()
        if losses.agree is not None and losses.accept is not None:
            self.sums[3, 1:] += losses.agree.double()
            self.sums[4, 1:] += losses.accept.double()
            self.sums[5, 1:] += losses.depth_tokens[1:].double()
            self.measured = True

    def reduce(
        self, group: dist.ProcessGroup | None
    ) -> tuple[list[float], list[float], list[float]]:
        """``(losses, accuracies, tokens)`` per depth (main first) over the group; resets."""
        return self.reduce_all(group)[:3]

    def reduce_all(self, group: dist.ProcessGroup | None) -> ReducedMetrics:
        """Every metric over the group, in one all_reduce; resets.

        Every rank must call it having measured acceptance on the same steps (the trainer
        measures on logging steps, the same on every rank).
        """
        sums = self.sums.clone()
        if _size(group) > 1:
            dist.all_reduce(sums, group=group)  # one message for every metric
        sums = sums.cpu()
        tokens = sums[1].clamp(min=1)
        agree = accept = None
        if self.measured:
            measured = sums[5, 1:].clamp(min=1)
            agree = (sums[3, 1:] / measured).tolist()
            accept = (sums[4, 1:] / measured).tolist()
        self.sums.zero_()
        self.measured = False
        losses, accs = (sums[0] / tokens).tolist(), (sums[2] / tokens).tolist()
        return ReducedMetrics(losses, accs, sums[1].tolist(), agree, accept)
