import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitoken import IGNORE_INDEX, InputError, LayoutError, SequenceLayout, lookahead, mtp_inputs


def naive_lookahead(x, doc_lengths_per_row, k, fill):
    """Independent reference: a Python loop over every document of every row."""
    out = torch.full_like(x, fill)
    for row, lengths in enumerate(doc_lengths_per_row):
        start = 0
        for length in lengths:
            for i in range(start, start + length):
                if i + k < start + length:
                    out[row, i] = x[row, i + k]
            start += length
    return out


@st.composite
def packed_batches(draw):
    batch = draw(st.integers(1, 3))
    seqlen = draw(st.integers(1, 24))
    rows = []
    for _ in range(batch):
        # Sorted cut points; repeated cuts make empty documents, adjacent ones 1-token ones.
        cuts = sorted(draw(st.lists(st.integers(0, seqlen), max_size=12)))
        bounds = [0, *cuts, seqlen]
        rows.append([b - a for a, b in zip(bounds[:-1], bounds[1:])])
    return batch, seqlen, rows


@settings(max_examples=150, deadline=None)
@given(packed_batches(), st.integers(-1000, 1000), st.integers(0, 2**31 - 1))
def test_lookahead_equals_naive_loop(batch_spec, fill, seed):
    batch, seqlen, rows = batch_spec
    layout = SequenceLayout.from_lengths(rows, shape=(batch, seqlen))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50_000, (batch, seqlen), generator=gen)
    shifts = list(range(0, 9))
    got = lookahead(x, layout, shifts, fill)
    assert got.shape == (len(shifts), batch, seqlen)
    for k in shifts:
        expected = naive_lookahead(x, rows, k, fill)
        assert torch.equal(got[k], expected), (k, rows)
        assert torch.equal(lookahead(x, layout, k, fill), expected)


def test_seed_example_valid_target_masks():
    # Depth D = 2, one row, documents [0, 5) and [5, 12) (docs/design.md#lookahead).
    layout = SequenceLayout.from_cu_seqlens(torch.tensor([0, 5, 12]), shape=(1, 12))
    ids = torch.arange(100, 112)[None]
    labels = lookahead(ids, layout, 1, IGNORE_INDEX)
    mtp_ids, depth_labels = mtp_inputs(ids, labels, layout, num_depths=2, pad_id=0)
    valid = (depth_labels != IGNORE_INDEX).int()[:, 0].tolist()
    assert valid[0] == [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0]
    assert valid[1] == [1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    assert valid[2] == [1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]
    # Depth k's input at i is token i + k, and its target is token i + k + 1.
    assert mtp_ids[1, 0, :3].tolist() == [102, 103, 104]
    assert mtp_ids[1, 0, 3:5].tolist() == [0, 0]
    assert depth_labels[2, 0, 5:9].tolist() == [108, 109, 110, 111]


def test_layout_none_is_one_document_per_row():
    x = torch.arange(8).view(2, 4)
    assert lookahead(x, None, 2, -1).tolist() == [[2, 3, -1, -1], [6, 7, -1, -1]]


def test_padding_tokens_are_never_looked_into():
    layout = SequenceLayout.from_doc_ids(torch.tensor([[0, 0, 0, -1, -1]]))
    x = torch.tensor([[1, 2, 3, 9, 9]])
    assert lookahead(x, layout, 1, -7).tolist() == [[2, 3, -7, -7, -7]]


def test_lookahead_errors():
    layout = SequenceLayout.rows(1, 4)
    with pytest.raises(InputError, match="non-negative ints"):
        lookahead(torch.zeros(1, 4, dtype=torch.long), layout, -1, 0)
    with pytest.raises(InputError, match="expects a \\[B, T\\] tensor"):
        lookahead(torch.zeros(4, dtype=torch.long), None, 1, 0)
    with pytest.raises(LayoutError, match="has shape"):
        lookahead(torch.zeros(1, 5, dtype=torch.long), layout, 1, 0)
