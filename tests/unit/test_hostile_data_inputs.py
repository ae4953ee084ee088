"""Hostile data inputs found beyond issue 21's list: file names that are not UTF-8, tokenizer
files that are not regular files or not JSON objects, and reading that must stay the same
(blank lines, line numbers) after the readers changed."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from multitoken.data import DataError, Document, Tokenizer, open_source, train_tokenizer

TEXTS = [f"def f{i}(x):\n    return x * {i}\n" * 4 for i in range(6)]


def test_a_file_name_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    for i, text in enumerate(TEXTS):
        (tmp_path / f"f{i}.txt").write_text(text)
    with open(os.path.join(bytes(tmp_path), b"\xff\xfe.txt"), "w") as file:
        file.write("hello\n")
    source = open_source(tmp_path)
    assert [doc.name for doc in source] == [f"f{i}.txt" for i in range(6)]
    assert source.skipped.counts == {"name not UTF-8": 1}
    assert source.fingerprint()  # hashed without a UnicodeEncodeError


def test_a_shard_name_that_is_not_utf8_is_a_bad_record(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    with open(os.path.join(bytes(tmp_path), b"\xff.jsonl"), "w") as file:
        file.write(json.dumps({"text": "lost"}) + "\n")
    with pytest.raises(DataError, match="name not UTF-8: rename the file"):
        list(open_source(tmp_path))
    source = open_source(tmp_path, on_bad_record="skip")
    assert [doc.text for doc in source] == ["fine"]
    assert source.skipped.counts == {"name not UTF-8": 1}


@pytest.fixture()
def tokenizer(tmp_path) -> Tokenizer:
    docs = [Document(str(i), text) for i, text in enumerate(TEXTS)]
    return train_tokenizer(docs, 300, tmp_path / "cache", verbose=False)


@pytest.mark.timeout(20)
def test_a_tokenizer_that_is_a_fifo_or_a_device_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="is a FIFO, not a regular file"):
        Tokenizer.load(tmp_path)
    with pytest.raises(DataError, match="is a device, not a regular file"):
        Tokenizer.load("/dev/zero")


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[1]", "is not a JSON object"),
        ("[" * 100_000, "not valid JSON \\(RecursionError"),
        ("{x", "not valid JSON"),
        (None, "is a FIFO, not a regular file"),
    ],
)
def test_a_bad_tokenizer_config_is_one_error(tmp_path, tokenizer, config, message):
    tokenizer.save(tmp_path / "model" / "tokenizer.json")
    path = tmp_path / "model" / "tokenizer_config.json"
    if config is None:
        os.mkfifo(path)
    else:
        path.write_text(config)
    with pytest.raises(DataError, match=message):
        Tokenizer.load(tmp_path / "model")


def test_a_loaded_tokenizer_is_the_saved_one(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path).backend.to_str() == tokenizer.backend.to_str()


def test_blank_lines_keep_their_line_numbers(tmp_path):
    """Runs of blank lines are read a buffer at a time: the names (file:line) stay the same."""
    lines = []
    for i in range(300):
        lines.append(json.dumps({"text": f"doc {i}"}))
        lines.extend([""] * (i % 3) + [" \t"] * (i % 2) + ["\r"] * (i % 5 == 0))
        if i % 40 == 0:
            lines.extend([""] * 5000 + ["  "] * 100 + ["\x0c"])
    data = ("\n".join(lines) + "\n").encode()
    expected = [f"{n}" for n, line in enumerate(lines, start=1) if line.strip()]
    for name, content in [("a.jsonl", data), ("a.jsonl.gz", gzip.compress(data))]:
        (tmp_path / name).write_bytes(content)
        docs = list(open_source(tmp_path / name))
        assert [doc.name.rsplit(":", 1)[1] for doc in docs] == expected
        assert [doc.text for doc in docs] == [f"doc {i}" for i in range(300)]
