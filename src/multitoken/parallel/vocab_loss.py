"""Cross-entropy through a vocabulary-parallel head, chunked over tokens (tensor parallelism).

Under tensor parallelism the output head (the embedding, when tied) is sharded by vocabulary
rows: TP rank r holds rows ``[r * V / tp, (r + 1) * V / tp)`` and every rank of the TP group
holds the same (replicated) hidden states. :class:`VocabParallelCrossEntropy` is the drop-in
for :func:`~multitoken.loss.linear_cross_entropy` in that layout: each rank walks the tokens
in chunks of at most ``chunk_elements`` logits of *its* vocabulary shard (so no rank ever holds
``[tokens, V / tp]`` logits), keeping per token only a few floats:

    local max m_r, sum_r = sum_v exp(logit_v - m_r), target logit (where r owns the target),
    "my top-1 is the target"

and one all-gather of those ``[tokens, 5]`` floats over the TP group gives every rank the
global log-sum-exp ``M + log(sum_r sum_r * exp(m_r - M))``, the target logit and the top-1 hit
(the first rank holding the global max decides, as ``max`` picks the first index). That is one
collective per call in the forward instead of two per chunk (MAX, then SUM).

The backward recomputes each chunk's local logits from the saved global log-sum-exp:
``grad_logits = softmax - onehot`` restricted to the shard, so the weight shard's gradient is
complete and stays local, while the hidden states' gradient is a partial sum over the shards,
summed with one all-reduce over the TP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from multitoken.errors import InputError
from multitoken.loss import (
    LossStats,
    chunk_elements_for,
    chunk_logits,
    chunk_rows,
    chunked_backward,
    compute_dtype,
    flat_loss_inputs,
)
from multitoken.parallel.kv_gather import all_gather_into
from multitoken.parallel.vocab_distill import (
    vocab_parallel_acceptance,
    vocab_parallel_distillation,
)

__all__ = ["VocabParallelCrossEntropy"]

# Columns of the per-token statistics every rank contributes.
_MAX, _SHIFT, _SUMEXP, _TARGET, _HIT = range(5)


def _local_stats(hidden, weight, targets, owned, rows, dtype) -> Tensor:
    """``[N, 5]`` per-token statistics of this rank's vocabulary shard (module docstring)."""
    n_tokens, vocab_local = hidden.shape[0], weight.shape[0]
    stats = torch.zeros(n_tokens, 5, dtype=torch.float32, device=hidden.device)
    buffer = hidden.new_empty((rows, vocab_local), dtype=torch.float32)  # one chunk of logits
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        logits = chunk_logits(hidden[start:stop].to(dtype), weight, buffer)  # (C, V / tp)
        tgt = targets[start:stop]
        picked = logits.gather(1, tgt[:, None]).squeeze(1)
        row_max, top1 = logits.max(dim=-1)
        # As torch.logsumexp: an infinite max is replaced by 0 so that inf - inf is no NaN.
        shift = row_max.masked_fill(row_max.abs() == float("inf"), 0.0)
        sumexp = logits.sub_(shift[:, None]).exp_().sum(dim=-1)
        mine = owned[start:stop]
        chunk = stats[start:stop]
        chunk[:, _MAX], chunk[:, _SHIFT], chunk[:, _SUMEXP] = row_max, shift, sumexp
        chunk[:, _TARGET] = torch.where(mine, picked, 0.0)
        chunk[:, _HIT] = (mine & (top1 == tgt)).float()
    return stats


