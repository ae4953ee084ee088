"""``lookahead``: the one shifting primitive of Multi-Token Prediction.

Everything MTP needs from the data is "the value k places ahead, in the same document"::

    lookahead(x, k)[i] = x[i + k]  if i + k lies in the same document as i,  else fill

Depth k's input is ``lookahead(input_ids, k, fill=pad_id)`` and its target is
``lookahead(labels, k, fill=ignore_index)`` (labels are already shifted by one, so depth k's
target of position i is ``labels[i + k]``). The result is exact per depth: the last k + 1
positions of every document have no target at depth k, and no target crosses a document.

Each shift is one same-document test and one select over the whole batch: no Python loop over
documents, and the cost does not depend on how many documents a row holds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from multitoken.errors import InputError, renamed_kwarg
from multitoken.layout import SequenceLayout

__all__ = ["lookahead", "next_token_labels", "mtp_inputs", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _resolve(x: Tensor, layout: SequenceLayout | None) -> SequenceLayout:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"lookahead expects a [B, T] tensor, got {shape}")
    if layout is None:
        return SequenceLayout.rows(*x.shape, device=x.device)
    layout.check_tensor("x", x)
    return layout


def lookahead(
    x: Tensor, layout: SequenceLayout | None, shifts: int | Sequence[int], fill: int | float
) -> Tensor:
    """Values ``k`` places ahead in the same document, for one or several shifts.

    Args:
        x: ``[B, T]`` tensor (token ids, labels, positions, ...).
        layout: document boundaries of the batch; ``None`` means one document per row.
        shifts: an int ``k >= 0`` or a sequence of them.
        fill: the value where ``i + k`` leaves the document (a pad id for inputs,
            ``ignore_index`` for labels; never a real token id).

    Returns:
        ``[B, T]`` for an int shift, ``[len(shifts), B, T]`` for a sequence.

    Example (the seed example: depth 2, documents [0, 5) and [5, 12))::

        >>> layout = SequenceLayout.from_cu_seqlens(torch.tensor([0, 5, 12]), shape=(1, 12))
        >>> x = torch.arange(12)[None]
        >>> lookahead(x, layout, 2, fill=-1)
        tensor([[ 2,  3,  4, -1, -1,  7,  8,  9, 10, 11, -1, -1]])
    """
    layout = _resolve(x, layout)
    single = isinstance(shifts, int)
    ks = [shifts] if single else list(shifts)
    if any((not isinstance(k, int)) or k < 0 for k in ks):
        raise InputError(f"shifts must be non-negative ints, got {shifts!r}")
    batch, seqlen = x.shape
    doc = layout.doc_ids
    # Bitwise-and with the largest id maps every negative id (no document) to a huge one that
    # no real document carries, so one equality test is also the "i is in a document" test.
    ahead_key = doc & torch.iinfo(doc.dtype).max  # (B, T)
    out = x.new_full((len(ks), batch, seqlen), fill)  # (K, B, T)
    # One loop step per shift, each a handful of whole-row ops on narrowed views (no copies);
    # the loop is over the D shifts, never over documents.
    for j, k in enumerate(ks):
        if k >= seqlen:
            continue
        kept = seqlen - k
        same = torch.eq(ahead_key.narrow(1, k, kept), doc.narrow(1, 0, kept))  # (B, T - k)
        dest = out[j].narrow(1, 0, kept)
        torch.where(same, x.narrow(1, k, kept), dest, out=dest)
    return out[0] if single else out


def next_token_labels(
    input_ids: Tensor, layout: SequenceLayout | None = None, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Next-token labels shifted inside documents: ``labels[i] = input_ids[i + 1]`` or ignore.

    Example::

        >>> layout = SequenceLayout.from_cu_seqlens(torch.tensor([0, 2, 5]), shape=(1, 5))
        >>> next_token_labels(torch.tensor([[5, 6, 7, 8, 9]]), layout)
        tensor([[   6, -100,    8,    9, -100]])
    """
    return lookahead(input_ids, layout, 1, fill=ignore_index)


@renamed_kwarg("depth", "num_depths")
def mtp_inputs(
    input_ids: Tensor,
    labels: Tensor | None,
    layout: SequenceLayout | None,
    num_depths: int,
    pad_id: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor | None]:
    """Inputs and targets of all MTP depths from one batch.

    Returns:
        ``ids`` of shape ``[D, B, T]`` (depth k's input is ``ids[k - 1]``) and ``labels`` of
        shape ``[D + 1, B, T]`` (index 0 the main next-token labels, index k depth k's), or
        ``None`` when ``labels`` is ``None``.
    """
    shifts = list(range(1, num_depths + 1))
    ids = lookahead(input_ids, layout, shifts, fill=pad_id)
    if labels is None:
        return ids, None
    return ids, lookahead(labels, layout, [0, *shifts], fill=ignore_index)
