"""The memory-mapped token store: equal to an independent encoding, cached, checked, resumable."""

import gzip
import importlib
import json
import os
import shutil

import numpy as np
import pytest

from multitoken.data import (
    DataError,
    StoreError,
    build_store,
    open_source,
    open_store,
    split_documents,
    stdlib_source,
    train_tokenizer,
)
from multitoken.data import build as build_module
from multitoken.data.store import token_dtype

SMALL = dict(part_tokens=10_000, work_batch_chars=15_000, verbose=False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(
        list(stdlib_source(max_files=40)), 512, tmp_path_factory.mktemp("tok"), verbose=False
    )


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for doc in stdlib_source(max_files=30):
        path = root / doc.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc.text, encoding="utf-8")
    return root


def store_bytes(store):
    return {p.name: p.read_bytes() for p in sorted(store.folder.iterdir())}


def test_store_equals_an_independent_encoding(tokenizer, corpus_dir, tmp_path):
    source = open_source(corpus_dir)
    store = build_store(source, tokenizer, tmp_path, val_fraction=0.1, seed=3, **SMALL)
    assert store.dtype == np.uint16 and len(store.index["splits"]["train"]["parts"]) > 2
    # Independent reference: every listed document encoded alone, its end id appended.
    train_docs, val_docs = split_documents(list(source), 0.1, seed=3)
    for name, docs in (("train", train_docs), ("val", val_docs)):
        encoded = [tokenizer.encode(doc.text) + [tokenizer.eos_id] for doc in docs]
        tokens = np.array([t for ids in encoded for t in ids])
        lengths = np.array([len(ids) for ids in encoded])
        split = store.split(name)
        assert len(split) == len(docs) and split.num_tokens == len(tokens)
        assert np.array_equal(split.tokens, tokens)
        assert np.array_equal(np.asarray(split.offsets), np.concatenate([[0], np.cumsum(lengths)]))
        for i in (0, len(docs) // 2, len(docs) - 1):
            assert split[i].tolist() == encoded[i]
        assert np.array_equal(split.doc_lengths(np.array([0, len(docs) - 1])), lengths[[0, -1]])


def test_workers_write_the_same_store(tokenizer, corpus_dir, tmp_path):
    source = open_source(corpus_dir)
    one = build_store(source, tokenizer, tmp_path / "one", workers=1, **SMALL)
    two = build_store(source, tokenizer, tmp_path / "two", workers=2, **SMALL)
    assert one.folder.name == two.folder.name  # workers are not part of the content address
    assert store_bytes(one) == store_bytes(two)


def test_cache_is_reused_and_a_changed_file_invalidates_it(tokenizer, corpus_dir, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    first = build_store(open_source(corpus), tokenizer, tmp_path / "cache", **SMALL)
    index_mtime = (first.folder / "index.json").stat().st_mtime_ns
    again = build_store(open_source(corpus), tokenizer, tmp_path / "cache", **SMALL)
    assert again.folder == first.folder
    assert (again.folder / "index.json").stat().st_mtime_ns == index_mtime
    path = next(p for p in sorted(corpus.rglob("*.py")))
    mtime = path.stat().st_mtime_ns
    path.write_text(path.read_text() + "\n# edited\n")
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    changed = build_store(open_source(corpus), tokenizer, tmp_path / "cache", **SMALL)
    assert changed.folder != first.folder


@pytest.mark.parametrize("damage", ["flip", "truncate", "index"])
def test_damaged_store_is_detected_and_rebuilt(tokenizer, corpus_dir, tmp_path, capsys, damage):
    source = open_source(corpus_dir)
    store = build_store(source, tokenizer, tmp_path, **SMALL)
    expected = store_bytes(store)
    shard = store.folder / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        message = "does not match its checksum"
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-7]))
        message = f"has {len(data) - 7} bytes, the index says {len(data)}"
    else:
        (store.folder / "index.json").write_text("{")
        message = "missing or unreadable"
    with pytest.raises(StoreError, match=message):
        open_store(store.folder)
    rebuilt = build_store(source, tokenizer, tmp_path, **SMALL)
    assert (
        "damaged" in capsys.readouterr().err and message.split()[0] in rebuilt.folder.name + message
    )
    assert store_bytes(rebuilt) == expected


