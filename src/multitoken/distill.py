"""Acceptance-aware MTP losses: a depth's distribution against the backbone's, chunked.

Depth k at position i is the *student* ``q = softmax(h^k_i W^T / tau)``; its *teacher* is the
backbone's next-token distribution at position i + k, ``p = softmax(h^0_{i+k} W^T / tau)``,
detached (docs/design.md#acceptance-aware-losses). Per valid row the losses are

- ``"kl"``: forward ``KL(p || q) = sum_v p_v (log p_v - log q_v)``;
- ``"tv"``: total variation ``TV(p, q) = 1/2 sum_v |p_v - q_v|`` (speculative sampling accepts
  a draft from q with probability ``sum_v min(p_v, q_v) = 1 - TV``);
- ``"lk"``: ``alpha * KL + (1 - alpha) * TV``.

As :func:`~multitoken.loss.linear_cross_entropy`, :func:`linear_distillation` walks the
tokens in chunks, keeps two floats per token (the student's and the teacher's log-sum-exp)
for the backward and recomputes both chunks of logits there: no ``[tokens, V]`` tensor exists,
the largest single allocation is bounded as the cross-entropy's (a chunk holds a student, a
teacher and one scratch ``[rows, V]`` buffer at once). It returns a *sum* over valid rows.

:func:`acceptance_sums` measures what the losses aim at, with the same chunks and no gradient:
per depth, how often the student's argmax is the teacher's (greedy agreement) and the expected
acceptance of speculative sampling at temperature 1, ``sum_v min(p_v, q_v)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from multitoken.errors import InputError
from multitoken.loss import (
    LossStats,
    chunk_elements_for,
    chunk_logits,
    chunk_rows,
    compute_dtype,
    flat_loss_inputs,
)

__all__ = ["DISTILL_LOSSES", "acceptance_sums", "linear_distillation", "teacher_hidden"]

DISTILL_LOSSES = ("kl", "tv", "lk")


def _log_softmax_(logits: Tensor, scale: float) -> Tensor:
    """``log_softmax(logits * scale)`` in place over the last dim; returns the log-sum-exp."""
    logits.mul_(scale)
    row_max = logits.max(dim=-1).values
    shift = row_max.masked_fill(row_max.abs() == float("inf"), 0.0)
    lse = (logits - shift[:, None]).exp_().sum(dim=-1).log_().add_(shift)
    logits.sub_(lse[:, None])
    return lse


def row_losses(log_q: Tensor, log_p: Tensor, kind: str, alpha: float) -> Tensor:
    """``[C]`` per-row loss from the student's and teacher's log-probabilities ``[C, V]`` (over
    a shard of the vocabulary's columns: that shard's part of each row's loss)."""
    p = log_p.exp()
    out = torch.zeros(log_q.shape[0], dtype=torch.float32, device=log_q.device)
    if kind in ("kl", "lk"):
        # 0 * log 0 = 0: where p underflows to 0 its term is 0, never NaN.
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(dim=-1)
        out += kl if kind == "kl" else alpha * kl
    if kind in ("tv", "lk"):
        tv = 0.5 * (log_q.exp() - p).abs_().sum(dim=-1)
        out += tv if kind == "tv" else (1 - alpha) * tv
    return out


def grad_logits(
    q: Tensor, p: Tensor, kind: str, alpha: float, reduce: Callable[[Tensor], None] | None = None
) -> Tensor:
    """d(row loss) / d(student logits) ``[C, V]`` (before the 1 / tau), in place over ``p``.

    KL: ``q - p``. TV: with ``s = sign(q - p) / 2``, ``q * (s - <s, q>)`` (``sign(0) = 0``,
    autograd's subgradient of ``abs``). Over a shard of the vocabulary's columns, ``reduce``
    sums the ``[C, 1]`` partial ``<s, q>`` over the shards in place.
    """
    diff = p.neg_().add_(q)  # q - p
    if kind == "kl":
        return diff
    sign = diff.sign().mul_(0.5)
    inner = (sign * q).sum(dim=-1, keepdim=True)
    if reduce is not None:
        reduce(inner)
    tv = sign.sub_(inner).mul_(q)
    if kind == "tv":
        return tv
    return tv.mul_(1 - alpha).add_(diff, alpha=alpha)


class _LinearDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weight, valid, targets, kind, alpha, tau, chunk_elements,
                fused):  # fmt: skip
        # student, teacher (N, H); weight (V, H); valid, targets (N,)
        n_tokens, vocab = student.shape[0], weight.shape[0]
        dtype = compute_dtype(student, weight)
        w = weight.to(dtype)
        rows = min(chunk_rows(vocab, chunk_elements), max(n_tokens, 1))
        lse_q = torch.zeros(n_tokens, dtype=torch.float32, device=student.device)
        lse_p = torch.zeros_like(lse_q)
        loss_sum = torch.zeros((), dtype=torch.float32, device=student.device)
        correct = torch.zeros((), dtype=torch.long, device=student.device)
        buf_q = student.new_empty((rows, vocab), dtype=torch.float32)
        buf_p = student.new_empty((rows, vocab), dtype=torch.float32)
        # fused: a frozen head and a student gradient to come: d loss / d student is computed
        # here from the chunks in hand, saving the backward both recomputations.
        grad_h = torch.empty_like(student) if fused else None
        for start in range(0, n_tokens, rows):
            stop = min(start + rows, n_tokens)
            log_q = chunk_logits(student[start:stop].to(dtype), w, buf_q)
            log_p = chunk_logits(teacher[start:stop].to(dtype), w, buf_p)
            top1 = log_q.argmax(dim=-1)
            lse_q[start:stop] = _log_softmax_(log_q, 1.0 / tau)
            lse_p[start:stop] = _log_softmax_(log_p, 1.0 / tau)
            mask = valid[start:stop]
            loss_sum += torch.where(mask, row_losses(log_q, log_p, kind, alpha), 0.0).sum()
            correct += ((top1 == targets[start:stop]) & mask).sum()
            if fused:
                grad = grad_logits(log_q.exp_(), log_p.exp_(), kind, alpha).to(dtype)
                scale = (mask.float() / tau)[:, None].to(dtype)
                grad_h[start:stop] = (grad @ w).mul_(scale)
        del buf_q, buf_p
        ctx.save_for_backward(student, teacher, weight, valid, lse_q, lse_p, grad_h)
        ctx.rows, ctx.dtype, ctx.kind, ctx.alpha, ctx.tau = rows, dtype, kind, alpha, tau
        ctx.fused = fused
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        student, teacher, weight, valid, lse_q, lse_p, fused_grad = ctx.saved_tensors
        if ctx.fused:  # computed in the forward for a unit upstream gradient
            return (fused_grad * grad_loss.to(fused_grad.dtype),) + (None,) * 9
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dtype, rows, tau = ctx.dtype, ctx.rows, ctx.tau
        w = weight.to(dtype)
        # d logits / d (h W^T) = 1 / tau, folded into the per-row factor.
        row_scale = valid.float() * (grad_loss.float() / tau)  # (N,)
        grad_h = torch.empty_like(student) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        buf_q = student.new_empty((rows, weight.shape[0]), dtype=torch.float32)
        buf_p = torch.empty_like(buf_q)
        for start in range(0, student.shape[0], rows):
            stop = min(start + rows, student.shape[0])
            h = student[start:stop]
            q = chunk_logits(h.to(dtype), w, buf_q)
            q.mul_(1.0 / tau).sub_(lse_q[start:stop, None]).exp_()
            p = chunk_logits(teacher[start:stop].to(dtype), w, buf_p)
            p.mul_(1.0 / tau).sub_(lse_p[start:stop, None]).exp_()
            grad = grad_logits(q, p, ctx.kind, ctx.alpha).to(dtype)
            scale = row_scale[start:stop, None]  # (C, 1): applied to the [C, H] sides
            if need_h:
                grad_h[start:stop] = (grad @ w).mul_(scale.to(dtype))
            if need_w:
                grad_w.addmm_(grad.t().float(), h.float() * scale)
            del q, p, grad
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, None, grad_w, None, None, None, None, None, None, None


