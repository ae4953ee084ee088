"""Halos: the D values that follow each local chunk in its document, and lookahead from them.

Under context parallelism a rank holds two chunks of every piece (:mod:`.plan`). Depth k of
the MTP module needs ``lookahead(x, k)``, the value k places ahead in the same document, and
for the last k tokens of a chunk that value lives in a later chunk, often on another rank. The
*halo* of a chunk is the D values that follow it in its padded document (fill values where the
document has ended). With the halo in hand every lookahead up to D is local:

    ext = chunk_0 ++ halo_0 ++ chunk_1 ++ halo_1 ++ ...      (per rank, flat)
    lookahead(x, k)[j] = ext[j + D * chunk_of(j) + k]        for every k <= D

The halo of a chunk shorter than D reaches several chunks ahead, so its values can come from
several ranks: owners are derived from the plan, never assumed to be the neighbour.

Two ways to fill halos (DESIGN.md section 4): from the global batch at sharding time
(:func:`halo_from_global`, no communication), or with one ``all_to_all_single`` over the CP
group from the local shards alone (:class:`HaloRoute`, :func:`exchange_values`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from multitoken.parallel.plan import ShardPlan

__all__ = [
    "HaloIndex",
    "HaloRoute",
    "ShardMismatchError",
    "check_cp_group",
    "halo_targets",
    "halo_from_global",
    "exchange_values",
]


class ShardMismatchError(RuntimeError):
    """The ranks of a CP group disagree on the split (different batches, shapes or plans)."""


def check_cp_group(group: dist.ProcessGroup, cp_size: int, cp_rank: int, what: str) -> None:
    """Refuse, before any collective, a group that is not made of whole CP groups.

    CP groups are blocks of ``cp_size`` consecutive world ranks starting at a multiple of
    ``cp_size`` (the ``(dp, cp)`` layout of :func:`~multitoken.parallel.mesh.build_mesh`). The
    test reads only the group's member list, which every member sees alike, so a wrong group
    (the DP group, say) fails on all of its members instead of leaving some in a collective.
    """
    ranks = dist.get_process_group_ranks(group)
    blocks = [ranks[i : i + cp_size] for i in range(0, len(ranks), cp_size)]
    whole = len(ranks) % cp_size == 0 and all(
        b == list(range(b[0], b[0] + cp_size)) and b[0] % cp_size == 0 for b in blocks
    )
    if not whole or dist.get_rank(group) % cp_size != cp_rank:
        raise ValueError(
            f"{what} needs the CP group (or the DP x CP group) of CP size {cp_size}; got a "
            f"group of world ranks {ranks} where this rank is {dist.get_rank(group)}, but the "
            f"shard is cp_rank {cp_rank}: pass the CP group"
        )


@dataclass(frozen=True)
class HaloTargets:
    """Where the halo values of one rank's chunks live (each field ``[..., C, D]``)."""

    valid: Tensor  # the slot holds a real token of the same document
    global_flat: Tensor  # flat index of the value in the global [B, T] batch
    owner: Tensor  # rank holding the value
    owner_flat: Tensor  # flat index of the value in the owner's [B, T_local] shard


def halo_targets(plan: ShardPlan, cp_rank: int | Tensor, depth: int) -> HaloTargets:
    """Halo sources of every local chunk of ``cp_rank`` (an int, or ``[R, 1]`` ranks at once).

    Local chunk ``q = 2 * piece + second`` (the first chunk of a piece, then its second) owns
    halo slots ``q * D .. q * D + D - 1``.
    """
    cp = plan.cp_size
    s = plan.chunk_len.repeat_interleave(2)[:, None]  # (C, 1)
    piece = torch.arange(2 * plan.num_pieces, device=s.device) // 2
    second = (torch.arange(2 * plan.num_pieces, device=s.device) % 2)[:, None]
    chunk = torch.where(second.bool(), 2 * cp - 1 - _col(cp_rank), _col(cp_rank))  # (R, C, 1)
    ahead = torch.arange(depth, device=s.device)
    offset = (chunk + 1) * s + ahead  # (..., C, D): piece offsets of the D following tokens
    length, doc = plan.length[piece][:, None], plan.doc[piece][:, None]
    valid = (offset < length) & (doc >= 0)
    owner_chunk = torch.div(offset, s, rounding_mode="floor")
    owner = torch.where(owner_chunk < cp, owner_chunk, 2 * cp - 1 - owner_chunk)
    row, start = plan.row[piece][:, None], plan.start[piece][:, None]
    local_start = plan.local_start[piece][:, None]
    in_slot = torch.where(owner_chunk < cp, 0, s) + offset - owner_chunk * s
    return HaloTargets(
        valid=valid,
        global_flat=(row * plan.seqlen + start + offset).expand_as(offset),
        owner=owner,
        owner_flat=(row * plan.local_len + local_start + in_slot).expand_as(offset),
    )


