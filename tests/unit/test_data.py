"""Packing, batches, the packed loader and its data-parallel rows."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitoken.data import (
    DataError,
    PackedLoader,
    Segment,
    build_batch,
    dp_slice,
    pack_documents,
)

IGNORE = -100
PAD = 0


class ArrayCorpus:
    """Documents in one flat array, indexed like a store split (the loader's Corpus); records
    which documents were read."""

    def __init__(self, tokens, offsets):
        self.tokens, self.offsets, self.reads = tokens, offsets, []

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        self.reads.append(index)
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def doc_lengths(self, indices):
        return self.offsets[np.asarray(indices) + 1] - self.offsets[np.asarray(indices)]

    @property
    def lengths(self):
        return np.diff(self.offsets)

    @property
    def num_tokens(self):
        return len(self.tokens)


def random_corpus(num_docs, max_len, seed=0, vocab=1000):
    """A corpus of random documents; ids start at 2, clear of pad and eos."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=num_docs)
    tokens = rng.integers(2, vocab, size=int(lengths.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return ArrayCorpus(tokens, offsets)


def naive_best_fit(lengths, seq_len):
    """Independent reference: quadratic best-fit decreasing with the documented ties."""
    pieces = []
    for doc, length in enumerate(lengths):
        for start in range(0, length, seq_len):
            pieces.append(Segment(doc, start, min(start + seq_len, length)))
    pieces.sort(key=lambda p: (-(p.end - p.start), p.doc_index, p.start))
    rows, room = [], []
    for piece in pieces:
        size = piece.end - piece.start
        fits = [r for r in range(len(rows)) if room[r] >= size]
        if fits:
            best = min(fits, key=lambda r: (room[r], r))
            rows[best].append(piece)
            room[best] -= size
        else:
            rows.append([piece])
            room.append(seq_len - size)
    return rows


def first_fit_rows(lengths, seq_len):
    """Row count of plain first fit in input order, the baseline best fit should beat."""
    room = []
    for length in lengths:
        for start in range(0, length, seq_len):
            size = min(seq_len, length - start)
            for r, free in enumerate(room):
                if free >= size:
                    room[r] -= size
                    break
            else:
                room.append(seq_len - size)
    return len(room)


# ---------------------------------------------------------------------------- packing


def test_docstring_example():
    rows = pack_documents([5, 3, 10], 8).rows
    assert rows == [
        [Segment(2, 0, 8)],
        [Segment(0, 0, 5), Segment(1, 0, 3)],
        [Segment(2, 8, 10)],
    ]


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), max_size=30),
    seq_len=st.integers(1, 16),
)
def test_packing_covers_every_token_once(lengths, seq_len):
    plan = pack_documents(lengths, seq_len)
    covered = [np.zeros(n, dtype=int) for n in lengths]
    for row in plan.rows:
        assert row, "no empty rows"
        assert sum(seg.length for seg in row) <= seq_len
        for seg in row:
            assert 0 < seg.length <= seq_len
            covered[seg.doc_index][seg.start : seg.end] += 1
    assert all((c == 1).all() for c in covered)
    assert plan.num_tokens == sum(lengths)
    total = len(plan.rows) * seq_len
    expected = (total - sum(lengths)) / total if total else 0.0
    assert plan.padding_fraction == pytest.approx(expected)
    assert plan.rows == naive_best_fit(lengths, seq_len)


def test_long_documents_are_split_into_pieces():
    plan = pack_documents([25, 3], 10)
    pieces = sorted(seg for row in plan.rows for seg in row)
    assert pieces == [Segment(0, 0, 10), Segment(0, 10, 20), Segment(0, 20, 25), Segment(1, 0, 3)]
    assert plan.num_rows == 3
    assert plan.padding_fraction == pytest.approx(2 / 30)


def test_best_fit_no_worse_than_first_fit():
    rng = np.random.default_rng(1)
    for trial in range(5):
        lengths = rng.integers(1, 300, size=400).tolist()
        plan = pack_documents(lengths, 256)
        ff_rows = first_fit_rows(lengths, 256)
        assert plan.num_rows <= ff_rows, trial
        ff_padding = 1 - sum(lengths) / (ff_rows * 256)
        assert plan.padding_fraction <= ff_padding