def linear_distillation(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    targets: Tensor,
    kind: str = "kl",
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_elements: int = 0,
) -> LossStats:
    """Summed distillation loss of ``student @ weight.T`` against ``teacher @ weight.T``.

    Args:
        student: ``[..., H]`` the student's hidden states (depth k's ``h^k``).
        teacher: ``[..., H]`` the teacher's (``h^0`` shifted by k: :func:`teacher_hidden`);
            no gradient flows into it, nor into ``weight`` through it.
        weight: ``[V, H]`` the shared output head.
        targets: ``[...]`` a row's token id, ``ignore_index`` where the row has no target:
            the loss sums the rows with one; ``num_correct`` counts the student's top-1 hits.
        kind: ``"kl"``, ``"tv"`` or ``"lk"`` (``alpha * KL + (1 - alpha) * TV``).
        alpha: the KL weight of ``"lk"``.
        temperature: tau, dividing both logits.
        ignore_index: the "no target" value.
        chunk_elements: at most this many logits per chunk buffer; 0 = the device's default.

    Returns:
        :class:`~multitoken.loss.LossStats`: the summed loss (differentiable in ``student``
        and ``weight``), the number of valid rows and of top-1 hits.
    """
    if kind not in DISTILL_LOSSES:
        raise InputError(f"kind must be one of {DISTILL_LOSSES}, got {kind!r}")
    if teacher.shape != student.shape:
        raise InputError(
            f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} disagree"
        )
    flat_s, flat_t = flat_loss_inputs(student, weight, targets, weight.shape[0], ignore_index)
    valid = flat_t != ignore_index
    safe_t = torch.where(valid, flat_t, torch.zeros_like(flat_t))
    chunk_elements = chunk_elements_for(flat_s.device, chunk_elements)
    fused = torch.is_grad_enabled() and flat_s.requires_grad and not weight.requires_grad
    loss_sum, correct = _LinearDistillation.apply(
        flat_s, teacher.detach().reshape(flat_s.shape), weight, valid, safe_t,
        kind, float(alpha), float(temperature), chunk_elements, fused,
    )  # fmt: skip
    return LossStats(loss_sum, valid.sum(), correct)


