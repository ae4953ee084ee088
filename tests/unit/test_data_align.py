"""Packing with ``align``: pieces padded to a multiple of 2 * cp inside their rows."""

import numpy as np
import pytest

from multitoken import SequenceLayout, next_token_labels
from multitoken.data import DataError, build_batch, pack_documents


@pytest.mark.parametrize("align", [1, 4, 8])
def test_aligned_pieces(align):
    rng = np.random.default_rng(align)
    lengths = rng.integers(1, 70, size=40)
    docs = [rng.integers(2, 1000, size=n) for n in lengths]
    plan = pack_documents(lengths, seq_len=64, align=align)
    batch = build_batch(docs, plan.rows, seq_len=64, pad_id=0, align=align)
    cu = batch["cu_seqlens"]
    # Every segment (piece + its padding) starts and ends on a multiple of align.
    assert bool((cu % align == 0).all())
    # Every real token appears once; the padding has no label and no input id.
    ids, labels = batch["input_ids"], batch["labels"]
    assert int((ids != 0).sum()) == int(lengths.sum())
    # Labels equal the next-token shift inside each segment (pads are id 0 -> their label is
    # ignored because the real piece's last token is the segment's last labelled token).
    layout = SequenceLayout.from_cu_seqlens(cu, shape=tuple(ids.shape))
    shifted = next_token_labels(ids, layout)
    real_next = (shifted != -100) & (shifted != 0)
    assert bool((labels[real_next] == shifted[real_next]).all())
    assert int((labels != -100).sum()) == int(
        sum(max(0, p.end - p.start - 1) for r in plan.rows for p in r)
    )


def test_align_must_divide_seq_len():
    with pytest.raises(DataError, match="align=3 must be >= 1 and divide seq_len=64"):
        pack_documents([5, 6], seq_len=64, align=3)