def test_packing_100k_documents():
    # Scale check without a wall-clock assertion: every piece placed, rows full to within 1%.
    lengths = np.random.default_rng(0).integers(1, 3000, size=100_000)
    plan = pack_documents(lengths, 2048)
    assert sum(s.end - s.start for row in plan.rows for s in row) == int(lengths.sum())
    assert plan.padding_fraction < 0.01


def test_packing_rejects_bad_input():
    with pytest.raises(DataError, match="seq_len must be >= 1"):
        pack_documents([3], 0)
    with pytest.raises(DataError, match="lengths must be >= 0"):
        pack_documents([3, -1], 4)


# ---------------------------------------------------------------------------- batches


def naive_labels(docs, rows, seq_len):
    """Independent reference: shift each piece by one, token by token."""
    labels = []
    for row in rows:
        row_labels = []
        for doc, start, end in row:
            for position in range(start, end):
                is_last = position == end - 1
                row_labels.append(IGNORE if is_last else int(docs[doc][position + 1]))
        labels.append(row_labels + [IGNORE] * (seq_len - len(row_labels)))
    return torch.tensor(labels, dtype=torch.int64)


def check_cu_seqlens(cu_seqlens, num_rows, seq_len):
    assert cu_seqlens.dtype == torch.int64
    assert cu_seqlens[0] == 0 and cu_seqlens[-1] == num_rows * seq_len
    assert (cu_seqlens[1:] > cu_seqlens[:-1]).all(), "strictly increasing: no empty segments"
    boundaries = set(cu_seqlens.tolist())
    assert all(r * seq_len in boundaries for r in range(num_rows + 1)), "rows end segments"


def test_build_batch_docstring_example():
    docs = [np.array([10, 11, 12]), np.array([20, 21, 22, 23])]
    batch = build_batch(docs, [[Segment(0, 0, 3), Segment(1, 2, 4)]], 6, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 22, 23, PAD]]
    assert batch["labels"].tolist() == [[11, 12, IGNORE, 23, IGNORE, IGNORE]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 6]


@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_build_batch_matches_naive_shift(seq_len):
    corpus = random_corpus(60, 90, seed=seq_len)
    rows = pack_documents(corpus.lengths, seq_len).rows
    batch = build_batch(corpus, rows, seq_len, pad_id=PAD)
    input_ids, labels = batch["input_ids"], batch["labels"]
    assert input_ids.dtype == labels.dtype == torch.int64
    assert input_ids.shape == labels.shape == (len(rows), seq_len)
    assert torch.equal(labels, naive_labels(corpus, rows, seq_len))
    check_cu_seqlens(batch["cu_seqlens"], len(rows), seq_len)
    # Every segment of cu_seqlens holds one piece (or padding) and the ids match it.
    flat = input_ids.reshape(-1)
    cu = batch["cu_seqlens"].tolist()
    segments = [seg for row in rows for seg in row]
    real = [(a, b) for a, b in zip(cu[:-1], cu[1:]) if (flat[a:b] != PAD).any()]
    assert len(real) == len(segments)
    for (a, b), (doc, start, end) in zip(real, segments):
        assert flat[a:b].tolist() == corpus[doc][start:end].tolist()
    # Padding sits only at row ends and has no label.
    pad = input_ids == PAD
    assert (labels[pad] == IGNORE).all()
    assert int((~pad).sum()) == corpus.num_tokens


def test_build_batch_rejects_bad_segments():
    docs = [np.arange(2, 7)]
    with pytest.raises(DataError, match="outside document"):
        build_batch(docs, [[Segment(0, 3, 9)]], 8, pad_id=PAD)
    with pytest.raises(DataError, match="more than seq_len"):
        build_batch(docs, [[Segment(0, 0, 5), Segment(0, 0, 5)]], 8, pad_id=PAD)


# ---------------------------------------------------------------------------- loader


def take(loader, n):
    return [next(loader) for _ in range(n)]


