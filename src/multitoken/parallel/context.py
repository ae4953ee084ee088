"""Context-parallel shards of a batch: tokens, layouts, MTP inputs and targets of one rank.

:func:`shard_batch` cuts a global batch with the load-balanced split of :mod:`.plan` and hands
each rank a :class:`CPShard` whose :meth:`~CPShard.step_batch` is the rank's
:class:`~multitoken.batch.StepBatch`: the local tokens, their layout (global positions and
document ids), the layout of the keys gathered over the CP group, and the MTP inputs and
targets of every depth. Those come from the *halo* of each local stripe (:mod:`.halo`), filled
either from the global batch at sharding time (default: no message in the forward) or, when a
rank only has its local shard, by :func:`exchange_halo` with one collective.

The collectives of a training step (:func:`global_normalizer`, :func:`sync_gradients`,
:class:`MetricSums`) live in :mod:`.reduce`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from multitoken.batch import StepBatch
from multitoken.errors import renamed_kwarg, warn_renamed
from multitoken.layout import LayoutError, SequenceLayout
from multitoken.lookahead import IGNORE_INDEX
from multitoken.parallel.halo import (
    HaloIndex,
    ShardMismatchError,
    check_cp_group,
    exchange_values,
    halo_from_global,
    halo_sources,
)
from multitoken.parallel.plan import ShardPlan, plan_shards

__all__ = [
    "CPShard",
    "shard_batch",
    "exchange_halo",
    "ShardPlan",
    "plan_shards",
    "ShardMismatchError",
]


@dataclass(frozen=True)
class CPShard:
    """One rank's part of a batch under context parallelism.

    Attributes:
        input_ids: ``[B, T_local]`` local token ids (``pad_id`` on padding).
        labels: ``[B, T_local]`` local next-token labels (``ignore_index`` on padding).
        layout: local layout: global document ids (-1 on padding), positions and row indices.
        kv_layout: ``[B, cp * T_local]`` layout of the keys gathered over the CP group, in
            all-gather (rank) order; the same tensor on every rank, computed without messages.
        plan: the split (:class:`ShardPlan`), identical on every rank.
        cp_rank: this rank's index in the CP group.
        num_depths: D, the number of MTP depths.
        pad_id: input fill where a lookahead leaves its document.
        ignore_index: label fill.
        halo_ids: ``[C, D]`` ids following each local stripe (C = 2 per piece); None until filled.
        halo_labels: ``[C, D]`` labels following each local stripe; None until filled.
        mtp_input_ids: ``[D, B, T_local]`` depth k's input at index k - 1; None until filled.
        depth_labels: ``[D + 1, B, T_local]`` targets, main first; None until filled.
    """

    input_ids: Tensor
    labels: Tensor
    layout: SequenceLayout
    kv_layout: SequenceLayout
    plan: ShardPlan
    cp_rank: int
    num_depths: int
    pad_id: int
    ignore_index: int
    halo_ids: Tensor | None = None
    halo_labels: Tensor | None = None
    mtp_input_ids: Tensor | None = None
    depth_labels: Tensor | None = None

    @property
    def cp_size(self) -> int:
        return self.plan.cp_size

    @property
    def depth(self) -> int:
        """Deprecated: :attr:`num_depths`."""
        warn_renamed("CPShard.depth", "CPShard.num_depths")
        return self.num_depths

    @property
    def has_halo(self) -> bool:
        return self.halo_ids is not None

    def with_halo(
        self, halo_ids: Tensor, halo_labels: Tensor, valid: Tensor | None = None
    ) -> CPShard:
        """This shard with its halos and the MTP inputs and targets computed from them
        (``valid``: the halo slots that hold a value, ``halo_sources(...).valid``, when the
        caller has it already)."""
        plan, num_depths = self.plan, self.num_depths
        if valid is None:
            valid = halo_sources(plan, self.cp_rank, num_depths).valid
        index = HaloIndex.build(plan, self.cp_rank, num_depths, valid)
        shifts = list(range(1, num_depths + 1))
        return replace(
            self,
            halo_ids=halo_ids,
            halo_labels=halo_labels,
            mtp_input_ids=index.lookahead(self.input_ids, halo_ids, shifts, self.pad_id),
            depth_labels=index.lookahead(self.labels, halo_labels, [0, *shifts], self.ignore_index),
        )

    def step_batch(self, normalizer: Tensor) -> StepBatch:
        """This rank's :class:`~multitoken.batch.StepBatch`, with ``normalizer`` from
        :func:`~multitoken.parallel.global_normalizer` (the counts summed over the group)."""
        if not self.has_halo:
            raise RuntimeError(
                "this shard has no halo yet: call exchange_halo(shard, cp_group) first, or "
                "shard with halo=True"
            )
        return StepBatch(
            input_ids=self.input_ids,
            layout=self.layout,
            mtp_input_ids=self.mtp_input_ids,
            depth_labels=self.depth_labels,
            normalizer=normalizer,
            kv_layout=self.kv_layout,
        )

    def target_counts(self) -> Tensor:
        """``[D + 1]`` this rank's share of the valid targets of every depth, without the halo.

        Depth k's target of position i is ``labels[i + k]``, so the targets of a document at
        depth k are its valid labels at offsets ``>= k``, each some earlier token's target.
        Counted where the label lives rather than where the position lives, a rank's share can
        differ from the count of its ``depth_labels``, but the sum over the CP group is the
        same: the global normaliser, available before any halo exchange.
        """
        piece, offset = self.plan.token_pieces(self.cp_rank)
        labelled = (self.labels.reshape(-1) != self.ignore_index) & (
            self.layout.doc_ids.reshape(-1) >= 0
        )
        k = torch.arange(self.num_depths + 1, device=offset.device)[:, None]
        return ((offset[None] >= k) & labelled[None]).sum(1)


def _check_args(input_ids, labels, layout, cp_size, cp_rank, num_depths, pad_id, ignore_index):
    for name, value in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(value, Tensor) or value.dim() != 2:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise LayoutError(f"{name} must be a [B, T] tensor, got {got}")
        if value.dtype not in (torch.int32, torch.int64):
            raise LayoutError(f"{name} must be int32 or int64, got {value.dtype}")
    if labels.shape != input_ids.shape:
        raise LayoutError(
            f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape"
        )
    if layout is not None:
        layout.check_tensor("input_ids", input_ids)
    for name, value, low in (("cp_size", cp_size, 1), ("num_depths", num_depths, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise LayoutError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise LayoutError(f"cp_rank must be an int in [0, cp_size={cp_size}), got {cp_rank!r}")
    if not isinstance(pad_id, int) or not isinstance(ignore_index, int):
        raise LayoutError(f"pad_id and ignore_index must be ints, got {pad_id!r}, {ignore_index!r}")


@renamed_kwarg("depth", "num_depths")
def shard_batch(
    input_ids: Tensor,
    labels: Tensor,
    layout: SequenceLayout | None,
    cp_size: int,
    cp_rank: int,
    num_depths: int,
    pad_id: int,
    ignore_index: int = IGNORE_INDEX,
    *,
    pad: bool = True,
    halo: bool = True,
) -> CPShard:
    """Rank ``cp_rank``'s shard of a global batch, with halos read from the global batch.

    Pure tensor code, no communication: every rank of the CP group calls it on the same global
    batch. Works for ``cp_size == 1`` (the shard is the batch, padded to a multiple of 2).

    Args:
        input_ids: ``[B, T]`` global token ids.
        labels: ``[B, T]`` global next-token labels (already shifted).
        layout: documents of the global batch; None = one document per row (unpacked).
        cp_size: ranks in the CP group.
        cp_rank: this rank's index in the CP group.
        num_depths: D, MTP depths (0 = next-token prediction only).
        pad_id: token id of padding and of lookahead fill (never a target).
        ignore_index: label of padding and of lookahead fill.
        pad: pad each document to a multiple of ``2 * cp_size``; False raises instead.
        halo: fill the halos from the global batch; False leaves them (and the MTP inputs) for
            :func:`exchange_halo`.

    Raises:
        LayoutError: on malformed input (see :func:`plan_shards`), the same on every rank.

    Example (the seed example: D = 2, documents [0, 5) and [5, 12), cp = 2)::

        >>> layout = SequenceLayout.from_cu_seqlens(torch.tensor([0, 5, 12]), shape=(1, 12))
        >>> ids = torch.arange(10, 22)[None]
        >>> shard = shard_batch(ids, next_token_labels(ids, layout), layout, 2, 0, 2, pad_id=0)
        >>> shard.input_ids  # stripes 0 and 3 of each document (padded to 8)
        tensor([[10, 11,  0,  0, 15, 16, 21,  0]])
        >>> shard.halo_ids  # the 2 ids after each local stripe, 0 past the document's end
        tensor([[12, 13],
                [ 0,  0],
                [17, 18],
                [ 0,  0]])
        >>> shard.mtp_input_ids[1]  # depth 2 reads 2 ahead: 11 -> 13 comes from rank 1
        tensor([[12, 13,  0,  0, 17, 18,  0,  0]])
    """
    _check_args(input_ids, labels, layout, cp_size, cp_rank, num_depths, pad_id, ignore_index)
    if layout is None:
        layout = SequenceLayout.rows(*input_ids.shape, device=input_ids.device)
    plan = plan_shards(layout, cp_size, pad=pad)
    piece, offset = plan.token_pieces(cp_rank)
    real = offset < plan.length[piece]
    source = torch.where(real, plan.row[piece] * plan.seqlen + plan.start[piece] + offset, 0)
    shape = (plan.batch, plan.local_len)

    def local(x: Tensor, fill: int) -> Tensor:  # (B, T_local)
        return torch.where(real, x.reshape(-1)[source], fill).view(shape).to(x.dtype)

    kv_layout = plan.kv_layout()  # (B, cp * T_local): every rank's layout, in rank order
    span = slice(cp_rank * plan.local_len, (cp_rank + 1) * plan.local_len)
    local_layout = SequenceLayout(
        kv_layout.doc_ids[:, span], kv_layout.positions[:, span], kv_layout.seq_index[:, span]
    )  # (B, T_local)
    shard = CPShard(
        input_ids=local(input_ids, pad_id),
        labels=local(labels, ignore_index),
        layout=local_layout,
        kv_layout=kv_layout,
        plan=plan,
        cp_rank=cp_rank,
        num_depths=num_depths,
        pad_id=pad_id,
        ignore_index=ignore_index,
    )
    if not halo:
        return shard
    sources = halo_sources(plan, cp_rank, num_depths)
    return shard.with_halo(
        halo_from_global(input_ids, sources, pad_id),
        halo_from_global(labels, sources, ignore_index),
        sources.valid,
    )


@renamed_kwarg("depth", "num_depths")
def exchange_halo(
    shard: CPShard,
    num_depths: int | None = None,
    group: dist.ProcessGroup | None = None,
    pad_id: int | None = None,
    *,
    tp_size: int = 1,
) -> CPShard:
    """Fill the halos of a local shard with one collective over the CP ``group``.

    The fallback for data pipelines that only produce local shards: every rank derives from
    the plan which of its values each peer needs, and one ``all_to_all_single`` carries the ids
    and the labels of every document and every depth at once. Exact for stripes shorter than D
    (their halo comes from several ranks). ``group`` may be None only when ``cp_size == 1``.

    Args:
        shard: this rank's shard (from ``shard_batch(..., halo=False)`` or a loader).
        num_depths: D to build the halos for; None = ``shard.num_depths`` (a shard cut with
            D = 0 can be given its MTP inputs here).
        group: the CP process group (``exchange_halo(shard, cp_group)`` also works).
        pad_id: input fill; None = ``shard.pad_id``.
        tp_size: the mesh's tensor-parallel size (to check ``group``, see
            :func:`~multitoken.parallel.halo.check_cp_group`).

    Raises:
        ValueError: ``group`` does not match the shard's CP size and rank (before any message).
        ShardMismatchError: the peers sharded a different plan (on every rank).
    """
    if isinstance(num_depths, dist.ProcessGroup) and group is None:
        num_depths, group = None, num_depths
    if not isinstance(shard, CPShard):
        raise TypeError(f"exchange_halo takes a CPShard, got {type(shard).__name__}")
    num_depths = shard.num_depths if num_depths is None else num_depths
    if not isinstance(num_depths, int) or isinstance(num_depths, bool) or num_depths < 0:
        raise ValueError(f"num_depths must be an int >= 0, got {num_depths!r}")
    shard = replace(shard, num_depths=num_depths, pad_id=shard.pad_id if pad_id is None else pad_id)
    if shard.cp_size > 1:
        if group is None:
            raise ValueError("exchange_halo needs the CP process group when cp_size > 1")
        check_cp_group(group, shard.cp_size, shard.cp_rank, "exchange_halo", tp_size)
        if dist.get_world_size(group) != shard.cp_size:
            raise ValueError(
                f"exchange_halo needs the CP group of {shard.cp_size} ranks, got a group of "
                f"{dist.get_world_size(group)}: pass the CP group"
            )
    halo_ids, halo_labels = exchange_values(
        [shard.input_ids, shard.labels],
        [shard.pad_id, shard.ignore_index],
        shard.plan,
        shard.cp_rank,
        shard.num_depths,
        group,
    )
    return shard.with_halo(halo_ids, halo_labels)
