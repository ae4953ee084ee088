"""Which rank holds which token: the load-balanced context-parallel split of a batch.

The split is the one Megatron-LM and TransformerEngine use (docs/design.md#context-parallelism).
Every
*piece* of a row (a document, a run of ``doc_id == -1`` tokens, or the whole row when the batch
is unpacked) is padded to a multiple of ``2 * cp`` and cut into ``2 * cp`` equal stripes; rank r
keeps stripes ``r`` and ``2 * cp - 1 - r`` of every piece, in row order. Causal attention costs
about the same on every rank, because each rank holds one early and one late stripe.

Rows of a packed batch can differ in padded length (each document rounds up on its own). Every
row is brought to the longest padded length by one more piece at its end, a tail of
``doc_id == -1`` tokens that is cut into stripes like the others, so that every rank's shard is a
rectangular ``[B, T_local]`` with ``T_local = max padded row length / cp``.

A :class:`ShardPlan` describes the split with a handful of integers per piece, so it is cheap
to build, identical on every rank, and enough to derive, without communication, every rank's
local layout, the layout of the keys gathered over the CP group, and who owns the halo of every
stripe (:mod:`multitoken.parallel.context`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.layout import LayoutError, SequenceLayout

__all__ = ["ShardPlan", "plan_shards"]


@dataclass(frozen=True)
class ShardPlan:
    """The context-parallel split of a ``[B, T]`` batch into ``cp`` shards ``[B, T_local]``.

    One entry per piece (N pieces over all rows, in row-major order). Build it with
    :func:`plan_shards`.

    Attributes:
        cp_size: number of context-parallel ranks.
        batch: rows B.
        seqlen: T of the global (unsharded) batch.
        local_len: T_local of every shard.
        row: ``[N]`` row of each piece.
        doc: ``[N]`` document id of each piece (-1: padding, no document).
        start: ``[N]`` index of the piece's first token in its unsharded row.
        length: ``[N]`` real tokens of the piece (0 for a row tail).
        padded: ``[N]`` padded length, a multiple of ``2 * cp_size``.
        pos0: ``[N]`` position (inside its document) of the piece's first token.
        local_start: ``[N]`` where the piece's two stripes start in every rank's local row.
    """

    cp_size: int
    batch: int
    seqlen: int
    local_len: int
    row: Tensor
    doc: Tensor
    start: Tensor
    length: Tensor
    padded: Tensor
    pos0: Tensor
    local_start: Tensor

    @property
    def stripe_len(self) -> Tensor:
        """``[N]`` tokens per stripe of each piece."""
        return self.padded // (2 * self.cp_size)

    @property
    def num_pieces(self) -> int:
        return int(self.row.numel())

    def fingerprint(self) -> int:
        """A 20-bit digest of the plan: equal on ranks that agree on the split."""
        fields = torch.stack([self.row, self.doc, self.start, self.length, self.padded, self.pos0])
        head = torch.tensor([self.cp_size, self.batch, self.seqlen, self.local_len])
        data = torch.cat([head, fields.reshape(-1).cpu()]).numpy().tobytes()
        return zlib.crc32(data) & 0xFFFFF

    def token_pieces(self, cp_rank: int) -> tuple[Tensor, Tensor]:
        """Piece and offset inside the padded piece of every local token of rank ``cp_rank``.

        Returns:
            ``(piece, offset)``, each ``[B * T_local]``, flat in row-major order of the shard.
        """
        ranks = torch.tensor([cp_rank], device=self.row.device)
        piece, offset = self._token_pieces(ranks)  # (1, B * T_local)
        return piece[0], offset[0]

    def token_pieces_all_ranks(self) -> tuple[Tensor, Tensor]:
        """:meth:`token_pieces` of every rank at once: ``(piece, offset)``, each
        ``[cp, B * T_local]``, row r for rank r."""
        return self._token_pieces(torch.arange(self.cp_size, device=self.row.device))

    def _token_pieces(self, cp_ranks: Tensor) -> tuple[Tensor, Tensor]:
        """``(piece, offset)``, each ``[R, B * T_local]``, of the ``R`` ranks in ``cp_ranks``."""
        # Every rank's shard is the same sequence of pieces, two stripes each; only which two
        # stripes of the piece (so the offsets) depend on the rank.
        device = self.row.device
        tokens_per_rank = 2 * self.stripe_len  # (N,) tokens of each piece on every rank
        pieces = torch.arange(self.num_pieces, device=device)
        piece = torch.repeat_interleave(pieces, tokens_per_rank)  # (B * T_local,)
        flat = torch.arange(piece.numel(), device=device)
        # Offset inside the piece's two local stripes, in [0, 2 * stripe_len).
        local_offset = flat - (self.row * self.local_len + self.local_start)[piece]
        stripe_len = self.stripe_len[piece]  # (B * T_local,)
        in_second = local_offset >= stripe_len
        offset_in_stripe = local_offset - in_second.long() * stripe_len
        rank = cp_ranks[:, None]  # (R, 1)
        # Rank r keeps stripes r and 2 * cp - 1 - r of every piece.
        stripe = torch.where(in_second, 2 * self.cp_size - 1 - rank, rank)  # (R, B * T_local)
        offset = stripe * stripe_len + offset_in_stripe
        return piece.expand_as(offset), offset

    def layout_of(self, piece: Tensor, offset: Tensor) -> SequenceLayout:
        """Layout of tokens given by ``(piece, offset)``, reshaped to ``[B, -1]``.

        Real tokens keep their document id, position and index in the unsharded row; padding
        added by the split gets ``doc_id = -1``, position 0 and index 0.
        """
        real = offset < self.length[piece]
        doc = torch.where(real, self.doc[piece], -1)
        positions = torch.where(doc >= 0, self.pos0[piece] + offset, 0)
        seq_index = torch.where(real, self.start[piece] + offset, 0)
        shape = (self.batch, -1)
        return SequenceLayout(doc.view(shape), positions.view(shape), seq_index.view(shape))

    def kv_layout(self) -> SequenceLayout:
        """Layout of the keys gathered over the CP group: every rank's shard, in rank order,
        concatenated along the sequence: ``[B, cp * T_local]``."""
        piece, offset = self.token_pieces_all_ranks()  # (cp, B * T_local)
        flat = (self.batch, self.local_len)

        def row_major(t: Tensor) -> Tensor:  # (cp, B * T_local) -> (B * cp * T_local,)
            return t.view(self.cp_size, *flat).transpose(0, 1).reshape(-1)

        return self.layout_of(row_major(piece), row_major(offset))


def _piece_starts(doc: Tensor) -> Tensor:
    """``[B, T]`` bool: True where a token starts a run of equal document ids (a piece)."""
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return starts


def plan_shards(layout: SequenceLayout, cp_size: int, *, pad: bool = True) -> ShardPlan:
    """Plan the load-balanced split of a batch over ``cp_size`` ranks.

    Args:
        layout: layout of the global ``[B, T]`` batch (unsharded: ``seq_index = arange(T)``).
        cp_size: context-parallel ranks (1 gives the identity split).
        pad: pad every piece to a multiple of ``2 * cp_size``. With ``pad=False`` every
            document (every row, when unpacked) must already be such a multiple.

    Raises:
        LayoutError: ``cp_size`` is not a positive int, a document is split into separate runs,
            positions do not count up inside a document, the layout is already sharded, or
            ``pad=False`` and a piece is not a multiple of ``2 * cp_size``.

    Example (the seed example: documents [0, 5) and [5, 12), cp = 2)::

        >>> layout = SequenceLayout.from_cu_seqlens(torch.tensor([0, 5, 12]), shape=(1, 12))
        >>> plan = plan_shards(layout, cp_size=2)
        >>> plan.padded.tolist(), plan.stripe_len.tolist(), plan.local_len
        ([8, 8], [2, 2], 8)
        >>> plan.kv_layout().doc_ids  # rank 0 (stripes 0, 3 of each document), then rank 1
        tensor([[ 0,  0, -1, -1,  1,  1,  1, -1,  0,  0,  0, -1,  1,  1,  1,  1]])
    """
    if not isinstance(cp_size, int) or isinstance(cp_size, bool) or cp_size < 1:
        raise LayoutError(f"cp_size must be an int >= 1, got {cp_size!r}")
    doc, positions = layout.doc_ids.long(), layout.positions.long()
    batch, seqlen = layout.shape
    device = doc.device
    if not torch.equal(layout.seq_index, torch.arange(seqlen, device=device).expand_as(doc)):
        raise LayoutError(
            "layout.seq_index is not arange(T): the layout looks already sharded; shard the "
            "global batch"
        )
    piece_starts = _piece_starts(doc)
    row, start = torch.nonzero(piece_starts, as_tuple=True)  # (N,) each, row-major
    first_flat = row * seqlen + start
    length = torch.diff(first_flat, append=first_flat.new_tensor([batch * seqlen]))
    piece_doc = doc[row, start].clamp(min=-1)
    pos0 = torch.where(piece_doc >= 0, positions[row, start], 0)
    _check_documents(doc, positions, piece_starts, row, piece_doc, pos0, start)

    multiple = 2 * cp_size
    padded = (length + multiple - 1) // multiple * multiple
    if not pad and bool((padded != length).any()):
        piece = int(torch.nonzero(padded != length)[0, 0])  # the first piece that needs padding
        if int(length[piece]) == seqlen:
            what = "row"
        else:
            what = f"document at token {int(start[piece])} of row"
        raise LayoutError(
            f"{what} {int(row[piece])} has {int(length[piece])} tokens, not a multiple of "
            f"2*cp_size={multiple}: each of the {multiple} stripes needs an equal share; pass "
            "pad=True to pad every document, or make lengths multiples of 2*cp_size"
        )
    row_padded = torch.zeros(batch, dtype=torch.long, device=device).index_add_(0, row, padded)
    longest_row = int(row_padded.max())
    row, piece_doc, start, length, padded, pos0 = _pad_rows(
        row_padded, longest_row, seqlen, row, piece_doc, start, length, padded, pos0
    )
    tokens_per_rank = padded // cp_size  # (N,) two stripes of every piece on every rank
    # Where each piece starts in the concatenation of all local rows (exclusive running sum),
    # then made relative to the start of its row.
    flat_start = torch.cumsum(tokens_per_rank, 0) - tokens_per_rank
    # Pieces are sorted by row and every row has at least one: its first piece starts it.
    row_start = flat_start[torch.searchsorted(row, torch.arange(batch, device=device))]  # (B,)
    return ShardPlan(
        cp_size=cp_size,
        batch=batch,
        seqlen=seqlen,
        local_len=longest_row // cp_size,
        row=row,
        doc=piece_doc,
        start=start,
        length=length,
        padded=padded,
        pos0=pos0,
        local_start=flat_start - row_start[row],
    )


def _check_documents(
    doc: Tensor,
    positions: Tensor,
    piece_starts: Tensor,
    row: Tensor,
    piece_doc: Tensor,
    pos0: Tensor,
    start: Tensor,
) -> None:
    """The sharder treats every run as its own document; a layout that disagrees would make the
    sharded lookahead differ from the unsharded one, so refuse it."""
    real = piece_doc >= 0
    # One key per (row, document id): a repeated key is a document split into two runs.
    keys = row[real] * (int(doc.max()) + 2) + piece_doc[real]
    if torch.unique(keys).numel() != keys.numel():
        raise LayoutError(
            "a document id appears in two separate runs of one row: give every document its "
            "own id (SequenceLayout.from_doc_ids checks this)"
        )
    seqlen = doc.shape[1]
    token_piece = torch.cumsum(piece_starts.reshape(-1), 0) - 1  # (B * T,)
    offset = torch.arange(doc.numel(), device=doc.device) - (row * seqlen + start)[token_piece]
    expected = pos0[token_piece] + offset  # (B * T,)
    wrong = (doc.reshape(-1) >= 0) & (positions.reshape(-1) != expected)
    if bool(wrong.any()):
        token = int(torch.nonzero(wrong)[0, 0])  # first wrong token, flat over [B, T]
        raise LayoutError(
            f"positions must count up by one inside a document; token {token % seqlen} of "
            f"row {token // seqlen} has position {int(positions.reshape(-1)[token])}, expected "
            f"{int(expected[token])}"
        )


def _pad_rows(row_padded: Tensor, longest_row: int, seqlen: int, row: Tensor, *pieces: Tensor):
    """Give every row shorter than the longest one a tail piece of padding (no document,
    starting past the row's end), so that every row has the same local length on every rank.

    ``pieces`` are the per-piece ``(doc, start, length, padded, pos0)``; returns ``(row,
    *pieces)`` with the tails appended, sorted by row (tails after their row's pieces)."""
    tail_rows = torch.nonzero(row_padded < longest_row).view(-1)
    if not tail_rows.numel():
        return (row, *pieces)
    n_tail = tail_rows.numel()
    piece_doc, start, length, padded, pos0 = pieces
    row = torch.cat([row, tail_rows])
    piece_doc = torch.cat([piece_doc, piece_doc.new_full((n_tail,), -1)])
    start = torch.cat([start, start.new_full((n_tail,), seqlen)])
    length = torch.cat([length, length.new_zeros(n_tail)])
    padded = torch.cat([padded, longest_row - row_padded[tail_rows]])
    pos0 = torch.cat([pos0, pos0.new_zeros(n_tail)])
    # A stable sort on the row puts each tail after its row's pieces.
    order = torch.sort(row, stable=True).indices
    return tuple(t[order] for t in (row, piece_doc, start, length, padded, pos0))
