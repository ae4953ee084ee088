"""Windowed packing: the keyed shuffle, one epoch = every token once, exact mid-epoch resume."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitoken.data import DataError, PackedLoader, dp_slice
from multitoken.data.shuffle import permutation_key, permute

PAD = 0


class ArrayCorpus:
    """Documents in one flat array, indexed like a store split (the loader's Corpus)."""

    def __init__(self, tokens, offsets):
        self.tokens, self.offsets = tokens, offsets

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def doc_lengths(self, indices):
        return self.offsets[np.asarray(indices) + 1] - self.offsets[np.asarray(indices)]

    @property
    def num_tokens(self):
        return len(self.tokens)


def random_corpus(num_docs, max_len, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=num_docs)
    tokens = rng.integers(2, 1000, size=int(lengths.sum())).astype(np.int32)
    return ArrayCorpus(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32), epoch=st.integers(0, 50))
def test_permute_is_a_bijection(n, seed, epoch):
    key = permutation_key(seed, epoch)
    out = permute(np.arange(n), n, key)
    assert sorted(out.tolist()) == list(range(n))
    # Any slice is computed alone, equal to the same slice of the whole.
    lo, hi = n // 3, n // 3 + min(n, 17)
    assert np.array_equal(permute(np.arange(lo, min(hi, n)), n, key), out[lo:hi])


def test_permute_depends_on_the_key():
    n = 10_000
    a = permute(np.arange(n), n, permutation_key(0, 0))
    b = permute(np.arange(n), n, permutation_key(0, 1))
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05  # no visible trend left


def test_windowed_epoch_serves_every_token_once():
    corpus = random_corpus(300, 40)
    loader = PackedLoader(corpus, 16, 1, seed=3, pad_id=PAD, window=32)
    assert loader.num_windows == 10 and loader.batches_per_epoch is None
    served = []
    while loader.epoch == 0:
        served.append(next(loader)["input_ids"].reshape(-1))
    served = torch.cat(served[:-1])  # the last one is epoch 1's first batch
    assert sorted(served[served != PAD].tolist()) == sorted(corpus.tokens.tolist())
    assert loader.batches_per_epoch == len(served) // 16


def test_window_covering_the_corpus_is_the_global_packing():
    corpus = random_corpus(100, 60)
    whole = take(PackedLoader(corpus, 32, 4, seed=1, pad_id=PAD), 8)
    covering = take(PackedLoader(corpus, 32, 4, seed=1, pad_id=PAD, window=100), 8)
    assert all(same(a, b) for a, b in zip(whole, covering))


def test_two_loaders_built_alike_agree_and_seeds_differ():
    corpus = random_corpus(500, 50)
    first = take(PackedLoader(corpus, 32, 4, seed=0, pad_id=PAD, window=64), 30)
    again = take(PackedLoader(corpus, 32, 4, seed=0, pad_id=PAD, window=64), 30)
    other = take(PackedLoader(corpus, 32, 4, seed=1, pad_id=PAD, window=64), 30)
    assert all(same(a, b) for a, b in zip(first, again))
    assert not all(same(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("saved_after", [0, 1, 5, 13, 27, 40, 61])
def test_resume_mid_epoch_mid_window_continues_exactly(saved_after):
    corpus = random_corpus(200, 50)
    build = lambda: PackedLoader(corpus, 32, 3, seed=5, pad_id=PAD, align=2, window=24)  # noqa: E731
    expected = take(build(), saved_after + 6)
    loader = build()
    take(loader, saved_after)
    state = loader.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    assert all(same(want, got) for want, got in zip(expected[saved_after:], take(resumed, 6)))


def test_state_from_another_window_is_rejected():
    corpus = random_corpus(200, 50)
    state = PackedLoader(corpus, 32, 4, seed=5, pad_id=PAD, window=24).state_dict()
    with pytest.raises(DataError, match="window=24 but this loader has window=48"):
        PackedLoader(corpus, 32, 4, seed=5, pad_id=PAD, window=48).load_state_dict(state)


def test_the_stream_does_not_depend_on_the_data_parallel_layout():
    corpus = random_corpus(300, 50)
    batches = take(PackedLoader(corpus, 32, 8, seed=2, pad_id=PAD, window=40), 5)
    for dp_size in (1, 2, 4):
        for batch in batches:
            shards = [dp_slice(batch, r, dp_size) for r in range(dp_size)]
            assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])
        # Each rank's loader serves its rows; together they are the global batches.
        ranks = [
            take(
                PackedLoader(
                    corpus, 32, 8, seed=2, pad_id=PAD, window=40, dp_rank=r, dp_size=dp_size
                ),
                5,
            )
            for r in range(dp_size)
        ]
        for i, batch in enumerate(batches):
            rows = torch.cat([ranks[r][i]["input_ids"] for r in range(dp_size)])
            assert torch.equal(rows, batch["input_ids"])


def test_windowed_padding_is_reported_and_close_to_global():
    corpus = random_corpus(4000, 300, seed=7)
    whole = PackedLoader(corpus, 256, 8, pad_id=PAD)
    assert whole.epoch_padding() == pytest.approx(whole.padding_fraction)
    loader = PackedLoader(corpus, 256, 8, pad_id=PAD, window=512)
    windowed = loader.epoch_padding()
    # Reference: the rows of one epoch, counted from the batches served (batch_size 1: no tail).
    single = PackedLoader(corpus, 256, 1, pad_id=PAD, window=512)
    served = []
    while single.epoch == 0:
        served.append(next(single)["input_ids"])
    ids = torch.cat(served[:-1])
    assert windowed == pytest.approx(float((ids == PAD).float().mean()))
    assert whole.padding_fraction <= windowed < whole.padding_fraction + 0.02


def test_bad_window():
    with pytest.raises(DataError, match="window must be >= 0"):
        PackedLoader(random_corpus(10, 10), 8, 1, window=-1)
