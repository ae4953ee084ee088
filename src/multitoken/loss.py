"""Cross-entropy through the output head without ``[tokens, vocab]`` logits.

With D MTP depths the head runs D + 1 times per step; materialising full logits for each
would cost ``(D + 1) * tokens * vocab`` floats. :func:`linear_cross_entropy` instead walks the
tokens in chunks whose logits hold at most ``chunk_elements`` floats, keeps only one float per
token (the log-sum-exp) for the backward, and recomputes each chunk's logits there. Its largest
allocation is bounded by ``max(chunk_elements, vocab * hidden, tokens * hidden)`` elements,
whatever the number of tokens and depths.

Normalisation is the caller's choice: the function returns a *sum* over valid targets, and the
model divides by the number of valid targets summed over every rank that shares the batch
(docs/design.md#context-parallelism), so that a rank with no valid target contributes 0, never 0/0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from multitoken.errors import InputError, check_in_range

__all__ = [
    "linear_cross_entropy",
    "chunked_backward",
    "flat_loss_inputs",
    "LossStats",
    "DEFAULT_CHUNK_ELEMENTS",
    "CUDA_CHUNK_ELEMENTS",
    "chunk_elements_for",
    "chunk_rows",
    "chunk_logits",
    "compute_dtype",
]

# 2**23 fp32 logits = 32 MiB per chunk: 256 tokens at vocab 32k, 64 at 128k (the CPU's).
DEFAULT_CHUNK_ELEMENTS = 1 << 23
# On a GPU: 2**26 = 256 MiB, 2,048 tokens at 32k, 512 at 128k. Every chunk adds its share to
# the fp32 [V, H] weight gradient (one read and write of it, in the GEMM): at 64 tokens a chunk
# that traffic outweighs the chunk's matmuls; at 512 it is amortised.
CUDA_CHUNK_ELEMENTS = 1 << 26


def chunk_elements_for(device: torch.device, chunk_elements: int = 0) -> int:
    """``chunk_elements``, or when 0 the default of ``device``'s type (larger on CUDA)."""
    if chunk_elements:
        return chunk_elements
    return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else DEFAULT_CHUNK_ELEMENTS


class LossStats(tuple):
    """``(loss_sum, num_valid, num_correct)`` of one :func:`linear_cross_entropy` call."""

    __slots__ = ()

    def __new__(cls, loss_sum: Tensor, num_valid: Tensor, num_correct: Tensor):
        return super().__new__(cls, (loss_sum, num_valid, num_correct))

    @property
    def loss_sum(self) -> Tensor:
        return self[0]

    @property
    def num_valid(self) -> Tensor:
        return self[1]

    @property
    def num_correct(self) -> Tensor:
        return self[2]


