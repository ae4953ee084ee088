"""The FlexAttention ``BlockMask`` of a document mask, from per-block ranges of the metadata.

``create_block_mask`` evaluates the mask rule on every ``[B, Tq, Tk]`` (query, key) pair to find
the blocks that are empty, partial or full (about 10 bytes per pair, eagerly: 5 GB at B = 8,
T = 8192). The rule here depends on three per-token values (document id, position, index in the
row), so a block pair can be classified from the ranges of those values over each block:
``[B, Tq / 128]`` and ``[B, Tk / 128]`` summaries and one ``[B, Tq / 128, Tk / 128]`` table,
never a per-pair tensor, and no host sync. A pair is kept (partial) when the ranges allow some
pair in it; it is full when they prove every pair allowed, which FlexAttention then computes
without the mask rule. Keeping a block that turns out empty costs time, never correctness: the
rule runs on every pair of a partial block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from multitoken.layout import SequenceLayout

__all__ = ["document_block_mask", "BLOCK"]

BLOCK = 128  # FlexAttention's block size (queries and keys)
_BIG = 1 << 62


class _Blocks:
    """Per-block ranges of one layout's metadata, ``[B, n_blocks]`` each."""

    def __init__(self, layout: SequenceLayout, block: int):
        batch, length = layout.shape
        n = -(-length // block)
        pad = n * block - length
        device = layout.device

        def blocks(x: Tensor, fill: int) -> Tensor:  # (B, n, block)
            x = x.long()
            if pad:
                x = torch.cat([x, x.new_full((batch, pad), fill)], dim=1)
            return x.view(batch, n, block)

        present = blocks(torch.ones(batch, length, dtype=torch.long, device=device), 0).bool()
        doc = blocks(layout.doc_ids, -2)  # -2: past the end (no token)
        real = doc >= 0
        self.complete = present.all(-1)  # no position past the end of the sequence
        self.doc_min = torch.where(present, doc, _BIG).amin(-1)
        self.doc_max = torch.where(present, doc, -_BIG).amax(-1)
        pos = blocks(layout.positions, 0)
        self.pos_min = torch.where(present, pos, _BIG).amin(-1)
        self.pos_max = torch.where(present, pos, -_BIG).amax(-1)
        seq = blocks(layout.seq_index, 0)
        self.real_any, self.real_all = real.any(-1), real.all(-1)
        self.seq_min = torch.where(real, seq, _BIG).amin(-1)
        self.seq_max = torch.where(real, seq, -_BIG).amax(-1)


def _pairs(q: _Blocks, kv: _Blocks, causal: bool) -> tuple[Tensor, Tensor]:
    """``(maybe, full)``, each ``[B, n_q, n_kv]``: some pair allowed / every pair allowed."""

    def both(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:  # (B, n_q, 1), (B, 1, n_kv)
        return a[:, :, None], b[:, None, :]

    qd_min, kd_min = both(q.doc_min, kv.doc_min)
    qd_max, kd_max = both(q.doc_max, kv.doc_max)
    qp_min, kp_min = both(q.pos_min, kv.pos_min)
    qp_max, kp_max = both(q.pos_max, kv.pos_max)
    q_done, k_done = both(q.complete, kv.complete)
    # Same document and key position <= query position.
    maybe = (qd_min <= kd_max) & (kd_min <= qd_max) & (kp_min <= qp_max)
    one_doc = (qd_min == qd_max) & (kd_min == kd_max) & (qd_min == kd_min)
    full = one_doc & (kp_max <= qp_min) & q_done & k_done
    if causal:  # or: both real and key index <= query index in the row
        q_any, k_any = both(q.real_any, kv.real_any)
        q_all, k_all = both(q.real_all, kv.real_all)
        qs_min, ks_min = both(q.seq_min, kv.seq_min)
        qs_max, ks_max = both(q.seq_max, kv.seq_max)
        maybe |= q_any & k_any & (ks_min <= qs_max)
        full |= q_all & k_all & (ks_max <= qs_min) & q_done & k_done
    return maybe, full


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``(count [B, 1, n_q], indices [B, 1, n_q, n_kv])``: the chosen key blocks first."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)
    return count[:, None], order.to(torch.int32)[:, None]


def document_block_mask(
    q: SequenceLayout,
    kv: SequenceLayout,
    causal: bool,
    mask_mod: Callable,
    block: int = BLOCK,
) -> BlockMask:
    """The ``BlockMask`` of :class:`~multitoken.models.attention.AttentionMask`'s rule.

    Args:
        q: the queries' layout ``[B, Tq]``; kv: the keys' ``[B, Tk]``.
        causal: the ``"causal"`` mode (else ``"document"``).
        mask_mod: the rule per pair, run inside the partial blocks.
        block: the block size (FlexAttention's 128; smaller in tests).
    """
    maybe, full = _pairs(_Blocks(q, block), _Blocks(kv, block), causal)
    partial = maybe & ~full
    kv_count, kv_indices = _ordered(partial)
    full_count, full_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_count,
        kv_indices,
        full_count,
        full_indices,
        BLOCK_SIZE=block,
        mask_mod=mask_mod,
        seq_lengths=(q.shape[1], kv.shape[1]),
    )
