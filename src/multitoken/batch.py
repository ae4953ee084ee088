"""One training step's batch, as the model and the loss consume it.

A :class:`StepBatch` holds everything a step needs and nothing about where it came from: the
(local) token ids and their layout, the layout of the keys when they are gathered from other
ranks, the MTP inputs of every depth, the targets of every depth, and the per-depth
normaliser (valid targets summed over every rank that shares the batch). A single process
builds one with :meth:`StepBatch.build`; under context parallelism the sharder builds it from a
rank's shard and its halo (:meth:`multitoken.parallel.CPShard.step_batch`), so the step itself
has one path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.errors import InputError, check_int_tensor, renamed_kwarg, warn_renamed
from multitoken.frozen import BackboneOutputs
from multitoken.layout import SequenceLayout
from multitoken.lookahead import IGNORE_INDEX, mtp_inputs

__all__ = ["StepBatch"]


@dataclass(frozen=True)
class StepBatch:
    """The inputs and targets of one step on one rank.

    Attributes:
        input_ids: ``[B, T]`` token ids (this rank's shard under context parallelism).
        layout: their documents (global positions and document ids under CP).
        mtp_input_ids: ``[D, B, T]`` depth k's input tokens at index k - 1.
        depth_labels: ``[D + 1, B, T]`` targets, index 0 the next-token labels.
        normalizer: ``[D + 1]`` int64 valid targets per depth over every rank sharing the
            batch (this rank's counts in a single process).
        kv_layout: layout of the keys gathered over the CP group; None = the local tokens.
        backbone: a frozen decoder's outputs for these rows, computed before (offline
            features): the step runs only the MTP depths; None = the decoder runs.
        rows_ahead: under context parallelism, ``rows_ahead(h, k)``: the ``[B, T_local, H]``
            rows k places ahead in each document, fetched from the CP peers past a stripe
            (:class:`~multitoken.parallel.row_halo.RowHalo`: the acceptance-aware losses'
            teacher rows); None on whole rows.
    """

    input_ids: Tensor
    layout: SequenceLayout
    mtp_input_ids: Tensor
    depth_labels: Tensor
    normalizer: Tensor
    kv_layout: SequenceLayout | None = None
    backbone: BackboneOutputs | None = None
    rows_ahead: Callable[[Tensor, int], Tensor] | None = None

    @property
    def num_depths(self) -> int:
        """D, the number of MTP depths."""
        return self.mtp_input_ids.shape[0]

    @property
    def depth(self) -> int:
        """Deprecated: :attr:`num_depths`."""
        warn_renamed("StepBatch.depth", "StepBatch.num_depths")
        return self.num_depths

    @classmethod
    @renamed_kwarg("depth", "num_depths")
    def build(
        cls,
        input_ids: Tensor,
        labels: Tensor,
        layout: SequenceLayout | None,
        num_depths: int,
        pad_id: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> StepBatch:
        """A single-process batch: MTP inputs and targets by ``lookahead``, local counts.

        Args:
            input_ids: ``[B, T]`` token ids.
            labels: ``[B, T]`` next-token labels (see :func:`~multitoken.next_token_labels`).
            layout: documents of the batch; None = one document per row.
            num_depths: D.
            pad_id: input fill where a lookahead leaves its document (never a target).
            ignore_index: the "no target" label.

        Example (the seed example: D = 2, documents [0, 5) and [5, 12))::

            >>> layout = SequenceLayout.from_lengths([[5, 7]])
            >>> ids = torch.arange(12)[None]
            >>> batch = StepBatch.build(ids, next_token_labels(ids, layout), layout, num_depths=2)
            >>> batch.normalizer        # 4 + 6 next-token targets, then 3 + 5, then 2 + 4
            tensor([10,  8,  6])
        """
        check_int_tensor("input_ids", input_ids, 2)
        check_int_tensor("labels", labels, 2)
        if labels.shape != input_ids.shape:
            raise InputError(
                f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ "
                "in shape"
            )
        if layout is None:
            layout = SequenceLayout.rows(*input_ids.shape, device=input_ids.device)
        layout.check_tensor("input_ids", input_ids)
        # One lookahead for all depths; shift 0 also drops labels on padding tokens.
        ids, depth_labels = mtp_inputs(input_ids, labels, layout, num_depths, pad_id, ignore_index)
        return cls(input_ids, layout, ids, depth_labels, target_counts(depth_labels, ignore_index))

    def to(self, device: torch.device | str) -> StepBatch:
        """The same batch on ``device``."""
        kv = None if self.kv_layout is None else self.kv_layout.to(device)
        backbone = None if self.backbone is None else self.backbone.to(device)
        return StepBatch(
            self.input_ids.to(device),
            self.layout.to(device),
            self.mtp_input_ids.to(device),
            self.depth_labels.to(device),
            self.normalizer.to(device),
            kv,
            backbone,
            self.rows_ahead,
        )


def target_counts(depth_labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``[D + 1]`` int64 valid targets per depth of ``[D + 1, B, T]`` targets."""
    return (depth_labels != ignore_index).sum((1, 2))