def chunk_rows(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(vocab, 1))


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the head matmuls: autocast's when it is on, else the promoted one.

    Fixed in the forward and reused by the backward, which runs outside autocast: under bf16
    autocast the MTP hidden states are bf16 while the head weight stays fp32.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def chunk_logits(h: Tensor, weight: Tensor, buffer: Tensor) -> Tensor:
    """fp32 logits ``h @ weight.T`` of one chunk, written into (a prefix of) ``buffer``.

    ``h`` and ``weight`` share a dtype (the compute dtype).
    """
    out = buffer[: h.shape[0]]  # (C, V)
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        # Straight into the reused buffer: a fresh chunk-sized tensor per chunk would cost a
        # round of page faults on CPU every time (it is larger than malloc keeps around).
        return torch.mm(h, weight.t(), out=out)
    with torch.autocast(h.device.type, enabled=False):
        return out.copy_(h @ weight.t())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_elements, fused):
        # hidden (N, H), weight (V, H), targets (N,)
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        dtype = compute_dtype(hidden, weight)
        w = weight.to(dtype)
        rows = min(chunk_rows(vocab, chunk_elements), max(n_tokens, 1))
        lse = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)  # (N,)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        buffer = hidden.new_empty((rows, vocab), dtype=torch.float32)  # one chunk of logits
        # fused: a frozen head (no weight gradient) and a hidden gradient to come: d loss /
        # d hidden is computed here from the chunk in hand, saving the backward's recomputation.
        grad_h = torch.empty_like(hidden) if fused else None
        for start in range(0, n_tokens, rows):
            stop = min(start + rows, n_tokens)
            logits = chunk_logits(hidden[start:stop].to(dtype), w, buffer)  # (C, V)
            tgt = safe_targets[start:stop]
            picked = logits.gather(1, tgt[:, None]).squeeze(1)
            # One pass gives the row max (for a stable log-sum-exp) and the top-1 prediction.
            row_max, top1 = logits.max(dim=-1)
            # As torch.logsumexp: an infinite max is replaced by 0 so that inf - inf is no NaN.
            shift = row_max.masked_fill(row_max.abs() == float("inf"), 0.0)
            # The logits are no longer needed: exponentiate them in place.
            chunk_lse = logits.sub_(shift[:, None]).exp_().sum(dim=-1).log_().add_(shift)
            lse[start:stop] = chunk_lse
            mask = valid[start:stop]
            loss_sum += torch.where(mask, chunk_lse - picked, 0.0).sum()
            correct += ((top1 == tgt) & mask).sum()
            if fused:  # softmax - onehot(t) = exp(logit - shift) * exp(shift - lse) - onehot
                probs = logits.mul_((shift - chunk_lse).exp_()[:, None])
                probs.scatter_add_(1, tgt[:, None], torch.full_like(picked[:, None], -1.0))
                grad_h[start:stop] = (probs.to(dtype) @ w).mul_(mask[:, None].to(dtype))
        del buffer
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lse, grad_h)
        ctx.rows, ctx.dtype, ctx.fused = rows, dtype, fused
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        hidden, weight, targets, valid, lse, grad_h = ctx.saved_tensors
        if ctx.fused:  # computed in the forward for a unit upstream gradient
            return grad_h * grad_loss.to(grad_h.dtype), None, None, None, None, None
        # Per-token factor of the gradient: grad_loss where there is a target, else 0.
        row_scale = valid.float() * grad_loss.float()  # (N,)
        minus_one = torch.full_like(row_scale, -1.0)  # every row owns its target's column
        grad_h, grad_w = chunked_backward(
            hidden, weight, targets, minus_one, lse, row_scale, ctx.rows, ctx.dtype,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        return grad_h, grad_w, None, None, None, None


def chunked_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    target_value: Tensor,
    lse: Tensor,
    row_scale: Tensor,
    rows: int,
    dtype: torch.dtype,
    need_h: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum_i row_scale_i * (lse_i - logit_i[t_i])`` w.r.t. ``hidden`` and
    ``weight``, recomputing the logits chunk by chunk (shared with the vocabulary-parallel
    loss, where ``weight`` is a shard and ``target_value`` is 0 on rows whose target another
    shard owns).

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]``; targets: ``[N]`` column of each row's target.
        target_value: ``[N]`` what the one-hot adds at the target column (-1, or 0).
        lse: ``[N]`` the saved log-sum-exp; row_scale: ``[N]`` the per-row gradient factor.
        rows: tokens per chunk; dtype: the compute dtype of the forward.
        need_h, need_w: which gradients to compute.
    """
    w = weight.to(dtype)
    grad_h = torch.empty_like(hidden) if need_h else None
    # Accumulate the weight gradient in fp32 even for bf16 weights.
    grad_w = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    )
    buffer = hidden.new_empty((rows, weight.shape[0]), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        stop = min(start + rows, hidden.shape[0])
        h = hidden[start:stop]
        # d(lse - logit[t]) / d logits = softmax - onehot(t), recomputed from the saved lse.
        probs = chunk_logits(h.to(dtype), w, buffer)  # (C, V)
        probs.sub_(lse[start:stop, None]).exp_()
        probs.scatter_add_(1, targets[start:stop, None], target_value[start:stop, None])
        grad_logits = probs.to(dtype)
        # The row factor is applied to the [C, H] operands and results, not to the [C, V]
        # chunk: diag(s) P W = diag(s) (P W) and (diag(s) P)^T h = P^T (diag(s) h).
        scale = row_scale[start:stop, None]  # (C, 1)
        if need_h:
            grad_h[start:stop] = (grad_logits @ w).mul_(scale.to(dtype))
        if need_w:
            grad_w.addmm_(grad_logits.t().float(), h.float() * scale)
        del probs, grad_logits
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    return grad_h, grad_w


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = -100,
    chunk_elements: int = 0,
) -> LossStats:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, chunked over tokens.

    Args:
        hidden: ``[..., H]`` hidden states (any leading shape; flattened).
        weight: ``[V, H]`` output-head weight.
        targets: ``[...]`` class indices matching ``hidden``'s leading shape;
            ``ignore_index`` where there is no target.
        ignore_index: the "no target" value.
        chunk_elements: at most this many logits exist at once (per chunk); 0 = the
            device's default (:func:`chunk_elements_for`).

    Returns:
        :class:`LossStats`: the summed loss (fp32 scalar, differentiable), the number of valid
        targets and the number of top-1 hits (int64 scalars).

    Example::

        >>> h, w = torch.randn(6, 4), torch.randn(10, 4)
        >>> t = torch.tensor([1, 2, -100, 3, 4, 5])
        >>> s = linear_cross_entropy(h, w, t)
        >>> torch.allclose(s.loss_sum, F.cross_entropy(h @ w.T, t, reduction="sum"))
        True
    """
    flat_h, flat_t = flat_loss_inputs(hidden, weight, targets, weight.shape[0], ignore_index)
    valid = flat_t != ignore_index
    chunk_elements = chunk_elements_for(flat_h.device, chunk_elements)
    fused = torch.is_grad_enabled() and flat_h.requires_grad and not weight.requires_grad
    loss_sum, correct = _LinearCrossEntropy.apply(
        flat_h, weight, flat_t, ignore_index, chunk_elements, fused
    )
    return LossStats(loss_sum, valid.sum(), correct)


def flat_loss_inputs(
    hidden: Tensor, weight: Tensor, targets: Tensor, vocab: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """``hidden [N, H]`` and int64 ``targets [N]`` after checking them against a head of
    ``vocab`` rows (``weight`` may be a vocabulary shard: only its width is checked here).

    Raises:
        InputError: shapes that disagree, non-integer targets, or a target outside
            ``[0, vocab)`` that is not ``ignore_index`` (a value check: see set_validation).
    """
    if hidden.shape[:-1] != targets.shape:
        raise InputError(
            f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree: targets "
            "must have hidden's shape without the last dimension"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise InputError(
            f"head weight must be [vocab, {hidden.shape[-1]}], got {tuple(weight.shape)}"
        )
    if targets.dtype not in (torch.int32, torch.int64):
        raise InputError(f"targets must be an integer tensor, got {targets.dtype}")
    flat_t = targets.reshape(-1).long()
    check_in_range(
        "target id",
        flat_t,
        vocab,
        f"it is neither a token of the head's vocabulary nor ignore_index ({ignore_index}): "
        "check the tokenizer's vocab size against the model's",
        ignore=ignore_index,
    )
    return hidden.reshape(-1, hidden.shape[-1]), flat_t
