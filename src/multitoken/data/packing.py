"""Packing documents into fixed-length rows, and turning rows into training batches.

Packing puts several documents in one row of ``seq_len`` tokens so that little of the
batch is padding. Documents stay separate: the batch carries their boundaries as
``cu_seqlens`` and attention and labels never cross them.

Example (``seq_len=8``, documents of 5, 3 and 10 tokens)::

    pack_documents([5, 3, 10], 8).rows == [
        [Segment(2, 0, 8)],                    # first piece of document 2
        [Segment(0, 0, 5), Segment(1, 0, 3)],  # documents 0 and 1: a full row
        [Segment(2, 8, 10)],                   # rest of document 2, then 6 pad tokens
    ]
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from multitoken.errors import DataError

__all__ = [
    "PackingPlan",
    "Segment",
    "build_batch",
    "pack_documents",
]


class Segment(NamedTuple):
    """Tokens ``[start, end)`` of document ``doc_index``, placed contiguously in a row."""

    doc_index: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PackingPlan:
    """Where every document piece goes.

    Attributes:
        rows: For each row, its segments in order; a row's segments sum to at most
            ``seq_len`` tokens and the rest of the row is padding.
        seq_len: Row length in tokens.
        num_tokens: Real (non-pad) tokens over all rows.
    """

    rows: list[list[Segment]]
    seq_len: int
    num_tokens: int

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def padding_fraction(self) -> float:
        """Pad tokens divided by all row tokens (0.0 when there are no rows)."""
        total = len(self.rows) * self.seq_len
        return (total - self.num_tokens) / total if total else 0.0


def pack_documents(
    lengths: Sequence[int] | np.ndarray, seq_len: int, align: int = 1
) -> PackingPlan:
    """Pack documents into rows of ``seq_len`` tokens, best-fit decreasing.

    A document longer than ``seq_len`` is first cut into pieces of ``seq_len`` tokens
    (the last piece shorter); each piece is then packed as a document of its own.
    Pieces are taken longest first (ties by document index, then by start) and each
    goes to the open row with the least room that still fits it (ties: the row opened
    first), or to a new row. Empty documents are dropped. The result depends only on
    ``lengths``, so every rank computes the same plan.

    Note that rows come out roughly sorted by the length of their longest piece; shuffle
    them before training (:class:`~multitoken.data.loader.PackedLoader` does).

    Args:
        lengths: Length in tokens of each document.
        seq_len: Row length in tokens.
        align: every piece occupies a multiple of ``align`` tokens of its row (its tail is
            padding). Context parallelism cuts every document into ``2 * cp`` equal parts;
            packing with ``align = 2 * cp`` makes every piece already divisible, so the shards
            need no extra padding and every step has the same shape. Must divide ``seq_len``.

    Returns:
        The packing plan.

    Raises:
        DataError: If ``seq_len < 1``, ``align`` does not divide it, or a length is negative.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if align < 1 or seq_len % align:
        raise DataError(f"align={align} must be >= 1 and divide seq_len={seq_len}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size and lengths.min() < 0:
        raise DataError(f"document lengths must be >= 0, got {int(lengths.min())}")

    # Cut into pieces, vectorised: piece j of document d covers [j*seq_len, ...).
    pieces_per_doc = -(-lengths // seq_len)  # (num_docs,) ceil division
    piece_doc = np.repeat(np.arange(len(lengths), dtype=np.int64), pieces_per_doc)
    first_piece = np.cumsum(pieces_per_doc) - pieces_per_doc
    piece_start = (np.arange(len(piece_doc)) - np.repeat(first_piece, pieces_per_doc)) * seq_len
    piece_end = np.minimum(piece_start + seq_len, lengths[piece_doc])
    # lexsort sorts by the last key first: longest first, then document, then start.
    order = np.lexsort((piece_start, piece_doc, piece_start - piece_end))

    rows: list[list[Segment]] = []
    # Open rows grouped by remaining room: a sorted list of the distinct room values
    # (at most seq_len - 1 of them, so bisect and insort stay cheap however many rows
    # are open) and, per room value, a heap of row indices to find the oldest row.
    room_values: list[int] = []
    rows_by_room: dict[int, list[int]] = {}
    for doc, start, end in zip(
        piece_doc[order].tolist(), piece_start[order].tolist(), piece_end[order].tolist()
    ):
        segment = Segment(doc, start, end)
        size = -(-(end - start) // align) * align  # the footprint, padded to ``align``
        slot = bisect.bisect_left(room_values, size)
        if slot < len(room_values):
            room = room_values[slot]
            candidates = rows_by_room[room]
            row = heapq.heappop(candidates)
            if not candidates:
                del room_values[slot]
                del rows_by_room[room]
            rows[row].append(segment)
            room -= size
        else:
            row = len(rows)
            rows.append([segment])
            room = seq_len - size
        if room > 0:
            candidates = rows_by_room.get(room)
            if candidates is None:
                rows_by_room[room] = [row]
                bisect.insort(room_values, room)
            else:
                heapq.heappush(candidates, row)
    return PackingPlan(rows=rows, seq_len=seq_len, num_tokens=int(lengths.sum()))


def build_batch(
    corpus_tokens: Sequence[np.ndarray] | Sequence[Sequence[int]],
    rows: Sequence[Sequence[Segment]],
    seq_len: int,
    pad_id: int,
    ignore_index: int = -100,
    align: int = 1,
) -> dict[str, torch.Tensor]:
    """Materialise packed rows as a training batch.

    Labels are already shifted: ``labels[b, t]`` is the target of position ``t``, the
    next token of the same document piece. A piece's last token has no label
    (``ignore_index``): its next token, if any, lies in the next piece of the document,
    which sits in another row or batch. Padding has no label either.

    Example (``seq_len=6``, one row holding document A = [a0, a1, a2] and a two-token
    piece [b0, b1] of document B, then one pad token)::

        input_ids  = [[a0, a1, a2, b0, b1, pad]]
        labels     = [[a1, a2, -100, b1, -100, -100]]
        cu_seqlens = [0, 3, 5, 6]

    Args:
        corpus_tokens: Token ids of every document, indexed by ``Segment.doc_index``
            (a store split, or a list of arrays).
        rows: Segments of each row, as in :attr:`PackingPlan.rows`.
        seq_len: Row length ``T``.
        pad_id: Input id written on padding.
        ignore_index: Label written where there is no target.
        align: pieces occupy a multiple of ``align`` tokens, as in :func:`pack_documents`;
            the padding after a piece belongs to the piece's segment in ``cu_seqlens``
            (pad ids, no labels, only ever seen by itself), so no extra segment appears.

    Returns:
        ``input_ids`` int64 ``(B, T)``, ``labels`` int64 ``(B, T)`` and ``cu_seqlens``
        int64 ``(num_segments + 1,)``: boundaries over the flattened ``B * T`` tokens in
        the flash-attention convention, starting at 0 and ending at ``B * T``. The
        padding at the end of a row is a segment of its own, so no segment crosses a
        row boundary.

    Raises:
        DataError: If a segment is empty, lies outside its document or overflows its row.
    """
    num_rows = len(rows)
    input_ids = np.full((num_rows, seq_len), pad_id, dtype=np.int64)  # (B, T)
    labels = np.full((num_rows, seq_len), ignore_index, dtype=np.int64)  # (B, T)
    cu_seqlens = [0]
    for r, row in enumerate(rows):
        pos = 0
        for doc_index, start, end in row:
            doc = corpus_tokens[doc_index]
            size = end - start
            if not 0 <= start < end <= len(doc):
                raise DataError(
                    f"segment ({doc_index}, {start}, {end}) is empty or outside document "
                    f"{doc_index} of {len(doc)} tokens: build rows with pack_documents"
                )
            if pos + size > seq_len:
                raise DataError(
                    f"row {r} holds more than seq_len={seq_len} tokens: pack it with "
                    "pack_documents using the same seq_len"
                )
            piece = np.asarray(doc[start:end])
            input_ids[r, pos : pos + size] = piece
            labels[r, pos : pos + size - 1] = piece[1:]
            pos += -(-size // align) * align
            cu_seqlens.append(r * seq_len + pos)
        if pos < seq_len:
            cu_seqlens.append((r + 1) * seq_len)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int64),
    }
