"""This rank's batch of a step: its rows, its CP shard with the MTP halos, and the global
valid-target counts that every rank's loss divides by.

The batch is cut on the host, where the loader made it (the CP plan reads its own sizes: on a
GPU each would be a host sync), then copied to the device in one pinned, non-blocking copy
per tensor; only the counts' all-reduce runs on the device. The trainer prepares the next
batch while the device runs the current step. Whatever the layout, the trainer then runs one
path: ``step_loss(model, batch, ...)``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from multitoken.batch import StepBatch
from multitoken.layout import SequenceLayout
from multitoken.parallel import (
    ParallelDims,
    RowHalo,
    exchange_halo,
    global_normalizer,
    shard_batch,
)

__all__ = ["rank_batch", "to_device", "BatchFeed"]

HOST = torch.device("cpu")


def _copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: pinned and non-blocking from the host to a GPU."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_device(batch: StepBatch, device: torch.device) -> StepBatch:
    """``batch`` on ``device`` (its normaliser may be there already)."""

    def layout(x: SequenceLayout | None) -> SequenceLayout | None:
        if x is None:
            return None
        ids, positions, index = (_copy(t, device) for t in (x.doc_ids, x.positions, x.seq_index))
        return SequenceLayout(ids, positions, index, x.one_per_row)

    return StepBatch(
        _copy(batch.input_ids, device), layout(batch.layout), _copy(batch.mtp_input_ids, device),
        _copy(batch.depth_labels, device), _copy(batch.normalizer, device),
        layout(batch.kv_layout),
    )  # fmt: skip


def rank_batch(
    rows: dict[str, torch.Tensor],
    dims: ParallelDims,
    num_depths: int,
    pad_id: int,
    device: torch.device,
    halo_fill: str = "sharding",
) -> StepBatch:
    """This rank's :class:`StepBatch` of its data-parallel rows (``input_ids``, ``labels``,
    ``cu_seqlens`` as a loader built with this rank's ``dp_rank`` and ``dp_size`` yields them:
    the CP peers of a DP rank get the same rows).

    Args:
        rows: this DP rank's rows of the global batch.
        dims: the run's layout (this rank's coordinates and groups).
        num_depths: D.
        pad_id: input fill where a lookahead leaves its document.
        device: where the batch goes.
        halo_fill: ``"sharding"`` (halos read from the rows, no message) or
            ``"exchange"`` (one all_to_all over the CP group, as when only local shards exist).
    """
    local = rows
    exchange = halo_fill == "exchange" and dims.cp > 1
    # The halo exchange reads its routing from the shard's device: it is cut there.
    host = device if exchange else HOST
    ids, labels = local["input_ids"].to(host), local["labels"].to(host)
    layout = SequenceLayout.from_cu_seqlens(local["cu_seqlens"].to(host), ids.shape)
    if dims.cp == 1:
        # No sharder at cp = 1: the CP tests compare the sharded path against this one.
        batch = StepBatch.build(ids, labels, layout, num_depths, pad_id)
        normalizer = global_normalizer(batch.depth_labels, dims.token_group, device=device)
        return to_device(replace(batch, normalizer=normalizer), device)
    shard = shard_batch(
        ids, labels, layout, dims.cp, dims.cp_rank, num_depths, pad_id, halo=not exchange
    )
    # The step's first collective: the global valid-target counts per depth, which also
    # checks that every CP peer cut the same plan (so a mismatch fails on every rank).
    normalizer = global_normalizer(shard, dims.token_group, tp_size=dims.tp, device=device)
    if exchange:  # one all_to_all, all depths
        shard = exchange_halo(shard, group=dims.cp_group, tp_size=dims.tp)
    # The acceptance-aware losses' teacher rows i + k past a stripe come from the CP peers.
    ahead = RowHalo(shard.plan, dims.cp_rank, num_depths, dims.cp_group)
    return replace(to_device(shard.step_batch(normalizer), device), rows_ahead=ahead)


class BatchFeed:
    """The loader's batches, each prepared (:func:`rank_batch`) one step ahead: the trainer
    calls :meth:`prefetch` once the step's work is queued on the device, so that the host cuts
    and copies the next batch while the device computes.

    A checkpoint is written between steps, while a prepared batch waits: :meth:`state_dict`
    is the loader's state before it (a resumed run starts with that batch), and
    :meth:`load_state_dict` drops it.
    """

    def __init__(self, loader, prepare):
        self.loader, self.prepare = loader, prepare
        self.pending: StepBatch | None = None
        self.state_before: dict | None = None

    def prefetch(self) -> None:
        """Prepare the next batch now (the loader moves one batch on)."""
        if self.pending is None:
            self.state_before = self.loader.state_dict()
            self.pending = self.prepare(next(self.loader))

    def next(self) -> StepBatch:
        """The next batch, prepared."""
        self.prefetch()
        batch, self.pending = self.pending, None
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self.pending is None else self.state_before

    def load_state_dict(self, state: dict) -> None:
        self.pending = None
        self.loader.load_state_dict(state)
