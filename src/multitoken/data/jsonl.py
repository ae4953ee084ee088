"""The JSONL input of a :class:`~multitoken.data.sources.Source`: ``.jsonl`` files, plain or
compressed (``.gz``; ``.zst`` with the optional ``multitoken[data]`` extra), one JSON object a
line with the document in the source's ``text_field``.

Lines are read one at a time, and a line over ``max_doc_mb`` is read past in pieces, never
held whole, so memory does not grow with the file or with a runaway line. Files are opened
through :func:`~multitoken.data.streams.open_checked`: a truncated or corrupt archive is named,
never read as shorter, and a decompression bomb is shown and stopped at
``data.max_expanded_mb``. A record the JSON parser fails on in any way (bad syntax, nesting
that exhausts its recursion, a number too long to convert) is one bad record.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

from multitoken.data.documents import Document, one_line
from multitoken.data.streams import DamagedFile, open_checked

# The functions take the Source they read for (``source``), typed loosely: this module sits
# below sources.py, which imports it.
Source = object

__all__ = ["JSONL_SUFFIXES", "iter_jsonl"]

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
_BLANK = b" \t\n\r\x0b\x0c"  # what bytes.strip() strips
_BLANK_RUN = 64  # blank lines in a row before the rest of the run is read a buffer at a time


def _blank_lines(reader: io.BufferedReader) -> int:
    """Reads past the blank lines at the reader's position, a buffer at a time; their number.

    A flood of blank lines (the usual decompression bomb) then reads at the decompressor's
    speed instead of a line per Python loop.
    """
    count = 0
    while head := reader.peek(1):
        if head.count(b"\n") == len(head):
            end = len(head)
        else:
            end = head.rfind(b"\n", 0, len(head) - len(head.lstrip(_BLANK))) + 1
        if not end:
            break
        count += head.count(b"\n", 0, end)
        reader.read(end)
    return count


def _lines(source: Source, reader: io.BufferedReader, name: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a JSONL stream, blank lines left out; a line over the limit is
    read past in pieces (never held whole), counted and not yielded."""
    limit = source.max_doc_size if source.max_doc_mb else -1
    lineno = blank_run = 0
    while line := reader.readline(limit + 1 if limit > 0 else -1):
        lineno += 1
        if 0 < limit < len(line) and not line.endswith(b"\n"):
            size = len(line)
            while piece := reader.readline(1 << 20):
                size += len(piece)
                if piece.endswith(b"\n"):
                    break
            source.too_big(f"{name}:{lineno}", size)
        elif not line.strip(_BLANK):
            blank_run += 1
            if blank_run >= _BLANK_RUN:
                lineno += _blank_lines(reader)
            continue
        else:
            yield lineno, line
        blank_run = 0


def _record(source: Source, line: bytes, where: str):
    """The JSON value of one line, or None when it is a bad record (raised or counted)."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        source.bad_record(where, "not UTF-8", "re-encode the file as UTF-8")
    except json.JSONDecodeError as err:
        source.bad_record(where, f"not valid JSON ({err.msg})", "write one object a line")
    except RecursionError:
        source.bad_record(where, "nested too deeply for the JSON parser", "flatten the record")
    except Exception as err:  # noqa: BLE001 - whatever the parser raises is this record's fault
        source.bad_record(where, f"not readable JSON ({one_line(err)})", "write one object a line")
    return None


def _documents(source: Source, binary: io.BufferedReader, name: str) -> Iterator[Document]:
    for lineno, line in _lines(source, binary, name):
        where = f"{name}:{lineno}"
        record = _record(source, line, where)
        text = None if record is None else source.text_field_of(record, where)
        if text:
            yield Document(where, text)


def iter_jsonl(source: Source) -> Iterator[Document]:
    """The documents of the source's JSONL files, named ``file:lineno``; blank lines skipped,
    bad records and damaged files raised or skipped as the source's ``on_bad_record`` says."""
    for name, path, _ in source.regular_files(unreadable_is_bad=True):
        file = source.open_file(name, path, unreadable_is_bad=True)
        if file is None:
            continue
        with open_checked(file, name, source, source.max_expanded_mb) as binary:
            try:
                yield from _documents(source, binary, name)
            except DamagedFile as err:
                source.bad_file(name, str(err))
