"""Corpus loading, its errors, and the train/validation split."""

import json

import pytest

from multitoken.data.corpus import DataError, Document, load_corpus, split_corpus, stdlib_corpus


def test_stdlib_corpus_is_sorted_and_bounded():
    docs = stdlib_corpus(max_files=40)
    assert len(docs) == 40
    names = [doc.name for doc in docs]
    assert names == sorted(names)
    assert all(name.endswith(".py") and "site-packages" not in name for name in names)
    assert all(doc.text for doc in docs)
    assert stdlib_corpus(max_files=40) == docs


def test_load_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    assert load_corpus(tmp_path) == [Document("a.md", "first"), Document("b/two.txt", "second")]


def test_load_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": "one", "id": 7}), "", json.dumps({"text": "two"})]
    path.write_text("\n".join(lines) + "\n")
    assert load_corpus(path) == [Document(f"{path}:1", "one"), Document(f"{path}:3", "two")]


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"data path '.*nope' does not exist: pass --data a folder"):
        load_corpus(tmp_path / "nope")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="contains no non-empty UTF-8 text files: pass --data"):
        load_corpus(tmp_path)


def test_jsonl_line_without_text(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2 has no 'text' field: every line"):
        load_corpus(path)


def test_jsonl_bad_json_and_bad_text(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"c\.jsonl:1 is not valid JSON"):
        load_corpus(path)
    path.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="'text' is a int, not a string"):
        load_corpus(path)


def test_empty_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n\n")
    with pytest.raises(DataError, match="contains no documents"):
        load_corpus(path)


def test_other_file_type(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="is a file but not a .jsonl file"):
        load_corpus(path)


def test_split_empty_corpus():
    with pytest.raises(DataError, match="cannot split an empty corpus: pass --data"):
        split_corpus([])


def test_split_is_stable_and_complete():
    docs = [Document(f"doc{i}", "x") for i in range(500)]
    train, val = split_corpus(docs, val_fraction=0.1, seed=0)
    assert sorted(train + val, key=docs.index) == docs
    assert 20 < len(val) < 90
    # Known-stable: the split depends only on names and seed, not on Python's hash salt
    # or on the other documents.
    assert split_corpus(docs[::-1], 0.1, 0)[1] == val[::-1]
    assert split_corpus(docs[:250], 0.1, 0)[1] == [d for d in val if d in docs[:250]]
    assert split_corpus(docs, 0.1, seed=1)[1] != val


def test_split_small_corpora():
    two = [Document("a", "x"), Document("b", "y")]
    train, val = split_corpus(two, val_fraction=0.02)
    assert len(train) == 1 and len(val) == 1
    train, val = split_corpus(two, val_fraction=0.99)
    assert len(train) == 1 and len(val) == 1
    assert split_corpus([Document("a", "x")]) == ([Document("a", "x")], [])
    assert split_corpus(two, val_fraction=0.0) == (two, [])