def batches_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loader_batches_are_valid():
    corpus = random_corpus(200, 150)
    loader = PackedLoader(corpus, seq_len=64, batch_size=4, seed=0, pad_id=PAD)
    assert 0.0 <= loader.padding_fraction < 0.05
    for batch in take(loader, 10):
        assert batch["input_ids"].shape == (4, 64)
        check_cu_seqlens(batch["cu_seqlens"], 4, 64)


def test_loader_epoch_serves_every_token_once():
    corpus = random_corpus(50, 40)
    seq_len, batch_size = 16, 1  # batch of one row: no tail is dropped
    loader = PackedLoader(corpus, seq_len, batch_size, seed=3, pad_id=PAD)
    batches = take(loader, loader.batches_per_epoch)
    assert loader.epoch == 0
    served = torch.cat([b["input_ids"].reshape(-1) for b in batches])
    served = served[served != PAD]
    assert sorted(served.tolist()) == sorted(corpus.tokens.tolist())
    next(loader)
    assert loader.epoch == 1


def test_loader_is_deterministic():
    corpus = random_corpus(300, 100)

    def run(seed):
        return take(PackedLoader(corpus, 32, 8, seed=seed, pad_id=PAD), 6)

    first, again, other = run(0), run(0), run(1)
    assert all(batches_equal(a, b) for a, b in zip(first, again))
    assert not all(batches_equal(a, b) for a, b in zip(first, other))


def test_loader_without_shuffle_repeats_epochs():
    corpus = random_corpus(40, 30)
    loader = PackedLoader(corpus, 16, 2, seed=0, pad_id=PAD, shuffle=False)
    per_epoch = loader.batches_per_epoch
    batches = take(loader, 2 * per_epoch)
    assert all(batches_equal(a, b) for a, b in zip(batches[:per_epoch], batches[per_epoch:]))


# A few batches per epoch, so resuming lands before, at and after epoch boundaries.
@pytest.mark.parametrize("saved_after", [0, 2, 4, 5, 9])
def test_loader_resumes_exactly(saved_after):
    corpus = random_corpus(30, 30)
    reference = PackedLoader(corpus, 32, 4, seed=5, pad_id=PAD)
    assert reference.batches_per_epoch == 4
    expected = take(reference, saved_after + 3)

    loader = PackedLoader(corpus, 32, 4, seed=5, pad_id=PAD)
    take(loader, saved_after)
    state = loader.state_dict()
    assert set(state) >= {"epoch", "batch_in_epoch"}

    resumed = PackedLoader(corpus, 32, 4, seed=5, pad_id=PAD)
    resumed.load_state_dict(state)
    for want, got in zip(expected[saved_after:], take(resumed, 3)):
        assert batches_equal(want, got)


def test_loader_state_from_other_settings_is_rejected():
    corpus = random_corpus(60, 50)
    state = PackedLoader(corpus, 32, 4, seed=5, pad_id=PAD).state_dict()
    with pytest.raises(DataError, match="seed=5 but this loader has seed=6"):
        PackedLoader(corpus, 32, 4, seed=6, pad_id=PAD).load_state_dict(state)


def test_loader_too_small_corpus():
    corpus = random_corpus(3, 10)
    with pytest.raises(DataError, match="fewer than one batch.*lower batch_size or seq_len"):
        PackedLoader(corpus, seq_len=64, batch_size=4, seed=0, pad_id=PAD)


# ---------------------------------------------------------------------------- dp_slice


def test_dp_slice_docstring_example():
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.int64),
        "labels": torch.zeros(2, 4, dtype=torch.int64),
        "cu_seqlens": torch.tensor([0, 3, 4, 6, 8]),
    }
    assert dp_slice(batch, 0, 2)["cu_seqlens"].tolist() == [0, 3, 4]
    assert dp_slice(batch, 1, 2)["cu_seqlens"].tolist() == [0, 2, 4]


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_dp_slice_reassembles_the_global_batch(dp_size):
    corpus = random_corpus(200, 80)
    seq_len = 32
    batch = next(PackedLoader(corpus, seq_len, 8, seed=0, pad_id=PAD))
    shards = [dp_slice(batch, rank, dp_size) for rank in range(dp_size)]
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([s[key] for s in shards]), batch[key])
    # Re-based cu_seqlens, shifted back, reassemble the global one.
    rows_per_rank = 8 // dp_size
    cu = [0]
    for rank, shard in enumerate(shards):
        check_cu_seqlens(shard["cu_seqlens"], rows_per_rank, seq_len)
        cu += (shard["cu_seqlens"][1:] + rank * rows_per_rank * seq_len).tolist()
    assert cu == batch["cu_seqlens"].tolist()


