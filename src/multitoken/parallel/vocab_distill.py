"""The acceptance-aware losses (``mtp.loss = kl|tv|lk``) through a vocabulary-parallel head.

The single-process :func:`~multitoken.distill.linear_distillation` under tensor parallelism
(docs/design.md#acceptance-aware-losses): TP rank r holds head rows ``[r V / tp, (r + 1) V /
tp)`` and every rank of the TP group the same (replicated) student and teacher hidden states.
Each rank walks the tokens in chunks of its shard's logits, as the cross-entropy does
(:mod:`.vocab_loss`), and per chunk:

- both softmaxes need the global log-sum-exp: each rank contributes its shard's max and
  ``sum exp(logit - max)`` for the student and the teacher, plus "my first top-1 is the
  target", in one all-gather of ``[rows, 5]`` floats over the TP group; every rank then
  combines them identically (``M + log sum_r s_r exp(m_r - M)``; the top-1 of the first rank
  holding the global max);
- with both log-sum-exps known, each rank's columns give a partial sum of the row loss (KL's
  ``sum_v p_v (log p_v - log q_v)``, TV's ``1/2 sum_v |p_v - q_v|``): the losses are summed
  locally and all-reduced once at the end.

Backward, per chunk: the gradient with respect to the student logits is ``q - p`` (KL) and
``q (s - <s, q>)`` with ``s = sign(q - p) / 2`` (TV): ``<s, q>`` sums over the whole
vocabulary, one all-reduce of ``[rows]`` per chunk (TV and LK only). The weight shard's
gradient is complete on its rank; the hidden states' is a partial sum over the shards,
all-reduced once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from multitoken.distill import DISTILL_LOSSES, grad_logits, paired_logit_chunks, row_losses
from multitoken.errors import InputError
from multitoken.loss import (
    LossStats,
    chunk_elements_for,
    chunk_logits,
    chunk_rows,
    compute_dtype,
    flat_loss_inputs,
)
from multitoken.parallel.kv_gather import all_gather_into

__all__ = ["vocab_parallel_acceptance", "vocab_parallel_distillation"]


def _shard_stats(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``(max, sum exp(logit - max))`` per row of this shard's ``[C, V / tp]`` logits."""
    row_max = logits.max(dim=-1).values
    shift = row_max.masked_fill(row_max.abs() == float("inf"), 0.0)
    return shift, (logits - shift[:, None]).exp().sum(dim=-1)


def _combine(shift: Tensor, sumexp: Tensor) -> Tensor:
    """The global log-sum-exp from every rank's ``[tp, C]`` shifts and sums."""
    top = shift.max(dim=0).values
    return top + (sumexp * (shift - top).exp()).sum(0).log()


