"""The attention mask rule, and the FlexAttention block mask (the CUDA path) against SDPA."""

import warnings

import pytest
import torch
from tests.helpers.models import tiny_model

from multitoken import SequenceLayout
from multitoken.models.attention import AttentionMask


def _layout():
    # Packed documents, an empty one, and padding tokens (doc id -1) as the sharder makes them.
    doc_ids = torch.tensor([[0] * 5 + [1] * 3 + [-1] * 2 + [2] * 6, [3] * 9 + [-1] * 3 + [4] * 4])
    return SequenceLayout.from_doc_ids(doc_ids)


def test_dense_mask_rule():
    layout = _layout()
    doc = AttentionMask(layout, mode="document").dense()[:, 0]
    causal = AttentionMask(layout, mode="causal").dense()[:, 0]
    # Document mode: query 6 (doc 1, position 1) sees keys 5 and 6 only.
    assert torch.nonzero(doc[0, 6]).view(-1).tolist() == [5, 6]
    # Causal mode: it sees every earlier real token of its row, never padding.
    assert torch.nonzero(causal[0, 6]).view(-1).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert torch.nonzero(causal[0, 12]).view(-1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12]
    # Every query, padding included, sees at least itself (no all-masked row, no NaN).
    assert bool(doc.diagonal(dim1=1, dim2=2).all()) and bool(causal.diagonal(dim1=1, dim2=2).all())


@pytest.mark.parametrize("mode", ["document", "causal"])
def test_flex_block_mask_equals_sdpa_mask(mode):
    from torch.nn.attention.flex_attention import flex_attention

    layout = _layout()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, 8, generator=gen)
    k, v = torch.randn(2, 2, 16, 8, generator=gen), torch.randn(2, 2, 16, 8, generator=gen)
    expected = AttentionMask(layout, mode=mode, backend="sdpa").attend(q, k, v)
    flex = AttentionMask(layout, mode=mode, backend="flex")
    # On CPU, uncompiled FlexAttention runs the forward only: enough to check the mask rule.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = flex_attention(q, k, v, block_mask=flex.block_mask(), enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mode_and_backend_errors():
    with pytest.raises(ValueError, match="attention mode must be one of"):
        AttentionMask(_layout(), mode="full")
    with pytest.raises(ValueError, match="backend must be one of"):
        AttentionMask(_layout(), backend="xformers")


@pytest.mark.parametrize("mode", ["document", "causal"])
def test_one_document_per_row_takes_the_causal_fast_path_with_the_same_result(mode):
    model = tiny_model(1, vocab_size=50, attention=mode)
    ids = torch.randint(1, 50, (3, 20))
    rows = SequenceLayout.rows(3, 20)
    explicit = SequenceLayout.from_lengths([[20]] * 3)  # the same documents, a dense mask
    assert rows.one_per_row and not explicit.one_per_row
    for fast, dense in zip(model(ids, rows), model(ids, explicit)):
        torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-6)