# ---------------------------------------------------------------------------- DP loader


def dp_loader(corpus, seed, window, **dp):
    return PackedLoader(corpus, 32, 8, seed=seed, pad_id=PAD, align=2, window=window, **dp)


@pytest.mark.parametrize("window", [0, 24])
@pytest.mark.parametrize("seed", [0, 5])
def test_dp_loader_yields_dp_slice_of_the_global_batch(window, seed):
    corpus = random_corpus(150, 50, seed=seed)
    # 30 batches: past an epoch end (about 18 batches an epoch) and across windows.
    reference = take(dp_loader(corpus, seed, window), 30)
    assert dp_loader(corpus, seed, window).epoch == 0 and reference
    for dp_size in (1, 2, 4):
        for rank in range(dp_size):
            local = take(dp_loader(corpus, seed, window, dp_rank=rank, dp_size=dp_size), 30)
            for want, got in zip(reference, local):
                assert batches_equal(dp_slice(want, rank, dp_size), got), (dp_size, rank)
                assert got["input_ids"].shape == (8 // dp_size, 32)


def test_dp_loader_reads_only_its_own_rows():
    corpus = random_corpus(150, 50)
    loader = dp_loader(corpus, 0, 24)
    corpus.reads.clear()
    next(loader)
    global_reads = list(corpus.reads)  # one read per document piece, in row order
    reads = []
    for rank in range(4):
        loader = dp_loader(corpus, 0, 24, dp_rank=rank, dp_size=4)
        corpus.reads.clear()
        next(loader)
        assert len(corpus.reads) < len(global_reads)
        reads += corpus.reads
    assert reads == global_reads  # the ranks' reads partition the global batch's, in order


@pytest.mark.parametrize("saved_after", [0, 3, 19, 25])
def test_dp_loader_resumes_exactly_on_any_layout(saved_after):
    corpus = random_corpus(150, 50, seed=2)
    reference = take(dp_loader(corpus, 2, 24), saved_after + 4)
    loader = dp_loader(corpus, 2, 24, dp_rank=1, dp_size=2)
    take(loader, saved_after)
    state = loader.state_dict()
    whole = dp_loader(corpus, 2, 24)
    take(whole, saved_after)
    assert state == whole.state_dict()  # the global position, the same on every rank
    for dp_size in (1, 2, 4):  # a state saved under dp=2 resumes under any dp
        rank = dp_size - 1
        resumed = dp_loader(corpus, 2, 24, dp_rank=rank, dp_size=dp_size)
        resumed.load_state_dict(state)
        for want, got in zip(reference[saved_after:], take(resumed, 4)):
            assert batches_equal(dp_slice(want, rank, dp_size), got)


def test_dp_loader_errors():
    corpus = random_corpus(100, 40)
    with pytest.raises(DataError, match="batch_size=6 rows do not split over dp_size=4"):
        PackedLoader(corpus, 16, 6, pad_id=PAD, dp_rank=0, dp_size=4)
    with pytest.raises(DataError, match="dp_rank must be in"):
        PackedLoader(corpus, 16, 6, pad_id=PAD, dp_rank=3, dp_size=3)


def test_dp_slice_errors():
    batch = next(PackedLoader(random_corpus(100, 40), 16, 6, seed=0, pad_id=PAD))
    with pytest.raises(DataError, match="set batch_size to a multiple of 4"):
        dp_slice(batch, 0, 4)
    with pytest.raises(DataError, match="dp_rank must be in"):
        dp_slice(batch, 3, 3)
