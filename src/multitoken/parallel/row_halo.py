"""Lookahead of per-position *rows* (hidden states) under context parallelism.

The acceptance-aware losses (docs/design.md#acceptance-aware-losses) compare depth k at
position i with the backbone at i + k: ``h^0_{i+k}``. Under CP the last k positions of a
stripe find that row in a later stripe, often on another rank. :class:`RowHalo` is the
token halo (:mod:`.halo`) for rows: the ``D`` rows that follow each local stripe in its
document travel with one ``all_to_all_single`` over the CP group (the same route as the
token halo's, the fp32 rows bit-cast to integers, so they arrive bit for bit), once per tensor
and step; then every ``lookahead(h, k)``, ``k <= D``, is local. The rows are detached: the
teacher takes no gradient.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
import torch.distributed as dist
from torch import Tensor

from multitoken.parallel.halo import HaloIndex, exchange_values, halo_sources
from multitoken.parallel.plan import ShardPlan

__all__ = ["RowHalo"]


class RowHalo:
    """``lookahead`` of this shard's ``[B, T_local, H]`` rows by ``k <= D`` places in their
    documents (zeros where the document ends), the rows past a stripe fetched from the peers.

    Args:
        plan: the batch's CP split (the shard's ``plan``).
        cp_rank: this rank's index in the CP group.
        num_depths: D, the farthest lookahead.
        group: the CP process group (explicit: every CP rank calls together).
    """

    def __init__(self, plan: ShardPlan, cp_rank: int, num_depths: int, group: dist.ProcessGroup):
        self.plan, self.cp_rank, self.num_depths, self.group = plan, cp_rank, num_depths, group
        self._index: HaloIndex | None = None  # built on first use (a CE step never asks)
        self._source: Tensor | None = None
        self._halo: Tensor | None = None

    def _on(self, device: torch.device) -> None:
        """The plan on the rows' device (a batch is cut on the host; NCCL routes GPU tensors)."""
        if self.plan.row.device != device:
            moved = {f.name: getattr(self.plan, f.name) for f in fields(self.plan)}
            moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in moved.items()}
            self.plan, self._index = replace(self.plan, **moved), None

    @property
    def index(self) -> HaloIndex:
        if self._index is None:
            valid = halo_sources(self.plan, self.cp_rank, self.num_depths).valid
            self._index = HaloIndex.build(self.plan, self.cp_rank, self.num_depths, valid)
        return self._index

    def halo(self, rows: Tensor) -> Tensor:
        """``[C, D, H]`` the rows following every local stripe (one collective per tensor)."""
        if self._source is rows:
            return self._halo
        self._on(rows.device)
        flat = rows.detach().float().contiguous()  # (B, T_local, H)
        bits = flat.view(torch.int32).permute(2, 0, 1)  # (H, B, T_local): values to route
        fills = [0] * bits.shape[0]
        halos = exchange_values(list(bits), fills, self.plan, self.cp_rank, self.num_depths,
                                self.group)  # fmt: skip
        halo = torch.stack(halos, dim=-1).to(torch.int32).view(torch.float32)  # (C, D, H)
        self._source, self._halo = rows, halo.to(rows.dtype)
        return self._halo

    def __call__(self, rows: Tensor, k: int) -> Tensor:
        """``[B, T_local, H]`` row ``i + k`` of ``rows`` at every ``i`` (detached)."""
        if not 0 < k <= self.num_depths:
            raise ValueError(f"lookahead {k} outside 1..{self.num_depths}")
        halo = self.halo(rows)
        index, width = self.index, rows.shape[-1]
        token_index, halo_index = index.token_index, index.halo_index
        extended = rows.new_zeros((index.extended_real.numel(), width))
        extended[token_index] = rows.detach().reshape(-1, width)
        extended[halo_index] = halo.reshape(-1, width)
        ahead = token_index + k
        keep = index.extended_real[ahead] & index.token_real
        out = torch.where(keep[:, None], extended[ahead], 0.0)
        return out.view(*rows.shape)
