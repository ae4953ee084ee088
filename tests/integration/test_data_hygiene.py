"""Hostile data folders (issue 12): FIFOs, links to devices, unreadable files and huge documents
are skipped and reported with their number, never a hang, a MemoryError or a traceback.

The source is read in a subprocess with a timeout and an address-space limit, so a regression
(a FIFO that blocks, ``/dev/zero`` read to the end) fails in seconds instead of hanging the
suite or eating the machine's memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from multitoken.cli import main
from multitoken.data import Document, open_source
from multitoken.data import tokenizer as tokenizer_module
from multitoken.data.tokenizer import train_tokenizer

GOOD = {f"doc{i:02d}.txt": f"def f{i}(x):\n    return x * {i} + {i}\n" * 20 for i in range(24)}
# Reads the source given on the command line and prints what it yielded and skipped.
READER = """
import json, sys
from multitoken.data import open_source
limit = {"max_doc_mb": float(sys.argv[2])} if len(sys.argv) > 2 else {}
source = open_source(sys.argv[1], **limit)
names = [doc.name for doc in source]
print(json.dumps({"names": names, "skipped": source.skipped.to_dict(),
                  "summary": source.skipped.summary()}))
"""


def _limit_memory() -> None:
    limit = 8 << 30  # torch's import maps ~2 GB; reading /dev/zero would pass 8 GB in seconds
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def read_in_subprocess(folder: Path, *max_doc_mb: float) -> dict:
    """What a pass over ``folder`` yields and skips, read with a timeout and a memory cap."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", READER, str(folder), *map(str, max_doc_mb)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        preexec_fn=_limit_memory,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for name, text in GOOD.items():
        (root / name).write_text(text)
    return root


def test_a_fifo_is_skipped_and_reported(folder):
    os.mkfifo(folder / "a_pipe.txt")  # sorted first: the old reader blocked in open()
    result = read_in_subprocess(folder)
    assert result["names"] == sorted(GOOD)
    assert result["skipped"]["counts"] == {"not a regular file": 1}
    assert "a_pipe.txt (a FIFO)" in result["summary"]


def test_a_link_to_dev_zero_is_skipped_and_reported(folder):
    (folder / "zero.txt").symlink_to("/dev/zero")
    (folder / "linked.txt").symlink_to(folder / "doc00.txt")  # a link to a file is read
    result = read_in_subprocess(folder)
    assert result["names"] == sorted([*GOOD, "linked.txt"])
    assert result["skipped"]["counts"] == {"not a regular file": 1}
    assert "zero.txt (a device)" in result["summary"]


def test_unreadable_files_are_skipped_and_counted(folder, monkeypatch):
    (folder / "broken.txt").symlink_to(folder / "gone.txt")
    (folder / "loop.txt").symlink_to(folder / "loop.txt")
    denied = str(folder / "doc03.txt")
    real_open = os.open

    def deny(path, *args, **kwargs):  # tests run as root: chmod 000 would still read
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    source = open_source(folder)
    names = [doc.name for doc in source]
    assert names == sorted(set(GOOD) - {"doc03.txt"})
    assert source.skipped.counts == {"unreadable": 3}
    summary = source.skipped.summary()
    assert "skipped 3: 3 unreadable" in summary
    assert "doc03.txt (unreadable: Permission denied)" in summary
    assert "broken.txt (unreadable: No such file or directory)" in summary
    # Identity and progress read no file and survive the same folder.
    assert source.total_bytes == sum(len(text) for text in GOOD.values())
    assert source.fingerprint()


def test_over_limit_documents_are_skipped_with_a_count(folder, tmp_path):
    (folder / "huge.txt").write_text("word " * 300_000)  # 1.5 MB of one line
    result = read_in_subprocess(folder, 1)
    assert result["names"] == sorted(GOOD)
    assert result["skipped"]["counts"] == {"over data.max_doc_mb=1": 1}
    assert "huge.txt (1.5 MB, over data.max_doc_mb=1: split the document" in result["summary"]
    # A JSONL line over the limit is read past in pieces and counted; the next line is kept.
    shard = tmp_path / "shard.jsonl"
    lines = [{"text": "small"}, {"text": "word " * 300_000}, {"text": "after"}]
    shard.write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = open_source(shard, max_doc_mb=1)
    assert [doc.text for doc in source] == ["small", "after"]
    assert source.skipped.counts == {"over data.max_doc_mb=1": 1}
    assert "shard.jsonl:2 (1.5 MB" in source.skipped.summary()
    assert [doc.name for doc in open_source(folder, max_doc_mb=0)] == sorted([*GOOD, "huge.txt"])


def test_the_tokenizer_sees_a_long_line_in_pieces_and_learns_the_same(tmp_path):
    text = " ".join(f"w{i % 977}x{i % 13}" for i in range(40_000))  # one ~300 K char line
    pieces = list(tokenizer_module._training_pieces(text, 1 << 12))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 1 << 12
    assert all(not piece[-1].isspace() for piece in pieces)  # cut where the BPE splits anyway

    whole = train_tokenizer([Document("whole", text)], 600, tmp_path / "a", verbose=False)
    cut = [Document(f"p{i}", piece) for i, piece in enumerate(pieces)]
    by_pieces = train_tokenizer(cut, 600, tmp_path / "b", verbose=False)
    assert whole.backend.get_vocab() == by_pieces.backend.get_vocab()


@pytest.mark.timeout(60)
def test_train_on_a_hostile_folder_reports_every_skip(folder, tmp_path):
    """``multitoken train --data <folder>`` end to end: the run completes, one line of skips."""
    os.mkfifo(folder / "a_pipe.txt")
    (folder / "broken.txt").symlink_to(folder / "gone.txt")
    (folder / "huge.txt").write_text("word " * 300_000)
    out, err = io.StringIO(), io.StringIO()
    argv = ["train", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1"]
    argv += ["model.max_seq_len=128", "mtp.num_depths=2", "data.vocab_size=300", "data.seq_len=64"]
    argv += ["data.batch_size=4", "data.val_fraction=0.1", "train.steps=2", "parallel.cp=1"]
    argv += ["train.warmup_steps=1", "train.eval_batches=1", "data.max_doc_mb=1"]
    argv += [f"run.dir={tmp_path}", f"data.cache_dir={tmp_path}/cache", "--data", str(folder)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()[-3000:]
    assert "Traceback" not in err.getvalue()
    skips = [line for line in err.getvalue().splitlines() if "skipped 3:" in line]
    assert len(skips) == 1, err.getvalue()
    for part in ("1 not a regular file", "1 unreadable", "1 over data.max_doc_mb=1"):
        assert part in skips[0]
    assert "3 input(s) skipped" in out.getvalue()