def _combine(gathered: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``(lse, target_logit, hit)`` per token from every rank's ``[tp, N, 5]`` stats."""
    shift = gathered[..., _SHIFT]  # (tp, N)
    top = shift.max(dim=0).values  # (N,)
    lse = top + (gathered[..., _SUMEXP] * (shift - top).exp()).sum(0).log()
    target_logit = gathered[..., _TARGET].sum(0)  # only the owner's entry is non-zero
    row_max = gathered[..., _MAX]
    # The first rank holding the global max has the global top-1 (its own first index).
    first = (row_max == row_max.max(dim=0).values).int().argmax(dim=0)  # (N,)
    hit = gathered[..., _HIT].gather(0, first[None]).squeeze(0) > 0
    return lse, target_logit, hit


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, valid, vocab_start, group, chunk_elements):
        # hidden (N, H) replicated over the group, weight (V / tp, H) this rank's rows,
        # targets (N,) global ids (0 where not valid).
        n_tokens, vocab_local = hidden.shape[0], weight.shape[0]
        dtype = compute_dtype(hidden, weight)
        w = weight.to(dtype)
        rows = min(chunk_rows(vocab_local, chunk_elements), max(n_tokens, 1))
        local_targets = targets - vocab_start
        owned = valid & (local_targets >= 0) & (local_targets < vocab_local)
        local_targets = torch.where(owned, local_targets, torch.zeros_like(local_targets))
        stats = _local_stats(hidden, w, local_targets, owned, rows, dtype)  # (N, 5)
        tp = dist.get_world_size(group)
        gathered = stats.new_empty((tp * n_tokens, 5))  # rank after rank along dim 0
        all_gather_into(gathered, stats, group)
        lse, target_logit, hit = _combine(gathered.view(tp, n_tokens, 5))
        loss_sum = torch.where(valid, lse - target_logit, 0.0).sum()
        correct = (hit & valid).sum()
        ctx.save_for_backward(hidden, weight, local_targets, owned, valid, lse)
        ctx.rows, ctx.dtype, ctx.group = rows, dtype, group
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        hidden, weight, local_targets, owned, valid, lse = ctx.saved_tensors
        row_scale = valid.float() * grad_loss.float()  # (N,)
        # softmax - onehot(t) on this shard's columns: the one-hot only where it owns t.
        grad_h, grad_w = chunked_backward(
            hidden, weight, local_targets, -owned.float(), lse, row_scale, ctx.rows, ctx.dtype,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        if grad_h is not None:
            # Each shard's columns contribute a partial sum of d loss / d hidden.
            dist.all_reduce(grad_h, group=ctx.group)
        return grad_h, grad_w, None, None, None, None, None


def _local_rows(weight: Tensor) -> Tensor:
    """This rank's ``[V / tp, H]`` rows of a head given as them or as a row-sharded DTensor."""
    if isinstance(weight, DTensor):
        if tuple(weight.placements) != (Shard(0),):
            raise InputError(
                f"the head must be sharded by vocabulary rows (Shard(0)) over the TP group, "
                f"got placements {weight.placements}"
            )
        return weight.to_local()  # differentiable: the gradient comes back as Shard(0)
    return weight


class VocabParallelCrossEntropy:
    """:func:`~multitoken.loss.linear_cross_entropy` for a head sharded by vocabulary rows.

    Returned by :func:`~multitoken.models.parallelize.apply_tp` for the step to pass; a class
    rather than a closure so the model stays picklable and prints its group.

    Args:
        group: the TP group; rank r of it holds vocabulary rows ``[r * V / tp, (r + 1) * V / tp)``.

    Example (2 TP ranks, ``w`` the full ``[V, H]`` head, ``h`` the same on both)::

        >>> ce = VocabParallelCrossEntropy(tp_group)
        >>> stats = ce(h, w.chunk(2)[tp_rank], targets)
        >>> torch.allclose(stats.loss_sum, F.cross_entropy(h @ w.T, targets, reduction="sum"))
        True
    """

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        ignore_index: int = -100,
        chunk_elements: int = 0,
    ) -> LossStats:
        """Summed cross-entropy of the replicated ``hidden [..., H]`` against ``targets [...]``.

        Args:
            hidden: ``[..., H]`` hidden states, the same on every rank of the group.
            weight: this rank's ``[V / tp, H]`` rows of the head, or the head as a DTensor
                sharded by rows (``Shard(0)``) over the group.
            targets: ``[...]`` global token ids, ``ignore_index`` where there is no target.
            ignore_index: the "no target" value.
            chunk_elements: at most this many logits of the shard exist at once; 0 = the
                device's default (:func:`~multitoken.loss.chunk_elements_for`).

        Returns:
            :class:`~multitoken.loss.LossStats`, the same on every rank of the group.
        """
        weight = _local_rows(weight)
        vocab = weight.shape[0] * dist.get_world_size(self.group)
        flat_h, flat_t = flat_loss_inputs(hidden, weight, targets, vocab, ignore_index)
        valid = flat_t != ignore_index
        safe = torch.where(valid, flat_t, torch.zeros_like(flat_t))
        vocab_start = dist.get_rank(self.group) * weight.shape[0]
        loss_sum, correct = _VocabParallelCrossEntropy.apply(
            flat_h,
            weight,
            safe,
            valid,
            vocab_start,
            self.group,
            chunk_elements_for(flat_h.device, chunk_elements),
        )
        return LossStats(loss_sum, valid.sum(), correct)

    def distillation(self, student: Tensor, teacher: Tensor, weight: Tensor, targets: Tensor,
                     kind: str, **kwargs) -> LossStats:  # fmt: skip
        """:func:`~multitoken.distill.linear_distillation` through this sharded head
        (:func:`~multitoken.parallel.vocab_distill.vocab_parallel_distillation`)."""
        return vocab_parallel_distillation(
            student, teacher, _local_rows(weight), targets, kind, self.group, **kwargs
        )

    def acceptance(self, student: Tensor, teacher: Tensor, weight: Tensor, valid: Tensor,
                   chunk_elements: int = 0) -> tuple[Tensor, Tensor]:  # fmt: skip
        """:func:`~multitoken.distill.acceptance_sums` through this sharded head
        (:func:`~multitoken.parallel.vocab_distill.vocab_parallel_acceptance`)."""
        return vocab_parallel_acceptance(
            student, teacher, _local_rows(weight), valid, self.group, chunk_elements
        )

    def __repr__(self) -> str:
        ranks = dist.get_process_group_ranks(self.group)
        return f"VocabParallelCrossEntropy(ranks={ranks})"
