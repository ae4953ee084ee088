"""The one packed-batch builder of the tests: random token ids in rows of packed documents,
their next-token labels and layout (or the flat ``cu_seqlens`` the loader yields)."""

from __future__ import annotations

import random
from itertools import accumulate

import torch

from multitoken import SequenceLayout, next_token_labels

# Two rows of 24 tokens: documents of 1 to 13 tokens.
DOC_LENGTHS = [[5, 1, 9, 2, 7], [3, 13, 1, 1, 6]]


def packed_batch(rows: list[list[int]] = DOC_LENGTHS, *, seed: int = 0, vocab: int = 64,
                 low: int = 1):  # fmt: skip
    """``(input_ids, labels, layout)``: ``rows`` of document lengths packed into a batch of
    ``len(rows)`` rows, ids uniform in ``[low, vocab)`` (seeded), labels that never cross a
    document boundary."""
    layout = SequenceLayout.from_lengths(rows)
    ids = torch.randint(low, vocab, layout.shape, generator=torch.Generator().manual_seed(seed))
    return ids, next_token_labels(ids, layout), layout


def unpacked_batch(shape: tuple[int, int], *, seed: int = 0, vocab: int = 64, low: int = 1):
    """``(input_ids, labels, None)``: one document per row."""
    ids = torch.randint(low, vocab, shape, generator=torch.Generator().manual_seed(seed))
    return ids, next_token_labels(ids), None


def random_rows(seed: int, seqlen: int = 48, rows: int = 2,
                lengths=(1, 1, 2, 3, 5, 8, 13, 21)) -> list[list[int]]:  # fmt: skip
    """``rows`` rows of ``seqlen`` tokens cut into random documents (the last one of a row cut
    to fit): many 1- and 2-token ones, some longer than a CP shard."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        row, left = [], seqlen
        while left:
            length = min(left, rng.choice(lengths))
            row.append(length)
            left -= length
        out.append(row)
    return out


def cu_seqlens(rows: list[list[int]]) -> torch.Tensor:
    """The flat document boundaries of ``rows`` over the flattened batch, as the loader yields
    them: ``[0, end of document 1, ..., rows * seqlen]``."""
    return torch.tensor([0, *accumulate(length for row in rows for length in row)])


def documents(ids: torch.Tensor, rows: list[list[int]] = DOC_LENGTHS) -> list[torch.Tensor]:
    """Every document of the packed ``ids`` alone, as a batch of one row."""
    docs = []
    for row, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            docs.append(ids[row : row + 1, start : start + length])
            start += length
    return docs
