"""A reduced draft vocabulary: the MTP depths draft over the most frequent tokens only.

A depth's draft costs its layer plus one ``[H] x [H, V]`` product with the output head, and on
a model with a large vocabulary the head dominates (SmolLM2-135M: 49,152 rows, about 80% of a
draft on a CPU). EAGLE-3 drafts over a reduced vocabulary and maps the draft back to full ids;
here the trained head is kept as it is and a draft takes its argmax (or samples) over the rows
of the ``size`` most frequent tokens only (docs/decoding.md#draft-vocabulary).

Verification is untouched: the main model still scores every drafted token over the whole
vocabulary, so greedy decoding stays token for token plain greedy decoding, and with
``temperature > 0`` the draft distribution is the depth's softmax over the subset (zero
elsewhere), which the speculative-sampling rule corrects exactly like any other draft law. A
token outside the subset can never be drafted; the price is acceptance, measured, never output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from multitoken.errors import InputError

__all__ = ["DraftVocab", "most_frequent"]


def most_frequent(counts: Tensor | Sequence[int], size: int) -> Tensor:
    """The ids of the ``size`` largest ``counts`` (ties to the smaller id), sorted ascending."""
    counts = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    if not 1 <= size <= counts.numel():
        raise InputError(f"draft vocabulary size must be in 1..{counts.numel()}, got {size}")
    # A stable sort on -counts keeps the smaller id first among equal counts.
    order = torch.sort(-counts, stable=True).indices
    return torch.sort(order[:size]).values


class DraftVocab:
    """The head rows a draft scores, and the map back to full token ids.

    Args:
        ids: distinct token ids in ``[0, V)`` (any order; kept sorted).
        head_weight: the model's ``[V, H]`` output head; its rows for ``ids`` are copied once
            into one contiguous ``[n, H]`` matrix (the product's fast layout).
    """

    def __init__(self, ids: Sequence[int] | Tensor, head_weight: Tensor) -> None:
        vocab_size = head_weight.shape[0]
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise InputError("the draft vocabulary is empty: give at least one token id")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise InputError(f"draft vocabulary ids must lie in [0, {vocab_size})")
        ids = torch.sort(ids).values
        if bool((ids[1:] == ids[:-1]).any()):
            raise InputError("the draft vocabulary holds an id twice: give distinct ids")
        self.vocab_size = vocab_size
        self.ids = ids.to(head_weight.device)
        self.weight = head_weight.detach()[self.ids].contiguous()

    def __len__(self) -> int:
        return self.ids.numel()

    def logits(self, hidden: Tensor) -> Tensor:
        """``[n]`` logits of the draft vocabulary for one ``[H]`` hidden state."""
        return hidden @ self.weight.t()

    def full_probs(self, probs: Tensor) -> Tensor:
        """A ``[n]`` distribution over the draft vocabulary as a ``[V]`` one (zero elsewhere)."""
        full = probs.new_zeros(self.vocab_size)
        return full.index_copy_(0, self.ids, probs)
