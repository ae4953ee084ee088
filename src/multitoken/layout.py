"""Where the documents are in a ``[B, T]`` batch.

A :class:`SequenceLayout` is built once per batch, from ``cu_seqlens`` (the flash-attention /
THD convention over the flattened ``B * T`` tokens) or from per-token document ids, and is then
the only description of document boundaries that the rest of the library reads: the lookahead
primitive, the attention mask, rotary positions and, under context parallelism, the sharder.

Every token carries three integers:

* ``doc_ids``: a document id, unique in the batch. ``-1`` marks a token that belongs to no
  document (padding added by the context-parallel sharder); such a token sees only itself and
  is never looked ahead into.
* ``positions``: the position inside its document, restarting at 0 (rotary positions).
* ``seq_index``: the token's index in its (unsharded) row; orders tokens for the row-causal
  attention mode. Equal to ``arange(T)`` unless the row was sharded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.errors import LayoutError, check_int_tensor, validation_enabled

__all__ = ["SequenceLayout", "LayoutError"]


def _check_int_tensor(name: str, t: object, ndim: int) -> None:
    check_int_tensor(name, t, ndim, error=LayoutError)


@dataclass(frozen=True)
class SequenceLayout:
    """Document boundaries of a ``[B, T]`` batch.

    Build it with :meth:`from_cu_seqlens`, :meth:`from_doc_ids` or :meth:`rows`; the
    constructor takes already-validated tensors.

    Example (the seed example: one row, documents [0, 5) and [5, 12))::

        >>> layout = SequenceLayout.from_cu_seqlens(torch.tensor([0, 5, 12]), shape=(1, 12))
        >>> layout.doc_ids
        tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
        >>> layout.positions
        tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])

    Attributes:
        doc_ids: ``[B, T]`` int64, document id of each token (unique in the batch), -1 = no
            document.
        positions: ``[B, T]`` int64, position of each token inside its document.
        seq_index: ``[B, T]`` int64, index of each token in its unsharded row.
    """

    doc_ids: Tensor
    positions: Tensor
    seq_index: Tensor
    # Built by rows(): one document per row, so attention is plain causal (kernels have a fast
    # path for it that an explicit mask would switch off).
    one_per_row: bool = False

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_cu_seqlens(
        cls, cu_seqlens: Tensor, shape: tuple[int, int], *, validate: bool | None = None
    ) -> SequenceLayout:
        """Layout from cumulative document lengths over the flattened ``B * T`` tokens.

        Args:
            cu_seqlens: ``[N + 1]`` int32/int64, first 0, last ``B * T``, non-decreasing (empty
                documents are allowed); every row start ``b * T`` must be a boundary.
            shape: ``(B, T)`` of the batch.
            validate: check the conditions above (costs a device sync on CUDA); None = unless
                value checks are off (:func:`multitoken.errors.set_validation`).

        Raises:
            LayoutError: naming the violated condition.
        """
        batch, seqlen = _check_shape(shape)
        _check_int_tensor("cu_seqlens", cu_seqlens, 1)
        cu = cu_seqlens.long()
        total = batch * seqlen
        if validation_enabled() if validate is None else validate:
            if cu.numel() < 2:
                raise LayoutError(
                    f"cu_seqlens must hold at least 2 entries (0 and B*T={total}), got {cu.numel()}"
                )
            first, last = int(cu[0]), int(cu[-1])
            if first != 0:
                raise LayoutError(f"cu_seqlens must start at 0, got {first}")
            if last != total:
                raise LayoutError(
                    f"cu_seqlens must end at B*T={batch}*{seqlen}={total} (lengths must add up "
                    f"to the batch), got {last}"
                )
            steps = cu[1:] - cu[:-1]
            if bool((steps < 0).any()):
                at = int(torch.nonzero(steps < 0)[0, 0])
                raise LayoutError(
                    f"cu_seqlens must be non-decreasing, but cu_seqlens[{at + 1}]={int(cu[at + 1])}"
                    f" < cu_seqlens[{at}]={int(cu[at])}"
                )
            # A document crosses a row when a row start falls strictly inside it.
            row_starts = torch.arange(0, total, seqlen, device=cu.device)
            hit = torch.isin(row_starts, cu)
            if not bool(hit.all()):
                row = int(torch.nonzero(~hit)[0, 0])
                raise LayoutError(
                    f"a document crosses the boundary between rows {row - 1} and {row} (token "
                    f"{row * seqlen} is not in cu_seqlens): split documents at row boundaries"
                )
        # Document id of every flat token: number of boundaries <= index, minus one. Empty
        # documents get ids that no token carries, which is harmless.
        flat = torch.arange(total, device=cu.device)
        doc = torch.searchsorted(cu, flat, right=True) - 1  # (B*T,)
        positions = flat - cu[doc]
        return cls(
            doc_ids=doc.view(batch, seqlen),
            positions=positions.view(batch, seqlen),
            seq_index=torch.arange(seqlen, device=cu.device).expand(batch, seqlen),
        )

    @classmethod
    def from_lengths(
        cls,
        lengths: Sequence[Sequence[int]] | Sequence[int],
        shape: tuple[int, int] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> SequenceLayout:
        """Layout from document lengths, one list per row (or one flat list and a shape).

        Example::

            >>> SequenceLayout.from_lengths([[2, 3], [5]]).doc_ids
            tensor([[0, 0, 1, 1, 1],
                    [2, 2, 2, 2, 2]])

        Args:
            lengths: per-row lists of document lengths, each row summing to T; or a flat list
                over the ``B * T`` tokens, with ``shape``.
            shape: ``(B, T)``; required for a flat list, checked for per-row lists.
            device: where the layout's tensors live.

        Raises:
            LayoutError: rows of different lengths, negative lengths, or a total that does not
                match ``shape``.
        """
        rows = list(lengths)
        if rows and all(isinstance(r, (list, tuple)) for r in rows):
            totals = {sum(int(n) for n in r) for r in rows}
            if len(totals) != 1:
                raise LayoutError(
                    f"rows hold {sorted(totals)} tokens: every row of a batch must hold the "
                    "same number T"
                )
            derived = (len(rows), totals.pop())
            if shape is not None and tuple(shape) != derived:
                raise LayoutError(f"lengths describe a {derived} batch, shape says {shape}")
            shape = derived
            flat = [int(n) for r in rows for n in r]
        else:
            if shape is None:
                raise LayoutError("a flat list of lengths needs shape=(B, T)")
            flat = [int(n) for n in rows]
        if any(n < 0 for n in flat):
            raise LayoutError(f"document lengths must be >= 0, got {flat}")
        cu = torch.tensor([0, *flat], dtype=torch.long).cumsum(0)
        return cls.from_cu_seqlens(cu.to(device), tuple(shape))

    @classmethod
    def from_doc_ids(cls, doc_ids: Tensor, *, validate: bool | None = None) -> SequenceLayout:
        """Layout from per-token document ids ``[B, T]``.

        A document is a maximal run of equal ids inside a row; a row start always starts a new
        document. Negative ids mark tokens that belong to no document. Ids are renumbered so
        they are unique in the batch.

        Example::

            >>> SequenceLayout.from_doc_ids(torch.tensor([[7, 7, 3, 3, 3]])).positions
            tensor([[0, 1, 0, 1, 2]])
        """
        _check_int_tensor("doc_ids", doc_ids, 2)
        batch, seqlen = _check_shape(tuple(doc_ids.shape))
        ids = doc_ids.long()
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        if (validation_enabled() if validate is None else validate) and seqlen > 1:
            # The same id in two separate runs of one row is almost always a bug upstream.
            # Padding (negative ids) may come in several runs; real ids may not.
            row_runs = (starts & (ids >= 0)).sum(1)
            distinct = torch.tensor(
                [int(torch.unique(r[r >= 0]).numel()) for r in ids], device=ids.device
            )
            if bool((row_runs != distinct).any()):
                row = int(torch.nonzero(row_runs != distinct)[0, 0])
                raise LayoutError(
                    f"doc_ids of row {row} reuse an id in two separate runs: give every "
                    "document its own id"
                )
        new_ids = torch.cumsum(starts.view(-1), 0).view(batch, seqlen) - 1
        flat = torch.arange(batch * seqlen, device=ids.device).view(batch, seqlen)
        start_index = torch.where(starts, flat, torch.zeros_like(flat))
        run_start = torch.cummax(start_index.view(-1), 0).values.view(batch, seqlen)
        positions = flat - run_start
        no_doc = ids < 0
        return cls(
            doc_ids=torch.where(no_doc, torch.full_like(new_ids, -1), new_ids),
            positions=torch.where(no_doc, torch.zeros_like(positions), positions),
            seq_index=torch.arange(seqlen, device=ids.device).expand(batch, seqlen),
        )

    @classmethod
    def rows(cls, batch: int, seqlen: int, device: torch.device | str | None = None):
        """One document per row: the layout that ``layout=None`` means everywhere."""
        batch, seqlen = _check_shape((batch, seqlen))
        index = torch.arange(seqlen, device=device)
        return cls(
            doc_ids=torch.arange(batch, device=device)[:, None].expand(batch, seqlen),
            positions=index.expand(batch, seqlen),
            seq_index=index.expand(batch, seqlen),
            one_per_row=True,
        )

    # ------------------------------------------------------------------ queries
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.doc_ids.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.doc_ids.device

    def to(self, device: torch.device | str) -> SequenceLayout:
        return SequenceLayout(
            self.doc_ids.to(device),
            self.positions.to(device),
            self.seq_index.to(device),
            self.one_per_row,
        )

    def cu_seqlens(self) -> Tensor:
        """``[N + 1]`` int32 cumulative lengths of the non-empty runs, flattened (for kernels)."""
        flat = self.doc_ids.reshape(-1)
        batch, seqlen = self.shape
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::seqlen] = True
        bounds = torch.nonzero(starts).view(-1)
        end = torch.tensor([batch * seqlen], device=flat.device)
        return torch.cat([bounds, end]).to(torch.int32)

    def check_tensor(self, name: str, x: Tensor) -> None:
        """Raise :class:`LayoutError` unless ``x`` is ``[B, T, ...]`` on the layout's device."""
        if not isinstance(x, Tensor):
            raise LayoutError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[:2]) != self.shape:
            raise LayoutError(
                f"{name} has shape {tuple(x.shape)} but the layout is {list(self.shape)}: build "
                "the layout for this batch"
            )
        if x.device != self.device:
            raise LayoutError(
                f"{name} is on {x.device} but the layout is on {self.device}: move it with "
                f"layout.to({str(x.device)!r})"
            )


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2:
        raise LayoutError(f"a batch must have shape (B, T), got {tuple(shape)}")
    batch, seqlen = int(shape[0]), int(shape[1])
    if batch <= 0 or seqlen <= 0:
        raise LayoutError(
            f"a batch needs B >= 1 rows of T >= 1 tokens, got shape ({batch}, {seqlen})"
        )
    return batch, seqlen