def test_size_check_alone_misses_a_flip_but_full_finds_it(tokenizer, corpus_dir, tmp_path):
    store = build_store(open_source(corpus_dir), tokenizer, tmp_path, **SMALL)
    shard = store.folder / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    open_store(store.folder, verify="size")
    with pytest.raises(StoreError):
        open_store(store.folder, verify="full")


def test_interrupted_build_resumes_to_the_same_store(tokenizer, corpus_dir, tmp_path, monkeypatch):
    source = open_source(corpus_dir)
    reference = build_store(source, tokenizer, tmp_path / "reference", **SMALL)
    real_close = build_module._PartWriter.close

    def close_then_die(self, docs_read):
        if self.index == 2:
            raise KeyboardInterrupt  # interrupted while the third part is being published
        return real_close(self, docs_read)

    monkeypatch.setattr(build_module._PartWriter, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_store(source, tokenizer, tmp_path / "cache", **SMALL)
    partial = next((tmp_path / "cache").glob("store-*.partial"))
    assert not list((tmp_path / "cache").glob("store-*[0-9a-f]"))  # nothing looks complete
    assert sorted(p.name for p in partial.glob("part-*.json")) == [
        "part-00000.json",
        "part-00001.json",
    ]
    monkeypatch.setattr(build_module._PartWriter, "close", real_close)
    resumed = build_store(source, tokenizer, tmp_path / "cache", workers=2, **SMALL)
    assert store_bytes(resumed) == store_bytes(reference)


def test_small_corpus_split_matches_split_documents(tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text(f"document {i}\n" * (i + 1))
    source = open_source(corpus)
    store = build_store(source, tokenizer, tmp_path / "cache", val_fraction=0.02, **SMALL)
    train_docs, val_docs = split_documents(list(source), 0.02)
    assert len(val_docs) == 1  # the fix-up moved the lowest hash there, in the store too
    assert store.index["splits"]["val"]["num_docs"] == 1
    val_text = tokenizer.decode(store.split("val")[0][:-1])
    assert val_text == val_docs[0].text


def test_empty_corpus_is_a_clear_error(tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "blob.bin").write_bytes(b"\x00\x01")
    message = r"is empty: no non-empty UTF-8 document \(skipped 1: 1 binary or not UTF-8"
    with pytest.raises(DataError, match=message):
        build_store(open_source(corpus), tokenizer, tmp_path / "cache", **SMALL)


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(151_936) == np.uint32


def test_every_format_gives_the_tokens_of_the_text_folder(tokenizer, corpus_dir, tmp_path):
    pa = importlib.import_module("pyarrow")
    parquet = importlib.import_module("pyarrow.parquet")
    texts = [doc.text for doc in open_source(corpus_dir)]
    jsonl = tmp_path / "c.jsonl.gz"
    jsonl.write_bytes(
        gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    )
    parquet.write_table(pa.table({"text": texts}), tmp_path / "c.parquet", row_group_size=7)
    settings = dict(val_fraction=0.0, **SMALL)  # names differ by format; keep every document
    expected = build_store(open_source(corpus_dir), tokenizer, tmp_path / "a", **settings)
    for path in (jsonl, tmp_path / "c.parquet"):
        store = build_store(open_source(path), tokenizer, tmp_path / path.suffix, **settings)
        assert np.array_equal(store.split("train").tokens, expected.split("train").tokens)
        assert np.array_equal(store.split("train").offsets, expected.split("train").offsets)


def test_only_the_first_reader_after_preparation_hashes_the_store(monkeypatch):
    """Rank 0 hashes the token store ("full") unless the launcher has just prepared it for
    its ranks; every other reader checks sizes only (it used to be hashed twice per start)."""
    from multitoken.train import data as train_data
    from multitoken.train.config_io import load_config

    seen = []
    monkeypatch.setattr(train_data, "build_store", lambda *a, **k: seen.append(k["verify"]))
    monkeypatch.setattr(train_data, "_workers", lambda cfg, source: 1)
    cfg = load_config(None, [])
    monkeypatch.delenv(train_data.DATA_CHECKED_ENV, raising=False)
    for rank in (0, 1):
        train_data._store(cfg, None, None, rank, False)
    monkeypatch.setenv(train_data.DATA_CHECKED_ENV, "1")
    train_data._store(cfg, None, None, 0, False)
    assert seen == ["full", "size", "size"]
