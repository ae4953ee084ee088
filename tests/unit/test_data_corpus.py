"""Reading a corpus (the standard library, a folder, a JSONL file), its errors, and the
train/validation split rule."""

import json
import sysconfig
from pathlib import Path

import pytest

from multitoken.data import DataError, Document, open_source, split_documents, stdlib_source
from multitoken.data.build import empty_corpus_message
from multitoken.data.split import SplitRule, unit_hash


def test_stdlib_source_is_sorted_and_bounded():
    docs = list(stdlib_source(max_files=40))
    assert len(docs) == 40
    names = [doc.name for doc in docs]
    assert names == sorted(names)
    assert all(name.endswith(".py") and "site-packages" not in name for name in names)
    assert all(doc.text for doc in docs)
    assert list(stdlib_source(max_files=40)) == docs
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(doc.text == (root / doc.name).read_text("utf-8") for doc in docs[:5])


def test_load_folder(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    source = open_source(tmp_path)
    assert list(source) == [Document("a.md", "first"), Document("b/two.txt", "second")]
    assert dict(source.skipped.counts) == {"binary or not UTF-8": 1, "empty": 1}


def test_load_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": "one", "id": 7}), "", json.dumps({"text": "two"})]
    path.write_text("\n".join(lines) + "\n")
    expected = [Document(f"{path}:1", "one"), Document(f"{path}:3", "two")]
    assert list(open_source(path)) == expected


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"data path '.*nope' does not exist: pass --data a folder"):
        open_source(tmp_path / "nope")


def test_empty_folder(tmp_path):
    source = open_source(tmp_path)
    assert list(source) == []
    message = empty_corpus_message(source)
    assert "is empty: no non-empty UTF-8 document (skipped nothing); point data.path" in message


def test_jsonl_line_without_text(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2: no 'text' field: put each document's"):
        list(open_source(path))


def test_jsonl_bad_json_and_bad_text(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"c\.jsonl:1: not valid JSON"):
        list(open_source(path))
    path.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="'text' is a int, not a string"):
        list(open_source(path))


def test_empty_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n\n")
    source = open_source(path)
    assert list(source) == []
    assert "is empty" in empty_corpus_message(source)


def test_other_file_type(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="cannot tell the format of .*c.txt' from its name"):
        open_source(path)


def test_split_empty_corpus():
    with pytest.raises(DataError, match="cannot split an empty corpus: pass --data"):
        split_documents([])
    with pytest.raises(DataError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        split_documents([Document("a", "x")], val_fraction=1.0)


def test_split_is_stable_and_complete():
    docs = [Document(f"doc{i}", "x") for i in range(500)]
    train, val = split_documents(docs, val_fraction=0.1, seed=0)
    assert sorted(train + val, key=docs.index) == docs
    assert 20 < len(val) < 90
    # Known-stable: the split depends only on names and seed, not on Python's hash salt
    # or on the other documents.
    assert split_documents(docs[::-1], 0.1, 0)[1] == val[::-1]
    assert split_documents(docs[:250], 0.1, 0)[1] == [d for d in val if d in docs[:250]]
    assert split_documents(docs, 0.1, seed=1)[1] != val
    # The rule is the hash of the name, whoever applies it (the store, the tokenizer sample).
    assert val == [d for d in docs if unit_hash(d.name, 0) < 0.1]
    rule = SplitRule(0.1, 0)
    assert val == [d for d in docs if rule.is_val(d.name)]


def test_split_small_corpora():
    two = [Document("a", "x"), Document("b", "y")]
    train, val = split_documents(two, val_fraction=0.02)
    assert len(train) == 1 and len(val) == 1
    assert val == [min(two, key=lambda d: unit_hash(d.name, 0))]  # the smallest hash
    train, val = split_documents(two, val_fraction=0.99)
    assert len(train) == 1 and len(val) == 1
    assert train == [max(two, key=lambda d: unit_hash(d.name, 0))]  # the largest hash
    assert split_documents([Document("a", "x")]) == ([Document("a", "x")], [])
    assert split_documents(two, val_fraction=0.0) == (two, [])


def test_unit_hash_is_the_same_in_every_process():
    # Known values: a change here would move documents between the splits of every corpus.
    assert unit_hash("doc0", 0) == 0.9316530541740139
    assert unit_hash("a.md", 3) == 0.2182101019563317