def _fields(targets: HaloTargets) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return targets.valid, targets.global_flat, targets.owner, targets.owner_flat


def _col(cp_rank: int | Tensor) -> int | Tensor:
    # An int stays an int; ranks [R, 1] become [R, 1, 1] to broadcast over (C, 1).
    return cp_rank[..., None] if isinstance(cp_rank, Tensor) else cp_rank


@dataclass(frozen=True)
class HaloIndex:
    """Positions of the local tokens and of the halo slots in the flat ``ext`` buffer of one
    rank, and which entries of ``ext`` hold a real token (everything else reads as fill)."""

    depth: int
    shape: tuple[int, int]
    token_ext: Tensor  # (B * T_local,)
    halo_ext: Tensor  # (C * D,)
    ext_real: Tensor  # (B * T_local + C * D,) bool
    token_real: Tensor  # (B * T_local,) bool: the token itself belongs to a document

    @classmethod
    def build(cls, plan: ShardPlan, cp_rank: int, depth: int, halo_valid: Tensor) -> HaloIndex:
        piece, offset = plan.token_pieces(cp_rank)  # (B * T_local,)
        s = plan.chunk_len
        second = torch.div(offset, s[piece], rounding_mode="floor") >= plan.cp_size
        chunk = 2 * piece + second.long()  # local chunk of each token
        token_ext = torch.arange(piece.numel(), device=piece.device) + depth * chunk
        n_chunks = 2 * plan.num_pieces
        # Flat end of every local chunk: chunks tile the shard, so a running sum of lengths.
        chunk_end = torch.cumsum(s.repeat_interleave(2), 0)
        slot = torch.arange(n_chunks * depth, device=piece.device)
        q = torch.div(slot, max(depth, 1), rounding_mode="floor")
        halo_ext = chunk_end[q] + depth * q + slot % max(depth, 1)
        token_real = (offset < plan.length[piece]) & (plan.doc[piece] >= 0)
        ext_real = torch.zeros(piece.numel() + slot.numel(), dtype=torch.bool, device=s.device)
        ext_real[token_ext] = token_real
        ext_real[halo_ext] = halo_valid.reshape(-1)
        shape = (plan.batch, plan.local_len)
        return cls(depth, shape, token_ext, halo_ext, ext_real, token_real)

    def lookahead(self, x: Tensor, halo: Tensor, shifts: Sequence[int], fill: int) -> Tensor:
        """``lookahead(x, k)`` of the local shard for every ``k`` in ``shifts`` (each <= D).

        Args:
            x: ``[B, T_local]`` local values.
            halo: ``[C, D]`` the values following every local chunk.
            shifts: non-negative ints, at most D.
            fill: the value where ``i + k`` leaves the document.

        Returns:
            ``[len(shifts), B, T_local]``.
        """
        ext = x.new_full(self.ext_real.shape, fill)
        ext[self.token_ext] = x.reshape(-1)
        ext[self.halo_ext] = halo.reshape(-1).to(x.dtype)
        k = torch.tensor(list(shifts), dtype=torch.long, device=x.device)[:, None]  # (K, 1)
        at = self.token_ext[None] + k  # (K, B * T_local)
        keep = self.ext_real[at] & self.token_real[None]
        out = torch.where(keep, ext[at], torch.full_like(ext[at], fill))
        return out.view(len(shifts), *self.shape)