def _chunk_lse(log_q, log_p, hit, group) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``(lse_q, lse_p, student top-1 hit)`` of a chunk: one all-gather over ``group``."""
    (shift_q, sum_q), (shift_p, sum_p) = _shard_stats(log_q), _shard_stats(log_p)
    stats = torch.stack([shift_q, sum_q, shift_p, sum_p, hit.float()], dim=1)  # (C, 5)
    tp = dist.get_world_size(group)
    gathered = stats.new_empty((tp * stats.shape[0], 5))
    all_gather_into(gathered, stats, group)
    g = gathered.view(tp, -1, 5)
    # The first rank holding the global max has the global first top-1.
    first = (g[..., 0] == g[..., 0].max(dim=0).values).int().argmax(dim=0)
    top1_hit = g[..., 4].gather(0, first[None]).squeeze(0) > 0
    return _combine(g[..., 0], g[..., 1]), _combine(g[..., 2], g[..., 3]), top1_hit


class _VocabParallelDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weight, valid, local_t, owned, kind, alpha, tau, group,
                chunk_elements):  # fmt: skip
        n_tokens, vocab_local = student.shape[0], weight.shape[0]
        dtype = compute_dtype(student, weight)
        w = weight.to(dtype)
        rows = max(1, min(chunk_rows(vocab_local, chunk_elements), n_tokens))
        lse_q = torch.zeros(n_tokens, dtype=torch.float32, device=student.device)
        lse_p, loss_sum = torch.zeros_like(lse_q), lse_q.new_zeros(())
        correct = torch.zeros((), dtype=torch.long, device=student.device)
        buf_q = student.new_empty((rows, vocab_local), dtype=torch.float32)
        buf_p = torch.empty_like(buf_q)
        for start in range(0, n_tokens, rows):
            stop = min(start + rows, n_tokens)
            log_q = chunk_logits(student[start:stop].to(dtype), w, buf_q).mul_(1.0 / tau)
            log_p = chunk_logits(teacher[start:stop].to(dtype), w, buf_p).mul_(1.0 / tau)
            hit = owned[start:stop] & (log_q.argmax(dim=-1) == local_t[start:stop])
            lq, lp, top1_hit = _chunk_lse(log_q, log_p, hit, group)
            lse_q[start:stop], lse_p[start:stop] = lq, lp
            log_q.sub_(lq[:, None])
            log_p.sub_(lp[:, None])
            mask = valid[start:stop]
            loss_sum += torch.where(mask, row_losses(log_q, log_p, kind, alpha), 0.0).sum()
            correct += (top1_hit & mask).sum()
        dist.all_reduce(loss_sum, group=group)  # every shard's columns' part
        ctx.save_for_backward(student, teacher, weight, valid, lse_q, lse_p)
        ctx.setup = (rows, dtype, kind, alpha, tau, group)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        student, teacher, weight, valid, lse_q, lse_p = ctx.saved_tensors
        rows, dtype, kind, alpha, tau, group = ctx.setup
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        w = weight.to(dtype)
        row_scale = valid.float() * (grad_loss.float() / tau)
        grad_h = torch.zeros_like(student) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        buf_q = student.new_empty((rows, weight.shape[0]), dtype=torch.float32)
        buf_p = torch.empty_like(buf_q)

        def reduce(inner: Tensor) -> None:
            dist.all_reduce(inner, group=group)

        for start in range(0, student.shape[0], rows):
            stop = min(start + rows, student.shape[0])
            h = student[start:stop]
            q = chunk_logits(h.to(dtype), w, buf_q)
            q.mul_(1.0 / tau).sub_(lse_q[start:stop, None]).exp_()
            p = chunk_logits(teacher[start:stop].to(dtype), w, buf_p)
            p.mul_(1.0 / tau).sub_(lse_p[start:stop, None]).exp_()
            # TV and LK: <s, q> summed over the whole vocabulary.
            grad = grad_logits(q, p, kind, alpha, reduce).to(dtype)
            scale = row_scale[start:stop, None]
            if need_h:
                grad_h[start:stop] = (grad @ w).mul_(scale.to(dtype))
            if need_w:
                grad_w.addmm_(grad.t().float(), h.float() * scale)
        if need_h:
            dist.all_reduce(grad_h, group=group)  # each shard's columns: a partial sum
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, None, grad_w, None, None, None, None, None, None, None, None


def vocab_parallel_distillation(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    targets: Tensor,
    kind: str,
    group: dist.ProcessGroup,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_elements: int = 0,
) -> LossStats:
    """:func:`~multitoken.distill.linear_distillation` with ``weight`` this rank's ``[V / tp,
    H]`` rows of the head (``student`` and ``teacher`` the same on every rank of ``group``).

    Returns the same :class:`~multitoken.loss.LossStats` on every rank of the group: the summed
    loss, the valid rows, the student's top-1 hits of ``targets`` (global ids)."""
    if kind not in DISTILL_LOSSES:
        raise InputError(f"kind must be one of {DISTILL_LOSSES}, got {kind!r}")
    if teacher.shape != student.shape:
        raise InputError(
            f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} disagree"
        )
    vocab = weight.shape[0] * dist.get_world_size(group)
    flat_s, flat_t = flat_loss_inputs(student, weight, targets, vocab, ignore_index)
    valid = flat_t != ignore_index
    local = flat_t - dist.get_rank(group) * weight.shape[0]
    owned = valid & (local >= 0) & (local < weight.shape[0])
    local = torch.where(owned, local, torch.zeros_like(local))
    loss_sum, correct = _VocabParallelDistillation.apply(
        flat_s, teacher.detach().reshape(flat_s.shape), weight, valid, local, owned, kind,
        float(alpha), float(temperature), group, chunk_elements_for(flat_s.device, chunk_elements),
    )  # fmt: skip
    return LossStats(loss_sum, valid.sum(), correct)


def vocab_parallel_acceptance(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    valid: Tensor,
    group: dist.ProcessGroup,
    chunk_elements: int = 0,
) -> tuple[Tensor, Tensor]:
    """:func:`~multitoken.distill.acceptance_sums` with ``weight`` this rank's ``[V / tp, H]``
    rows of the head: greedy agreements (each argmax the first global maximum) and the summed
    ``sum_v min(p_v, q_v)``, the same on every rank of ``group``. Per chunk one all-gather of
    ``[rows, 8]`` statistics; one all-reduce of the acceptance at the end. No gradient."""
    with torch.no_grad():
        first_col = dist.get_rank(group) * weight.shape[0]
        agree = torch.zeros((), dtype=torch.long, device=student.device)
        accept = torch.zeros((), dtype=torch.float64, device=student.device)
        tp = dist.get_world_size(group)
        for log_q, log_p, mask in paired_logit_chunks(
            student, teacher, weight, valid, chunk_elements
        ):
            columns = []
            for logits in (log_q, log_p):
                top, index = logits.max(dim=-1)
                shift, sumexp = _shard_stats(logits)
                columns += [shift, sumexp, top, (index + first_col).float()]
            stats = torch.stack(columns, dim=1).double()  # (C, 8)
            gathered = stats.new_empty((tp * stats.shape[0], 8))
            all_gather_into(gathered, stats, group)
            g = gathered.view(tp, -1, 8)
            lse, argmax = [], []
            for base in (0, 4):
                lse.append(_combine(g[..., base].float(), g[..., base + 1].float()))
                top = g[..., base + 2]
                first = (top == top.max(dim=0).values).int().argmax(dim=0)  # first rank
                argmax.append(g[..., base + 3].gather(0, first[None]).squeeze(0))
            agree += ((argmax[0] == argmax[1]) & mask).sum()
            log_q.sub_(lse[0][:, None])
            log_p.sub_(lse[1][:, None])
            both = torch.minimum(log_q, log_p, out=log_q).exp_().sum(dim=-1)
            accept += torch.where(mask, both, 0.0).sum(dtype=torch.float64)
        dist.all_reduce(accept, group=group)  # every shard's columns' part
        return agree, accept
