import pytest
import torch

from multitoken import LayoutError, SequenceLayout


def test_from_cu_seqlens_seed_example():
    layout = SequenceLayout.from_cu_seqlens(torch.tensor([0, 5, 12]), shape=(1, 12))
    assert layout.doc_ids.tolist() == [[0] * 5 + [1] * 7]
    assert layout.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]
    assert layout.seq_index.tolist() == [list(range(12))]


def test_from_cu_seqlens_matches_from_doc_ids_with_empty_documents():
    cu = torch.tensor([0, 3, 3, 8, 10, 10, 16], dtype=torch.int32)  # two empty documents
    a = SequenceLayout.from_cu_seqlens(cu, shape=(2, 8))
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [2, 2, 3, 3, 3, 3, 3, 3]])
    b = SequenceLayout.from_doc_ids(ids)
    assert torch.equal(a.positions, b.positions)
    # Ids may differ (empty documents consume ids) but the partition must be the same.
    same_a = a.doc_ids.view(-1, 1) == a.doc_ids.view(1, -1)
    same_b = b.doc_ids.view(-1, 1) == b.doc_ids.view(1, -1)
    assert torch.equal(same_a, same_b)
    assert torch.equal(a.cu_seqlens(), torch.tensor([0, 3, 8, 10, 16], dtype=torch.int32))


def test_from_doc_ids_row_start_is_a_boundary_and_negative_is_padding():
    layout = SequenceLayout.from_doc_ids(torch.tensor([[4, 4, 4], [4, 4, -1]]))
    assert layout.positions.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert layout.doc_ids[0, 0] != layout.doc_ids[1, 0]
    assert layout.doc_ids[1, 2] == -1


def test_rows_is_one_document_per_row():
    layout = SequenceLayout.rows(2, 4)
    assert layout.doc_ids.tolist() == [[0] * 4, [1] * 4]
    assert layout.positions.tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize(
    ("cu", "shape", "message"),
    [
        (torch.tensor([0, 6, 4, 12]), (1, 12), "non-decreasing"),
        (torch.tensor([0, 5, 11]), (1, 12), "must end at B\\*T"),
        (torch.tensor([1, 5, 12]), (1, 12), "must start at 0"),
        (torch.tensor([0, 5, 12]), (2, 6), "crosses the boundary between rows 0 and 1"),
        (torch.tensor([0.0, 12.0]), (1, 12), "int32 or int64"),
        (torch.tensor([[0, 12]]), (1, 12), "must be a \\[N\\] tensor"),
        (torch.tensor([12]), (1, 12), "at least 2 entries"),
        (torch.tensor([0, 0]), (1, 0), "B >= 1 rows of T >= 1"),
    ],
)
def test_from_cu_seqlens_errors(cu, shape, message):
    with pytest.raises(LayoutError, match=message):
        SequenceLayout.from_cu_seqlens(cu, shape=shape)


def test_from_doc_ids_errors():
    with pytest.raises(LayoutError, match="reuse an id in two separate runs"):
        SequenceLayout.from_doc_ids(torch.tensor([[0, 0, 1, 0]]))
    with pytest.raises(LayoutError, match="int32 or int64"):
        SequenceLayout.from_doc_ids(torch.zeros(2, 3))
    with pytest.raises(LayoutError, match="must be a \\[B, T\\] tensor"):
        SequenceLayout.from_doc_ids(torch.zeros(3, dtype=torch.long))


def test_check_tensor_shape_and_device():
    layout = SequenceLayout.rows(2, 4)
    with pytest.raises(LayoutError, match="has shape \\(2, 5\\) but the layout is \\[2, 4\\]"):
        layout.check_tensor("input_ids", torch.zeros(2, 5, dtype=torch.long))
    meta = SequenceLayout.rows(2, 4, device="meta")
    with pytest.raises(LayoutError, match="is on cpu but the layout is on meta"):
        meta.check_tensor("input_ids", torch.zeros(2, 4, dtype=torch.long))


def test_from_doc_ids_allows_several_padding_runs():
    layout = SequenceLayout.from_doc_ids(torch.tensor([[0, 0, -1, 1, 1, -1]]))
    assert layout.doc_ids[0].tolist()[2] == -1 and layout.doc_ids[0].tolist()[5] == -1
    assert layout.positions[0].tolist() == [0, 1, 0, 0, 1, 0]


def test_from_lengths_matches_cu_seqlens():
    per_row = SequenceLayout.from_lengths([[2, 0, 3], [5]])
    flat = SequenceLayout.from_lengths([2, 0, 3, 5], shape=(2, 5))
    ref = SequenceLayout.from_cu_seqlens(torch.tensor([0, 2, 2, 5, 10]), shape=(2, 5))
    for layout in (per_row, flat):
        assert torch.equal(layout.doc_ids, ref.doc_ids)
        assert torch.equal(layout.positions, ref.positions)
    with pytest.raises(LayoutError, match="every row of a batch must hold the same number T"):
        SequenceLayout.from_lengths([[2, 3], [4]])
    with pytest.raises(LayoutError, match="needs shape"):
        SequenceLayout.from_lengths([2, 3])
    with pytest.raises(LayoutError, match="must end at B\\*T"):
        SequenceLayout.from_lengths([2, 2], shape=(1, 5))
    with pytest.raises(LayoutError, match=">= 0"):
        SequenceLayout.from_lengths([[-1, 6]])
