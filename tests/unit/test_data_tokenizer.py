"""The byte-level BPE tokenizer, its cache, and a tokenized list of documents."""

import numpy as np
import pytest

from multitoken.data import (
    DataError,
    Document,
    Tokenizer,
    stdlib_source,
    tokenize_corpus,
    train_tokenizer,
)

VOCAB = 512  # small: trains in well under a second on 40 files


@pytest.fixture(scope="module")
def docs():
    return list(stdlib_source(max_files=40))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture(scope="module")
def tokenizer(docs, cache_dir):
    return train_tokenizer(docs, VOCAB, cache_dir, verbose=False)


def test_special_tokens_and_size(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 1)
    assert tokenizer.vocab_size == VOCAB
    assert tokenizer.decode([0, 1]) == "<|pad|><|endoftext|>"


def test_round_trip_stdlib_files(tokenizer, docs):
    texts = [doc.text for doc in docs[:5]]
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        assert ids == tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    tricky = "naïve ☃ 日本語 \t\r\n  trailing  \x00 🎉"
    assert tokenizer.decode(tokenizer.encode(tricky)) == tricky


def test_text_cannot_forge_special_tokens(tokenizer):
    ids = tokenizer.encode("a<|endoftext|>b<|pad|>")
    assert tokenizer.eos_id not in ids and tokenizer.pad_id not in ids
    assert tokenizer.decode(ids) == "a<|endoftext|>b<|pad|>"


def test_second_call_loads_from_cache(tokenizer, docs, cache_dir):
    assert not tokenizer.from_cache
    (cached,) = cache_dir.glob("tokenizer-*.json")
    mtime = cached.stat().st_mtime_ns
    again = train_tokenizer(docs, VOCAB, cache_dir, verbose=False)
    assert again.from_cache
    assert cached.stat().st_mtime_ns == mtime
    assert again.backend.to_str() == tokenizer.backend.to_str()
    # Another corpus or vocabulary is another cache entry.
    other = train_tokenizer(docs[:20], VOCAB, cache_dir, verbose=False)
    assert not other.from_cache
    assert len(list(cache_dir.glob("tokenizer-*.json"))) == 2


def test_training_is_deterministic(docs, tmp_path):
    fresh = train_tokenizer(docs[:20], VOCAB, tmp_path, verbose=False)
    again = train_tokenizer(docs[:20], VOCAB, tmp_path / "other", verbose=False)
    assert not again.from_cache
    assert fresh.backend.to_str() == again.backend.to_str()


def test_progress_line(docs, tmp_path, capsys):
    train_tokenizer(docs[:5], 300, tmp_path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training a byte-level BPE tokenizer" in err


def test_save_and_load(tokenizer, tmp_path):
    path = tmp_path / "tok.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    text = "def f(x):\n    return x  # <|endoftext|>\n"
    assert loaded.encode(text) == tokenizer.encode(text)
    with pytest.raises(DataError, match="does not exist: train one with train_tokenizer"):
        Tokenizer.load(tmp_path / "missing.json")


def test_bad_settings(docs, tmp_path):
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer([], VOCAB, tmp_path)
    with pytest.raises(DataError, match="vocab_size 100 is too small"):
        train_tokenizer(docs, 100, tmp_path)


def test_tokenize_corpus(tokenizer, docs, cache_dir):
    corpus = tokenize_corpus(tokenizer, docs, cache_dir, verbose=False)
    assert corpus.tokens.dtype == np.uint16 and corpus.offsets.dtype == np.int64
    assert len(corpus) == len(docs)
    assert corpus.offsets[0] == 0 and corpus.offsets[-1] == corpus.num_tokens
    for i in (0, 7, len(docs) - 1):
        assert corpus[i].tolist() == tokenizer.encode(docs[i].text) + [tokenizer.eos_id]
    assert int((corpus.tokens == tokenizer.eos_id).sum()) == len(docs)

    # One store in the cache, reused (not rewritten) by the same call again.
    (index_file,) = cache_dir.glob("store-*/index.json")
    mtime = index_file.stat().st_mtime_ns
    again = tokenize_corpus(tokenizer, docs, cache_dir, verbose=False)
    assert index_file.stat().st_mtime_ns == mtime
    assert len(list(cache_dir.glob("store-*/index.json"))) == 1
    assert np.array_equal(again.tokens, corpus.tokens)
    assert np.array_equal(again.offsets, corpus.offsets)
    # An edit of the same size must not be served from the cache.
    edited = [Document(docs[0].name, docs[0].text[::-1]), *docs[1:]]
    changed = tokenize_corpus(tokenizer, edited, cache_dir, verbose=False)
    assert not np.array_equal(changed[0], corpus[0])
