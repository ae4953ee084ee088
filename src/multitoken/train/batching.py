"""This rank's batch of a step: its rows, its CP shard with the MTP halos, and the global
valid-target counts that every rank's loss divides by.

Whatever the layout, the trainer then runs one path: ``step_loss(model, batch, ...)``.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from multitoken.batch import StepBatch
from multitoken.data import dp_slice
from multitoken.layout import SequenceLayout
from multitoken.parallel import ParallelDims, exchange_halo, global_normalizer, shard_batch

__all__ = ["rank_batch"]


def rank_batch(
    global_batch: dict[str, torch.Tensor],
    dims: ParallelDims,
    num_depths: int,
    pad_id: int,
    device: torch.device,
    halo_fill: str = "sharding",
) -> StepBatch:
    """This rank's :class:`StepBatch` of a global batch (``input_ids``, ``labels``,
    ``cu_seqlens`` as the loader yields it).

    Args:
        global_batch: the same dict on every rank.
        dims: the run's layout (this rank's coordinates and groups).
        num_depths: D.
        pad_id: input fill where a lookahead leaves its document.
        device: where the batch goes.
        halo_fill: ``"sharding"`` (halos read from the global batch, no message) or
            ``"exchange"`` (one all_to_all over the CP group, as when only local shards exist).
    """
    local = dp_slice(global_batch, dims.dp_rank, dims.dp)
    ids, labels = local["input_ids"].to(device), local["labels"].to(device)
    layout = SequenceLayout.from_cu_seqlens(local["cu_seqlens"].to(device), ids.shape)
    if dims.cp == 1:
        # No sharder at cp = 1: the CP tests compare the sharded path against this one.
        batch = StepBatch.build(ids, labels, layout, num_depths, pad_id)
        normalizer = global_normalizer(batch.depth_labels, dims.token_group)
        return replace(batch, normalizer=normalizer)
    exchange = halo_fill == "exchange"
    shard = shard_batch(
        ids, labels, layout, dims.cp, dims.cp_rank, num_depths, pad_id, halo=not exchange
    )
    # The step's first collective: the global valid-target counts per depth, which also
    # checks that every CP peer cut the same plan (so a mismatch fails on every rank).
    normalizer = global_normalizer(shard, dims.token_group, tp_size=dims.tp)
    if exchange:  # one all_to_all, all depths
        shard = exchange_halo(shard, group=dims.cp_group, tp_size=dims.tp)
    return shard.step_batch(normalizer)