def teacher_hidden(h0: Tensor, k: int) -> Tensor:
    """``[B, T, H]`` detached ``h^0`` shifted k places left along each row (zeros past the end).

    Depth k's teacher at i is the backbone at i + k. Where depth k has a valid target at i,
    i + k + 1 lies in i's document, so i + k does too and the row shift is that document's.
    """
    h0 = h0.detach()
    out = torch.zeros_like(h0)
    out[:, : h0.shape[1] - k] = h0[:, k:]
    return out


def acceptance_sums(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    valid: Tensor,
    chunk_elements: int = 0,
) -> tuple[Tensor, Tensor]:
    """Greedy agreements and summed acceptance of ``student`` against ``teacher``, no gradient.

    Over the rows where ``valid`` holds: ``argmax(student W^T) == argmax(teacher W^T)`` (as
    ``torch.argmax``: the first maximum), and ``sum_v min(p_v, q_v)`` with
    ``q = softmax(student W^T)``, ``p = softmax(teacher W^T)`` (temperature 1: what speculative
    sampling accepts of a draft from q for a target p). Chunked as the losses: at most two
    ``[rows, V]`` buffers of ``chunk_elements`` logits exist at once.

    Args:
        student: ``[..., H]`` depth k's hidden states.
        teacher: ``[..., H]`` the backbone's at i + k (:func:`teacher_hidden`).
        weight: ``[V, H]`` the shared output head.
        valid: ``[...]`` bool, the rows to count (depth k's valid targets).
        chunk_elements: at most this many logits per chunk buffer; 0 = the device's default.

    Returns:
        ``(agreements, acceptance)``: an int64 count and an fp64 sum over the valid rows.
    """
    with torch.no_grad():
        agree = torch.zeros((), dtype=torch.long, device=student.device)
        accept = torch.zeros((), dtype=torch.float64, device=student.device)
        for log_q, log_p, mask in paired_logit_chunks(
            student, teacher, weight, valid, chunk_elements
        ):
            agree += ((log_q.argmax(dim=-1) == log_p.argmax(dim=-1)) & mask).sum()
            _log_softmax_(log_q, 1.0)
            _log_softmax_(log_p, 1.0)
            # min(p, q) = exp(min(log p, log q)), in place over the student's buffer.
            both = torch.minimum(log_q, log_p, out=log_q).exp_().sum(dim=-1)
            accept += torch.where(mask, both, 0.0).sum(dtype=torch.float64)
        return agree, accept


def paired_logit_chunks(
    student: Tensor, teacher: Tensor, weight: Tensor, valid: Tensor, chunk_elements: int = 0
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(student logits, teacher logits, valid)`` of successive row chunks: ``[rows, V]``
    fp32 logits against ``weight`` (whole or a vocabulary shard), written into two buffers of
    at most ``chunk_elements`` logits that every chunk reuses (a chunk is overwritten by the
    next: use it before asking for another). No gradient."""
    width = student.shape[-1]
    flat_s, flat_t = student.reshape(-1, width), teacher.reshape(-1, width)
    flat_v = valid.reshape(-1)
    n_tokens, vocab = flat_s.shape[0], weight.shape[0]
    dtype = compute_dtype(flat_s, weight)
    w = weight.to(dtype)
    rows = chunk_rows(vocab, chunk_elements_for(flat_s.device, chunk_elements))
    rows = max(1, min(rows, n_tokens))
    buf_q = flat_s.new_empty((rows, vocab), dtype=torch.float32)
    buf_p = torch.empty_like(buf_q)
    for start in range(0, n_tokens, rows):
        stop = min(start + rows, n_tokens)
        yield (
            chunk_logits(flat_s[start:stop].to(dtype), w, buf_q),
            chunk_logits(flat_t[start:stop].to(dtype), w, buf_p),
            flat_v[start:stop],
        )
