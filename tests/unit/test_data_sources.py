"""Input formats: every one yields the documents of the equivalent text folder; bad input."""

import builtins
import gzip
import importlib
import json
import os
import sysconfig
from pathlib import Path

import pytest

from multitoken.data import DataError, Document, open_source, stdlib_source

TEXTS = [
    "def f(x):\n    return x + 1\n",
    "naïve ☃ 日本語 — second document\n",
    "third <|endoftext|> with a literal special token",
    "x" * 5000,
]


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    for i, text in enumerate(TEXTS):
        (root / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return root


def texts_of(source):
    return [doc.text for doc in source]


def write_jsonl(path, records):
    lines = "".join(json.dumps(record) + "\n" for record in records)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines.encode()))
    elif path.name.endswith(".zst"):
        zstandard = importlib.import_module("zstandard")
        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    else:
        path.write_text(lines, encoding="utf-8")


def test_text_folder_is_recursive_and_sorted(folder):
    source = open_source(folder)
    assert source.format == "text"
    names = [doc.name for doc in source]
    assert names == sorted(names) and len(names) == len(TEXTS)
    assert sorted(texts_of(source)) == sorted(TEXTS)


def test_glob_selects_files(folder):
    (folder / "notes.md").write_text("markdown")
    assert texts_of(open_source(folder, glob="*.md")) == ["markdown"]
    assert len(texts_of(open_source(folder, glob="sub/*"))) == 2


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_formats_match_the_folder(folder, tmp_path, suffix):
    expected = texts_of(open_source(folder))
    path = tmp_path / f"corpus{suffix}"
    write_jsonl(path, [{"id": i, "body": text} for i, text in enumerate(expected)])
    source = open_source(path, text_field="body")
    assert source.format == "jsonl"
    assert texts_of(source) == expected
    assert source.bytes_read == path.stat().st_size  # progress counts bytes on disk


def test_folder_of_jsonl_files(folder, tmp_path):
    expected = texts_of(open_source(folder))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", [{"text": t} for t in expected[:2]])
    write_jsonl(shards / "b.jsonl.gz", [{"text": t} for t in expected[2:]])
    (shards / "README").write_text("not a shard")
    assert texts_of(open_source(shards, format="jsonl")) == expected


def test_parquet_matches_the_folder(folder, tmp_path):
    pa = importlib.import_module("pyarrow")
    parquet = importlib.import_module("pyarrow.parquet")
    expected = texts_of(open_source(folder))
    path = tmp_path / "corpus.parquet"
    table = pa.table({"id": list(range(len(expected))), "content": expected})
    parquet.write_table(table, path, row_group_size=2)
    assert texts_of(open_source(path, text_field="content")) == expected
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: \['id', 'content'\]\)"):
        list(open_source(path))
    with pytest.raises(DataError, match="column 'id' is int64, not a string"):
        list(open_source(path, text_field="id"))


def test_hf_datasets_match_the_folder(folder, tmp_path):
    datasets = importlib.import_module("datasets")
    expected = texts_of(open_source(folder))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": expected}).save_to_disk(str(saved))
    source = open_source(saved)
    assert source.format == "hf_disk"
    assert texts_of(source) == expected
    files = tmp_path / "hf_files"
    files.mkdir()
    write_jsonl(files / "train.jsonl", [{"text": t} for t in expected])
    assert texts_of(open_source(files, format="hf")) == expected


def test_stdlib_source_is_the_stdlib_py_files_in_path_order():
    # Independent reference: walk the stdlib folder, keep readable non-empty UTF-8 .py files.
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        name = path.relative_to(root).as_posix()
        if {"site-packages", "__pycache__"} & set(name.split("/")) or any(
            part.startswith(".") for part in name.split("/")
        ):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text and "\x00" not in text:
            expected.append(Document(name, text))
        if len(expected) == 30:
            break
    assert list(stdlib_source(max_files=30)) == expected


# ---------------------------------------------------------------------------- bad input


def test_binary_and_non_utf8_files_are_skipped_and_reported(folder):
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    (folder / "empty.txt").write_text("")
    source = open_source(folder)
    assert sorted(texts_of(source)) == sorted(TEXTS)
    assert source.skipped.total == 3
    summary = source.skipped.summary()
    assert "2 binary or not UTF-8" in summary and "1 empty" in summary and "blob.bin" in summary


def test_jsonl_line_without_the_field_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"text": "ok"}, {"body": "x"}])
    with pytest.raises(DataError, match=r"c\.jsonl:2: no 'text' field: .*data\.text_field"):
        list(open_source(path))
    skipping = open_source(path, on_bad_record="skip")
    assert texts_of(skipping) == ["ok"] and skipping.skipped.total == 1


def test_jsonl_wrong_type_bad_json_and_bad_bytes(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"text": ["a", "list"]}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: 'text' is a list, not a string"):
        list(open_source(path))
    path.write_bytes(b'{"text": "fine"}\n{broken\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not valid JSON"):
        list(open_source(path))
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not UTF-8: re-encode"):
        list(open_source(path))
    skipping = open_source(path, on_bad_record="skip")
    assert texts_of(skipping) == ["fine"] and "not UTF-8" in skipping.skipped.summary()


def test_path_and_setting_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "missing")
    (tmp_path / "corpus.csv").write_text("a,b")
    with pytest.raises(DataError, match="cannot tell the format of .*corpus.csv"):
        open_source(tmp_path / "corpus.csv")
    with pytest.raises(DataError, match="data.format='xml' is not one of"):
        open_source(tmp_path, format="xml")
    with pytest.raises(DataError, match="on_bad_record='ignore'"):
        open_source(tmp_path, on_bad_record="ignore")


def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match=r"pip install 'multitoken\[data\]'"):
        list(open_source(path))


def test_fingerprint_follows_files(folder):
    before = open_source(folder).fingerprint()
    assert open_source(folder).fingerprint() == before
    path = folder / "doc0.txt"
    mtime = path.stat().st_mtime_ns
    path.write_text(path.read_text()[::-1])  # same size, new content
    # File times tick with the kernel's coarse clock: make the edit's mtime visibly later,
    # as any edit a second or more after the fixture's write would be.
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert open_source(folder).fingerprint() != before
    assert open_source(folder, text_field="body").fingerprint() != open_source(folder).fingerprint()
