"""Halos: the D values that follow each local stripe in its document, and lookahead from them.

Under context parallelism a rank holds two stripes of every piece (:mod:`.plan`). Depth k of
the MTP module needs ``lookahead(x, k)``, the value k places ahead in the same document, and
for the last k tokens of a stripe that value lives in a later stripe, often on another rank. The
*halo* of a stripe is the D values that follow it in its padded document (fill values where the
document has ended). With the halo in hand every lookahead up to D is local, read from the
rank's *extended* buffer, where local stripe c (C = 2 per piece) is followed by its D halo slots:

    extended = stripe_0 ++ halo_0 ++ stripe_1 ++ halo_1 ++ ...            (per rank, flat)
    lookahead(x, k)[j] = extended[j + D * local_stripe(j) + k]            for every k <= D

The halo of a stripe shorter than D reaches several stripes ahead, so its values can come from
several ranks: owners are derived from the plan, never assumed to be the neighbour.

Two ways to fill halos (docs/design.md#context-parallelism): from the global batch at sharding time
(:func:`halo_from_global`, no communication), or with one ``all_to_all_single`` over the CP
group from the local shards alone (:class:`HaloRoute`, :func:`exchange_values`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from multitoken.parallel.dims import ParallelDims
from multitoken.parallel.plan import ShardPlan

__all__ = [
    "HaloIndex",
    "HaloRoute",
    "ShardMismatchError",
    "check_cp_group",
    "halo_sources",
    "halo_sources_all_ranks",
    "halo_from_global",
    "exchange_values",
]


class ShardMismatchError(RuntimeError):
    """The ranks of a CP group disagree on the split (different batches, shapes or plans)."""


def check_cp_group(
    group: dist.ProcessGroup, cp_size: int, cp_rank: int, what: str, tp_size: int = 1
) -> None:
    """Refuse, before any collective, a group that is not made of whole CP groups.

    On the mesh of :class:`~multitoken.parallel.dims.ParallelDims` (whose
    :meth:`~multitoken.parallel.dims.ParallelDims.coordinates` give each world rank's place), a
    CP group (or a DP x CP group) holds ranks of one ``tp_rank``; in group order, member ``i``
    has ``cp_rank = i % cp`` and each block of ``cp`` consecutive members shares one
    ``dp_rank``. The test reads only the group's member list, which every member sees alike, so
    a wrong group (the DP group, say) fails on all of its members instead of leaving some in a
    collective.

    Args:
        group: the group to check.
        cp_size, cp_rank: the shard's CP size and this rank's CP index.
        what: the caller's name, for the message.
        tp_size: the mesh's tensor-parallel size (the stride between CP peers).
    """
    ranks = dist.get_process_group_ranks(group)
    coords = [ParallelDims.coordinates(w, cp_size, tp_size) for w in ranks]  # (dp, cp, tp)
    whole = (
        len(ranks) % cp_size == 0
        and len({tp for _, _, tp in coords}) == 1
        and all(cp == i % cp_size for i, (_, cp, _) in enumerate(coords))
        and all(coords[i][0] == coords[i - i % cp_size][0] for i in range(len(coords)))
    )
    if not whole or dist.get_rank(group) % cp_size != cp_rank:
        raise ValueError(
            f"{what} needs the CP group (or the DP x CP group) of CP size {cp_size} on a mesh "
            f"of TP size {tp_size}; got a group of world ranks {ranks} where this rank is "
            f"{dist.get_rank(group)}, but the shard is cp_rank {cp_rank}: pass the CP group"
        )


@dataclass(frozen=True)
class HaloSources:
    """Where the halo values of one rank's stripes live (each field ``[..., C, D]``: halo slot
    ``d`` of local stripe ``c`` holds the value ``d + 1`` places after the stripe's last token)."""

    valid: Tensor  # the slot holds a real token of the same document
    global_flat: Tensor  # flat index of the value in the global [B, T] batch
    owner: Tensor  # rank holding the value
    owner_flat: Tensor  # flat index of the value in the owner's [B, T_local] shard

    def map(self, fn: Callable[[Tensor], Tensor]) -> HaloSources:
        """``fn`` applied to every field."""
        fields = (self.valid, self.global_flat, self.owner, self.owner_flat)
        return HaloSources(*(fn(t) for t in fields))

    def by_slot(self) -> HaloSources:
        """The same sources with one entry per halo slot: every field ``[..., C * D]``."""
        return self.map(lambda t: t.flatten(-2))


def halo_sources(plan: ShardPlan, cp_rank: int, num_depths: int) -> HaloSources:
    """Halo sources of every local stripe of rank ``cp_rank``: each field ``[C, D]``.

    Local stripe ``c = 2 * piece + second`` (the first stripe of a piece, then its second) owns
    halo slots ``c * D .. c * D + D - 1``.
    """
    ranks = torch.tensor([cp_rank], device=plan.row.device)
    return _halo_sources(plan, ranks, num_depths).map(lambda t: t[0])


def halo_sources_all_ranks(plan: ShardPlan, num_depths: int) -> HaloSources:
    """:func:`halo_sources` of every rank at once: each field ``[cp, C, D]``, row r for rank r."""
    return _halo_sources(plan, torch.arange(plan.cp_size, device=plan.row.device), num_depths)


def _halo_sources(plan: ShardPlan, cp_ranks: Tensor, num_depths: int) -> HaloSources:
    """Halo sources of the ``R`` ranks in ``cp_ranks``: each field ``[R, C, D]``."""
    cp = plan.cp_size
    device = plan.row.device
    local_stripe = torch.arange(2 * plan.num_pieces, device=device)  # (C,)
    piece = local_stripe // 2  # (C,)
    is_second = (local_stripe % 2)[:, None].bool()  # (C, 1)
    stripe_len = plan.stripe_len[piece][:, None]  # (C, 1)
    rank = cp_ranks[:, None, None]  # (R, 1, 1)
    # Which of the piece's 2 * cp stripes each local stripe is: rank r keeps r and 2 * cp - 1 - r.
    stripe = torch.where(is_second, 2 * cp - 1 - rank, rank)  # (R, C, 1)
    step = torch.arange(num_depths, device=device)  # (D,)
    # Piece offsets of the D tokens following each stripe.
    offset = (stripe + 1) * stripe_len + step  # (R, C, D)
    length, doc = plan.length[piece][:, None], plan.doc[piece][:, None]  # (C, 1)
    valid = (offset < length) & (doc >= 0)  # (R, C, D)
    # The stripe of the piece holding each value, its owner, and the value's offset among the
    # owner's two local stripes of the piece (its first stripe at [0, stripe_len), its second at
    # [stripe_len, 2 * stripe_len)): stripes below cp are an owner's first stripe.
    source_stripe = torch.div(offset, stripe_len, rounding_mode="floor")  # (R, C, D)
    owners_first = source_stripe < cp
    owner = torch.where(owners_first, source_stripe, 2 * cp - 1 - source_stripe)
    offset_in_stripe = offset - source_stripe * stripe_len
    owner_offset = torch.where(owners_first, 0, stripe_len) + offset_in_stripe
    row, start = plan.row[piece][:, None], plan.start[piece][:, None]  # (C, 1)
    local_start = plan.local_start[piece][:, None]  # (C, 1)
    return HaloSources(
        valid=valid,
        global_flat=(row * plan.seqlen + start + offset).expand_as(offset),
        owner=owner,
        owner_flat=(row * plan.local_len + local_start + owner_offset).expand_as(offset),
    )


@dataclass(frozen=True)
class HaloIndex:
    """Where the local tokens and the halo slots of one rank sit in its flat *extended* buffer
    (every local stripe followed by its halo, module docstring), and which entries of that
    buffer hold a real token (everything else reads as fill).

    Attributes:
        num_depths: D, halo slots per stripe.
        shape: ``(B, T_local)`` of the local shard.
        token_index: ``[B * T_local]`` index in the extended buffer of each local token.
        halo_index: ``[C * D]`` index in the extended buffer of each halo slot.
        extended_real: ``[B * T_local + C * D]`` bool: the entry holds a real token.
        token_real: ``[B * T_local]`` bool: the local token itself belongs to a document.
    """

    num_depths: int
    shape: tuple[int, int]
    token_index: Tensor
    halo_index: Tensor
    extended_real: Tensor
    token_real: Tensor

    @classmethod
    def build(cls, plan: ShardPlan, cp_rank: int, num_depths: int, halo_valid: Tensor) -> HaloIndex:
        piece, offset = plan.token_pieces(cp_rank)  # (B * T_local,)
        stripe_len = plan.stripe_len  # (N,)
        is_second = torch.div(offset, stripe_len[piece], rounding_mode="floor") >= plan.cp_size
        local_stripe = 2 * piece + is_second.long()  # (B * T_local,)
        # Each token moves right by the D halo slots of every local stripe before it.
        token_index = torch.arange(piece.numel(), device=piece.device) + num_depths * local_stripe
        n_stripes = 2 * plan.num_pieces
        # Flat end of every local stripe: stripes tile the shard, so a running sum of lengths.
        stripe_end = torch.cumsum(stripe_len.repeat_interleave(2), 0)  # (C,)
        slot = torch.arange(n_stripes * num_depths, device=piece.device)  # (C * D,)
        # max(num_depths, 1): with D = 0 there are no slots, but the division must stay defined.
        slot_stripe = torch.div(slot, max(num_depths, 1), rounding_mode="floor")
        halo_index = stripe_end[slot_stripe] + num_depths * slot_stripe + slot % max(num_depths, 1)
        token_real = (offset < plan.length[piece]) & (plan.doc[piece] >= 0)
        extended_len = piece.numel() + slot.numel()
        extended_real = torch.zeros(extended_len, dtype=torch.bool, device=piece.device)
        extended_real[token_index] = token_real
        extended_real[halo_index] = halo_valid.reshape(-1)
        shape = (plan.batch, plan.local_len)
        return cls(num_depths, shape, token_index, halo_index, extended_real, token_real)

    def lookahead(self, x: Tensor, halo: Tensor, shifts: Sequence[int], fill: int) -> Tensor:
        """``lookahead(x, k)`` of the local shard for every ``k`` in ``shifts`` (each <= D).

        Args:
            x: ``[B, T_local]`` local values.
            halo: ``[C, D]`` the values following every local stripe.
            shifts: non-negative ints, at most D.
            fill: the value where ``i + k`` leaves the document.

        Returns:
            ``[len(shifts), B, T_local]``.
        """
        extended = x.new_full(self.extended_real.shape, fill)  # (B * T_local + C * D,)
        extended[self.token_index] = x.reshape(-1)
        extended[self.halo_index] = halo.reshape(-1).to(x.dtype)
        k = torch.tensor(list(shifts), dtype=torch.long, device=x.device)[:, None]  # (K, 1)
        ahead = self.token_index[None] + k  # (K, B * T_local): index of the value k ahead
        keep = self.extended_real[ahead] & self.token_real[None]
        out = torch.where(keep, extended[ahead], torch.full_like(extended[ahead], fill))
        return out.view(len(shifts), *self.shape)


def halo_from_global(values: Tensor, sources: HaloSources, fill: int) -> Tensor:  # (C, D)
    """Halo of every local stripe read from the global ``[B, T]`` tensor ``values``."""
    flat = values.reshape(-1)
    safe = torch.where(sources.valid, sources.global_flat, 0)
    return torch.where(sources.valid, flat[safe], torch.full_like(flat[safe], fill))


@dataclass(frozen=True)
class HaloRoute:
    """Who sends which local values to whom so that every rank can fill its halos.

    Every rank derives the same table from the plan. Values a rank needs from itself are
    copied locally; the rest travel in one ``all_to_all_single`` whose segment for each peer
    starts with the sender's plan fingerprint, so that ranks with different plans (but
    matching message sizes) fail loudly instead of reading each other's values as their own.

    Attributes:
        send_index: flat local tokens to send, grouped by destination rank.
        send_counts: values for each destination (0 for self).
        recv_slot: flat halo slots filled by the received values, grouped by source rank.
        recv_counts: values from each source (0 for self).
        self_index, self_slot: local tokens that fill this rank's own halo slots.
        valid: ``[C * D]`` halo slots that hold a real value (the rest are fill).
    """

    cp_rank: int
    send_index: Tensor
    send_counts: list[int]
    recv_slot: Tensor
    recv_counts: list[int]
    self_index: Tensor
    self_slot: Tensor
    valid: Tensor

    @classmethod
    def build(cls, plan: ShardPlan, cp_rank: int, num_depths: int) -> HaloRoute:
        cp = plan.cp_size
        # Every rank's needs, one entry per halo slot: fields (cp, C * D).
        needs = halo_sources_all_ranks(plan, num_depths).by_slot()
        requester_rank = torch.arange(cp, device=plan.row.device)[:, None]  # (cp, 1)
        from_peer = needs.valid & (needs.owner != requester_rank)
        # What I send: slots of every other rank that I own, ordered by (requester, slot).
        sent_by_me = from_peer & (needs.owner == cp_rank)
        requester, slot = torch.nonzero(sent_by_me, as_tuple=True)
        send_index = needs.owner_flat[requester, slot]
        send_counts = torch.bincount(requester, minlength=cp).tolist()
        # What I receive: my slots owned by a peer, ordered by (owner, slot) to match the
        # senders' order.
        mine = needs.map(lambda t: t[cp_rank])  # fields (C * D,)
        remote_slots = torch.nonzero(from_peer[cp_rank]).view(-1)
        remote_owner = mine.owner[remote_slots]
        recv_slot = remote_slots[torch.sort(remote_owner, stable=True).indices]
        recv_counts = torch.bincount(remote_owner, minlength=cp).tolist()
        self_slot = torch.nonzero(mine.valid & (mine.owner == cp_rank)).view(-1)
        return cls(
            cp_rank=cp_rank,
            send_index=send_index,
            send_counts=send_counts,
            recv_slot=recv_slot,
            recv_counts=recv_counts,
            self_index=mine.owner_flat[self_slot],
            self_slot=self_slot,
            valid=mine.valid,
        )

    def pack(self, values: Tensor, fingerprint: int) -> tuple[Tensor, list[int]]:
        """Send buffer and split sizes for ``values [n, B * T_local]`` (n integer tensors).

        The segment for each peer is the fingerprint, then ``[count, n]`` values row-major.
        """
        n_tensors = values.shape[0]
        rows = values[:, self.send_index].t()  # (S, n): one row per value sent
        parts, splits, first_row = [], [], 0
        header = values.new_full((1,), fingerprint)
        for peer, count in enumerate(self.send_counts):
            if peer == self.cp_rank:
                splits.append(0)
                continue
            parts += [header, rows[first_row : first_row + count].reshape(-1)]
            splits.append(1 + count * n_tensors)
            first_row += count
        return torch.cat(parts) if parts else values.new_empty(0), splits

    def recv_splits(self, n_tensors: int) -> list[int]:
        """Receive split sizes when ``n_tensors`` tensors travel (one fingerprint per peer)."""
        return [
            0 if peer == self.cp_rank else 1 + count * n_tensors
            for peer, count in enumerate(self.recv_counts)
        ]

    def local_halos(self, values: Tensor, fills: Sequence[int]) -> Tensor:
        """``[n, C * D]`` halos holding the fills and the values this rank owns itself."""
        halos = values.new_empty((values.shape[0], self.valid.numel()))
        for i, fill in enumerate(fills):
            halos[i].fill_(fill)
        halos[:, self.self_slot] = values[:, self.self_index]
        return halos

    def unpack(self, received: Tensor, halos: Tensor, fingerprint: int) -> None:
        """Write the received values into ``halos [n, C * D]``, after checking that every peer
        sent the same plan fingerprint (the check sees every peer, so it fails on every rank).
        """
        n_tensors = halos.shape[0]
        values, peer_fingerprints, segment_start = [], [], 0
        for peer, count in enumerate(self.recv_counts):
            if peer == self.cp_rank:
                peer_fingerprints.append(fingerprint)
                continue
            peer_fingerprints.append(int(received[segment_start]))
            first, end = segment_start + 1, segment_start + 1 + count * n_tensors
            values.append(received[first:end].view(count, n_tensors))
            segment_start = end
        if any(f != fingerprint for f in peer_fingerprints):
            raise ShardMismatchError(
                f"the ranks of the CP group hold shards of different plans (plan fingerprints "
                f"by CP rank: {peer_fingerprints}): every rank must shard the same global batch"
            )
        if values:
            halos[:, self.recv_slot] = torch.cat(values).t()


def exchange_values(
    tensors: Sequence[Tensor],
    fills: Sequence[int],
    plan: ShardPlan,
    cp_rank: int,
    num_depths: int,
    group: dist.ProcessGroup | None,
) -> list[Tensor]:
    """Halos ``[C, D]`` of several local integer tensors with one collective over ``group``.

    All tensors travel packed in one int64 buffer, so the cost in messages does not depend on
    the number of tensors, depths or documents. ``group=None`` is allowed only for
    ``cp_size == 1`` (nothing to exchange).

    Raises:
        ShardMismatchError: a peer sent a different plan fingerprint.
    """
    route = HaloRoute.build(plan, cp_rank, num_depths)
    values = torch.stack([t.reshape(-1).long() for t in tensors])  # (n, B * T_local)
    halos = route.local_halos(values, fills)
    if plan.cp_size > 1:
        fingerprint = plan.fingerprint()
        send, send_splits = route.pack(values, fingerprint)
        recv_splits = route.recv_splits(values.shape[0])
        received = values.new_empty(sum(recv_splits))
        dist.all_to_all_single(received, send, recv_splits, send_splits, group=group)
        route.unpack(received, halos, fingerprint)
    n_stripes = 2 * plan.num_pieces
    return [h.view(n_stripes, num_depths).to(t.dtype) for h, t in zip(halos, tensors)]
