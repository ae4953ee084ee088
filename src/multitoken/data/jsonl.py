"""The JSONL input of a :class:`~multitoken.data.sources.Source`: ``.jsonl`` files, plain or
compressed (``.gz``; ``.zst`` with the optional ``multitoken[data]`` extra), one JSON object a
line with the document in the source's ``text_field``.

Lines are read one at a time, and a line over ``max_doc_mb`` is read past in pieces, never
held whole, so memory does not grow with the file or with a runaway line.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from multitoken.data.columnar import import_optional
from multitoken.data.documents import Document

# The functions take the Source they read for (``source``), typed loosely: this module sits
# below sources.py, which imports it.
Source = object

__all__ = ["JSONL_SUFFIXES", "iter_jsonl"]

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


class _CountingReader(io.RawIOBase):
    """A binary file that counts the bytes read from disk, for progress on compressed input."""

    def __init__(self, raw: IO[bytes], source: Source) -> None:
        self.raw, self.source = raw, source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.raw.readinto(buffer)
        self.source.bytes_read += count or 0
        return count

    def close(self) -> None:
        self.raw.close()
        super().close()


def _lines(source: Source, binary: IO[bytes], name: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a JSONL stream; a line over the limit is read past in
    pieces (never held whole), counted and not yielded."""
    reader = io.BufferedReader(binary)
    limit = source.max_doc_size if source.max_doc_mb else -1
    lineno = 0
    while line := reader.readline(limit + 1 if limit > 0 else -1):
        lineno += 1
        if limit < 0 or len(line) <= limit or line.endswith(b"\n"):
            yield lineno, line
            continue
        size = len(line)
        while piece := reader.readline(1 << 20):
            size += len(piece)
            if piece.endswith(b"\n"):
                break
        source.too_big(f"{name}:{lineno}", size)


def _open_jsonl(source: Source, name: str, path: Path) -> IO[bytes] | None:
    file = source.open_file(name, path, unreadable_is_bad=True)
    if file is None:
        return None
    raw = _CountingReader(file, source)
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=io.BufferedReader(raw))
    if name.endswith(".zst"):
        zstandard = import_optional("zstandard", ".jsonl.zst files")
        return zstandard.ZstdDecompressor().stream_reader(io.BufferedReader(raw))
    return io.BufferedReader(raw)


def iter_jsonl(source: Source) -> Iterator[Document]:
    """The documents of the source's JSONL files, named ``file:lineno``; blank lines skipped,
    bad records raised or skipped as the source's ``on_bad_record`` says."""
    for name, path, _ in source.regular_files(unreadable_is_bad=True):
        binary = _open_jsonl(source, name, path)
        if binary is None:
            continue
        with binary:
            for lineno, line in _lines(source, binary, name):
                if not line.strip():
                    continue
                where = f"{name}:{lineno}"
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    source.bad_record(where, "not UTF-8", "re-encode the file as UTF-8")
                    continue
                except json.JSONDecodeError as err:
                    source.bad_record(
                        where, f"not valid JSON ({err.msg})", "write one object a line"
                    )
                    continue
                text = source.text_field_of(record, where)
                if text:
                    yield Document(where, text)