def halo_from_global(values: Tensor, targets: HaloTargets, fill: int) -> Tensor:  # (C, D)
    """Halo of every local chunk read from the global ``[B, T]`` tensor ``values``."""
    flat = values.reshape(-1)
    safe = torch.where(targets.valid, targets.global_flat, 0)
    return torch.where(targets.valid, flat[safe], torch.full_like(flat[safe], fill))


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
    def build(cls, plan: ShardPlan, cp_rank: int, depth: int) -> HaloRoute:
        cp = plan.cp_size
        ranks = torch.arange(cp, device=plan.row.device)[:, None]
        every = HaloTargets(*(t.flatten(-2) for t in _fields(halo_targets(plan, ranks, depth))))
        # Fields (cp, C * D), slot-major: every rank's needs.
        remote = every.valid & (every.owner != ranks)
        # What I send: slots of every other rank that I own, ordered by (requester, slot).
        mine = remote & (every.owner == cp_rank)
        requester, slot = torch.nonzero(mine, as_tuple=True)
        send_index = every.owner_flat[requester, slot]
        send_counts = torch.bincount(requester, minlength=cp).tolist()
        # What I receive: my remote slots, ordered by (owner, slot) to match the senders.
        own = HaloTargets(*(t.flatten() for t in _fields(halo_targets(plan, cp_rank, depth))))
        need = own.valid & (own.owner != cp_rank)
        slots = torch.nonzero(need).view(-1)
        order = torch.sort(own.owner[slots], stable=True).indices
        recv_slot = slots[order]
        recv_counts = torch.bincount(own.owner[slots], minlength=cp).tolist()
        local = own.valid & (own.owner == cp_rank)
        self_slot = torch.nonzero(local).view(-1)
        return cls(
            cp_rank=cp_rank,
            send_index=send_index,
            send_counts=send_counts,
            recv_slot=recv_slot,
            recv_counts=recv_counts,
            self_index=own.owner_flat[self_slot],
            self_slot=self_slot,
            valid=own.valid,
        )

    def pack(self, values: Tensor, fingerprint: int) -> tuple[Tensor, list[int]]:
        """Send buffer and split sizes for ``values [n, B * T_local]`` (n integer tensors)."""
        n = values.shape[0]
        rows = values[:, self.send_index].t()  # (S, n): one row per value sent
        parts, splits, at = [], [], 0
        header = values.new_full((1,), fingerprint)
        for peer, count in enumerate(self.send_counts):
            if peer == self.cp_rank:
                splits.append(0)
                continue
            parts += [header, rows[at : at + count].reshape(-1)]
            splits.append(1 + count * n)
            at += count
        return torch.cat(parts) if parts else values.new_empty(0), splits

    def recv_splits(self, n: int) -> list[int]:
        return [0 if r == self.cp_rank else 1 + c * n for r, c in enumerate(self.recv_counts)]

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
        n = halos.shape[0]
        values, peers, at = [], [], 0
        for peer, count in enumerate(self.recv_counts):
            if peer == self.cp_rank:
                peers.append(fingerprint)
                continue
            peers.append(int(received[at]))
            values.append(received[at + 1 : at + 1 + count * n].view(count, n))
            at += 1 + count * n
        if any(f != fingerprint for f in peers):
            raise ShardMismatchError(
                f"the ranks of the CP group hold shards of different plans (plan fingerprints "
                f"by CP rank: {peers}): every rank must shard the same global batch"
            )
        if values:
            halos[:, self.recv_slot] = torch.cat(values).t()


def exchange_values(
    tensors: Sequence[Tensor],
    fills: Sequence[int],
    plan: ShardPlan,
    cp_rank: int,
    depth: int,
    group: dist.ProcessGroup | None,
) -> list[Tensor]:
    """Halos ``[C, D]`` of several local integer tensors with one collective over ``group``.

    All tensors travel packed in one int64 buffer, so the cost in messages does not depend on
    the number of tensors, depths or documents. ``group=None`` is allowed only for
    ``cp_size == 1`` (nothing to exchange).

    Raises:
        ShardMismatchError: a peer sent a different plan fingerprint.
    """
    route = HaloRoute.build(plan, cp_rank, depth)
    values = torch.stack([t.reshape(-1).long() for t in tensors])  # (n, B * T_local)
    halos = route.local_halos(values, fills)
    if plan.cp_size > 1:
        fingerprint = plan.fingerprint()
        send, send_splits = route.pack(values, fingerprint)
        recv_splits = route.recv_splits(values.shape[0])
        received = values.new_empty(sum(recv_splits))
        dist.all_to_all_single(received, send, recv_splits, send_splits, group=group)
        route.unpack(received, halos, fingerprint)
    n_chunks = 2 * plan.num_pieces
    return [h.view(n_chunks, depth).to(t.dtype) for h, t in zip(halos, tensors)]
