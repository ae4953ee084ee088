"""The collectives of a data- and context-parallel step: normalise, sync gradients, log.

Normalisation is global (DESIGN.md section 4): every rank divides its local loss sum by the
number of valid targets summed over the DP x CP group, per depth. Summing the ranks' losses
then gives the unsharded loss, and summing their gradients gives its gradient, so the gradient
sync is a plain sum. A rank without a valid target at some depth contributes ``0 / N = 0``.

Every function takes its process group explicitly; ``group=None`` means "not distributed" and
skips the collective (never the default world group).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from multitoken.lookahead import IGNORE_INDEX
from multitoken.parallel.halo import ShardMismatchError, check_cp_group

__all__ = ["global_normalizer", "sync_gradients", "reduce_metrics"]


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def global_normalizer(depth_labels, group: dist.ProcessGroup | None, ignore_index=IGNORE_INDEX):
    """``[D + 1]`` int64 valid-target counts per depth, summed over ``group`` (one all_reduce).

    Args:
        depth_labels: ``[D + 1, B, T]`` targets of this rank, or a
            :class:`~multitoken.parallel.context.CPShard`. A shard is counted without its
            halo (so the fallback exchange may come later) and the same all_reduce checks that
            the CP peers sharded the same plan: make it the step's first collective, and
            ranks fed different batches fail together here instead of aborting inside a
            collective of mismatched sizes.
        group: the DP x CP group (or the CP group); None = this rank only.
        ignore_index: the "no target" label (tensor input only; a shard knows its own).

    Raises:
        ShardMismatchError: on every rank, when some CP peers disagree on the plan.

    Example (one rank, depth 1)::

        >>> global_normalizer(torch.tensor([[[5, -100, 7]], [[-100, -100, 2]]]), None)
        tensor([2, 1])
    """
    from multitoken.parallel.context import CPShard  # context imports this module

    check = None
    if isinstance(depth_labels, CPShard):
        shard = depth_labels
        counts = shard.target_counts()
        check = (shard.plan.fingerprint(), shard.cp_size, shard.cp_rank)
    else:
        if not isinstance(depth_labels, Tensor) or depth_labels.dim() not in (2, 3):
            raise ValueError("depth_labels must be a [D + 1, B, T] tensor or a CPShard")
        labels = depth_labels if depth_labels.dim() == 3 else depth_labels[None]
        counts = (labels != ignore_index).sum((1, 2))
    if group is None:
        return counts
    if check is None:
        dist.all_reduce(counts, group=group)
        return counts
    fingerprint, cp, cp_rank = check
    check_cp_group(group, cp, cp_rank, "global_normalizer")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    # One slot per DP replica holds the sum and the sum of squares of its CP ranks'
    # fingerprints: n * sum(h^2) == sum(h)^2 iff they are all equal (exact in int64).
    replicas, slot = size // cp, rank // cp
    depths = counts.numel()
    vec = torch.zeros(depths + 2 * replicas, dtype=torch.long, device=counts.device)
    vec[:depths] = counts
    vec[depths + slot] = fingerprint
    vec[depths + replicas + slot] = fingerprint * fingerprint
    dist.all_reduce(vec, group=group)
    sums, squares = vec[depths : depths + replicas], vec[depths + replicas :]
    bad = torch.nonzero(cp * squares != sums * sums).view(-1).tolist()
    if bad:
        raise ShardMismatchError(
            f"the CP ranks of data-parallel replica(s) {bad} hold shards of different plans: "
            "every rank of a CP group must shard the same global batch with the same cp_size"
        )
    return vec[:depths]


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
    dtypes = {p.dtype for p in params}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    flat = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
            for p in params
        ]
    )
    dist.all_reduce(flat, group=group)
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        chunk = chunk.view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)


def reduce_metrics(
    output, group: dist.ProcessGroup | None, extra: Mapping[str, float | Tensor] | None = None
) -> dict[str, float]:
    """Step metrics as sums over ``group`` (one all_reduce), ratios as sum / sum.

    Args:
        output: a ``GPTOutput`` or ``DepthLosses`` of this rank (``loss``, ``depth_loss``,
            ``depth_tokens``, ``depth_correct``), computed with the global normaliser so that
            its losses are this rank's share of the global ones.
        group: the DP x CP group; None = this rank only.
        extra: more numbers to sum over ranks (e.g. ``{"documents": n}``).

    Returns:
        ``loss`` (the global loss), per depth ``loss/<d>``, ``tokens/<d>`` and
        ``accuracy/<d>`` = sum of hits / sum of tokens (0 where a depth has no target), with
        ``<d>`` = ``main``, ``depth1``, ..., and every key of ``extra`` summed.
    """
    depth_loss = output.depth_loss.detach().double()
    names = ["main"] + [f"depth{k}" for k in range(1, depth_loss.numel())]
    extra = dict(extra or {})
    device = depth_loss.device
    parts = [
        output.loss.detach().double().view(1),
        depth_loss,
        output.depth_tokens.double(),
        output.depth_correct.double(),
        torch.tensor([float(v) for v in extra.values()], dtype=torch.float64, device=device),
    ]
    vec = torch.cat(parts)
    if _size(group) > 1:
        dist.all_reduce(vec, group=group)
    n = depth_loss.numel()
    losses, tokens, correct = vec[1 : 1 + n], vec[1 + n : 1 + 2 * n], vec[1 + 2 * n : 1 + 3 * n]
    loss = vec[0]
    metrics = {"loss": float(loss)}
    for i, name in enumerate(names):
        metrics[f"loss/{name}"] = float(losses[i])
        metrics[f"tokens/{name}"] = float(tokens[i])
        metrics[f"accuracy/{name}"] = float(correct[i]) / max(float(tokens[i]), 1.0)
    for i, key in enumerate(extra):
        metrics[key] = float(vec[1 + 3 * n + i])
    return metrics
