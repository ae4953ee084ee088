"""What a frozen backbone gives the MTP heads, computed once: offline backbone features.

With ``mtp.freeze_base`` the decoder never changes, so everything a heads-only step reads from
it can be computed in one pass and stored (docs/training.md#offline-backbone-features):

- ``hidden``: ``h^0``, the decoder's final hidden states *after* its final norm (what depth 1
  reads through its ``hnorm``, what the shared head reads for the main loss, and what every
  teacher of the acceptance-aware losses is computed from: depth k's teacher at i is
  ``softmax(h^0_{i+k} W^T / tau)``, so ``h^0`` alone suffices for ``mtp.loss = kl|tv|lk``);
- ``nll``: the main head's fp32 negative log-likelihood of each position's next token in its
  document piece (the main loss, a metric when the decoder is frozen);
- ``greedy``: the main head's argmax (``mtp.targets=base`` and the main accuracy).

The two per-token statistics spare a heads-only step the two ``[tokens, V]`` projections of
``h^0`` it would otherwise make every step, and they come from the full-precision ``h^0``: the
main loss is exact whatever dtype ``hidden`` is stored in.

A position's values depend only on its document piece (document-masked attention, positions
from the piece start), so they are the same in whatever packed row the piece sits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.layout import SequenceLayout
from multitoken.lookahead import IGNORE_INDEX
from multitoken.loss import LossStats, chunk_elements_for, chunk_rows

__all__ = ["BackboneOutputs", "backbone_outputs"]


@dataclass(frozen=True)
class BackboneOutputs:
    """A frozen decoder's outputs for one batch (``[B, T, ...]``, the batch's rows).

    Attributes:
        hidden: ``[B, T, H]`` ``h^0`` after the final norm.
        nll: ``[B, T]`` fp32 main-head NLL of each position's next token (0 where none).
        greedy: ``[B, T]`` int64 main-head argmax.
    """

    hidden: Tensor
    nll: Tensor
    greedy: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BackboneOutputs:
        """On ``device``, ``hidden`` cast to ``dtype`` (None = kept)."""
        hidden = self.hidden.to(device)
        return BackboneOutputs(
            hidden if dtype is None else hidden.to(dtype), self.nll.to(device),
            self.greedy.to(device),
        )  # fmt: skip

    def main_stats(self, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> LossStats:
        """The main loss's :class:`~multitoken.loss.LossStats` for next-token ``labels``
        ``[B, T]`` (as :func:`~multitoken.loss.linear_cross_entropy` on ``hidden``)."""
        valid = labels != ignore_index
        loss_sum = torch.where(valid, self.nll, 0.0).sum(dtype=torch.float32)
        correct = ((self.greedy == labels) & valid).sum()
        return LossStats(loss_sum, valid.sum(), correct)


def backbone_outputs(
    model,
    input_ids: Tensor,
    layout: SequenceLayout,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_elements: int = 0,
) -> BackboneOutputs:
    """``model``'s decoder run once over a batch, no gradient (``model``: an
    :class:`~multitoken.mtp_model.MTPModel`; its MTP depths do not run).

    Args:
        input_ids: ``[B, T]`` token ids.
        layout: their documents.
        labels: ``[B, T]`` next-token labels (``ignore_index`` where none).
        ignore_index: the "no target" label.
        chunk_elements: at most this many logits exist at once; 0 = the device's default.
    """
    decoder = model.decoder
    with torch.no_grad():
        h0 = decoder.hidden(input_ids, decoder.layer_kwargs(layout))
        weight = model.head_weight
        flat, flat_labels = h0.reshape(-1, h0.shape[-1]), labels.reshape(-1)
        rows = chunk_rows(weight.shape[0], chunk_elements_for(h0.device, chunk_elements))
        nll, greedy = [], []
        for part, part_labels in zip(flat.split(rows), flat_labels.split(rows)):
            logits = (part @ weight.t()).float()  # (C, V)
            valid = part_labels != ignore_index
            picked = logits.gather(1, torch.where(valid, part_labels, 0)[:, None]).squeeze(1)
            greedy.append(logits.argmax(dim=-1))
            nll.append(torch.where(valid, torch.logsumexp(logits, dim=-1) - picked, 0.0))
        shape = h0.shape[:-1]
        return BackboneOutputs(h0, torch.cat(nll).view(shape), torch.cat(greedy).view(shape))
