"""Where documents come from, streamed: folders, JSONL (plain, .gz, .zst), Parquet, HF datasets.

A :class:`Source` is a re-iterable stream of :class:`~multitoken.data.documents.Document`: it
never holds the corpus in memory, so a 100 GB corpus costs what one document (or one Parquet
record batch) costs. Every source also has a cheap :meth:`Source.fingerprint` (file names,
sizes and modification times, no content read) that keys the token store's cache.

Formats (``format="auto"`` picks by the path; a folder holding only JSONL or only Parquet
files is read as that format):

- ``text``: a folder read recursively; every file whose path relative to the folder matches
  ``glob`` (an ``fnmatch`` pattern, ``*`` crosses folders) is one document. Binary, non-UTF-8,
  empty and unreadable files are skipped, counted and reported.
- ``jsonl``: ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` files (or a folder of them); one JSON
  object per line with the document in ``text_field``.
- ``parquet``: ``.parquet`` files (or a folder of them); the document is column ``text_field``.
- ``hf_disk``: a folder written by ``datasets``' ``save_to_disk`` (``"train"`` split of a
  ``DatasetDict``).
- ``hf``: local files read by ``datasets.load_dataset(path, streaming=True)`` (a folder of
  csv / json / parquet / text files, ...).

Bad records (invalid JSON, a missing or non-string text field, non-UTF-8 bytes) raise
:class:`~multitoken.errors.DataError` naming the file and line, or, with
``on_bad_record="skip"``, are skipped, counted and reported. The reading happens here, in the
main process, so a bad record is never a crash deep in a tokenisation worker.

Hostile folders: only regular files (and links to them) are read. FIFOs, devices, sockets
and broken links are skipped, counted and reported, found by ``os.stat`` and checked again on
the open descriptor, so a FIFO never blocks and ``/dev/zero`` is never read. A document over
``max_doc_mb`` (a text file by its size on disk, a JSONL line by its bytes, a Parquet or
dataset value by its characters) is skipped and counted without being held in memory (a JSONL
line is read past in pieces; a text file is never opened).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from multitoken.data.columnar import iter_hf, iter_hf_disk, iter_parquet
from multitoken.data.documents import (
    Document,
    NotRegularFileError,
    decode_text,
    file_kind,
    is_unicode,
    open_regular,
    walk_files,
)
from multitoken.data.formats import FORMATS, detect_format
from multitoken.data.jsonl import JSONL_SUFFIXES, iter_jsonl
from multitoken.data.skips import SkipReport
from multitoken.errors import DataError

__all__ = [
    "DEFAULT_MAX_DOC_MB",
    "DEFAULT_MAX_EXPANDED_MB",
    "FORMATS",
    "SkipReport",
    "Source",
    "open_source",
    "stdlib_source",
]

# Files named in the skip report; the rest are only counted.
DEFAULT_MAX_DOC_MB = 64
# Decompressed MB one compressed file may expand to (a generous bound on decompression bombs).
DEFAULT_MAX_EXPANDED_MB = 100_000
_MB = 1_000_000
# Reasons in the skip report (the counts' keys).
NOT_REGULAR = "not a regular file"
UNREADABLE = "unreadable"
BAD_NAME = "name not UTF-8"


def _is_stat(status: os.stat_result | str) -> bool:
    return not isinstance(status, str)


class Source:
    """A re-iterable, streamed corpus.

    Attributes:
        root: The path given.
        format: The resolved format (never ``"auto"``).
        text_field: The field or column that holds the document text.
        glob: Which files of a folder to read (``fnmatch`` on the relative path).
        max_docs: Stop after this many documents (0 = all).
        max_doc_mb: Skip (and count) a document over this many MB (0 = no limit).
        max_expanded_mb: Stop on a compressed file that expands to more MB (0 = no limit).
        on_bad_record: ``"error"`` (raise, naming file and line) or ``"skip"`` (count).
        skipped: What the latest pass skipped.
        bytes_read: Bytes of input read from disk so far in the current pass.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        format: str = "auto",
        text_field: str = "text",
        glob: str = "*",
        max_docs: int = 0,
        on_bad_record: str = "error",
        skip_dirs: frozenset[str] = frozenset({"__pycache__"}),
        max_doc_mb: float = DEFAULT_MAX_DOC_MB,
        max_expanded_mb: float = DEFAULT_MAX_EXPANDED_MB,
    ) -> None:
        self.root = Path(path)
        if format not in FORMATS:
            raise DataError(f"data.format={format!r} is not one of {FORMATS}")
        if on_bad_record not in ("error", "skip"):
            raise DataError(f"data.on_bad_record={on_bad_record!r} must be 'error' or 'skip'")
        if max_docs < 0:
            raise DataError(f"max_docs must be >= 0 (0 = all), got {max_docs}")
        if not max_doc_mb >= 0:
            raise DataError(f"data.max_doc_mb must be >= 0 (0 = no limit), got {max_doc_mb}")
        if not max_expanded_mb >= 0:
            raise DataError(
                f"data.max_expanded_mb must be >= 0 (0 = no limit), got {max_expanded_mb}"
            )
        if format != "hf" and not self.root.exists():
            raise DataError(
                f"data path '{self.root}' does not exist: pass --data a folder of text files, "
                "a .jsonl(.gz/.zst) or .parquet file, or a saved Hugging Face dataset"
            )
        self.format = detect_format(self.root) if format == "auto" else format
        self.text_field = text_field
        self.glob = glob
        self.max_docs = max_docs
        self.on_bad_record = on_bad_record
        self.skip_dirs = skip_dirs
        self.max_doc_mb = max_doc_mb
        # Not in the fingerprint: a build that completes reads the same whatever the limit.
        self.max_expanded_mb = max_expanded_mb
        self.skipped = SkipReport()
        self.bytes_read = 0

    # ------------------------------------------------------------------ files and identity

    def _entries(self) -> list[tuple[str, Path, os.stat_result | str]]:
        """Every input path as (name, path, its ``os.stat`` or why it cannot be read).

        ``os.stat`` follows links (a link to a regular file is read) but opens nothing.
        """
        if not os.path.lexists(self.root):  # format "hf" takes names that are not paths
            paths = []
        elif not self.root.is_dir():
            paths = [(str(self.root), self.root)]
        else:
            found = walk_files(self.root, self.skip_dirs)
            if self.format == "jsonl":
                found = [f for f in found if f[0].lower().endswith(JSONL_SUFFIXES)]
            elif self.format == "parquet":
                found = [f for f in found if f[0].lower().endswith(".parquet")]
            paths = [(name, path) for name, path in found if fnmatch.fnmatchcase(name, self.glob)]
        entries: list[tuple[str, Path, os.stat_result | str]] = []
        for name, path in paths:
            try:
                status: os.stat_result | str = path.stat()
            except OSError as err:  # a broken link, a loop, a folder we may not enter
                status = f"{UNREADABLE}: {err.strerror or err}"
            else:
                kind = file_kind(status.st_mode)
                status = status if kind is None else kind
            if not is_unicode(name):  # a name no document name, hash or report can hold
                status = BAD_NAME
            if isinstance(status, str) and path == self.root:
                raise DataError(
                    f"data path '{self.root}' is {status}, not a regular file: point data.path "
                    "at a folder of text files, a .jsonl(.gz/.zst) or .parquet file"
                )
            entries.append((name, path, status))
        return entries

    def files(self) -> list[tuple[str, Path]]:
        """The readable regular input files as (name, path), in reading order."""
        return [(name, path) for name, path, status in self._entries() if _is_stat(status)]

    def regular_files(self, unreadable_is_bad: bool) -> Iterator[tuple[str, Path, int]]:
        """(name, path, size) of the regular files; the others skipped into the report."""
        for name, path, status in self._entries():
            if _is_stat(status):
                yield name, path, status.st_size
            elif status.startswith(UNREADABLE):
                self._unreadable(name, status, unreadable_is_bad)
            elif status == BAD_NAME and unreadable_is_bad:
                self.bad_record(name, BAD_NAME, "rename the file")
            elif status == BAD_NAME:
                self.skipped.add(name, BAD_NAME)
            else:
                self.skipped.add(name, NOT_REGULAR, status)

    def _unreadable(self, name: str, detail: str, is_bad: bool) -> None:
        if is_bad:  # a data shard: losing one silently would change the corpus a lot
            self.bad_record(name, detail, "fix its permissions or remove it")
        else:
            self.skipped.add(name, UNREADABLE, detail)

    def open_file(self, name: str, path: Path, unreadable_is_bad: bool) -> IO[bytes] | None:
        """``path`` opened if it is still a readable regular file, else None (reported)."""
        try:
            return open_regular(path)
        except NotRegularFileError as err:
            self.skipped.add(name, NOT_REGULAR, err.kind)
        except OSError as err:
            self._unreadable(name, f"{UNREADABLE}: {err.strerror or err}", unreadable_is_bad)
        return None

    @property
    def max_doc_size(self) -> int:
        return int(self.max_doc_mb * _MB)

    def too_big(self, where: str, size: int) -> bool:
        """True (and counted) when a document of ``size`` bytes or characters is over the limit."""
        if not self.max_doc_mb or size <= self.max_doc_size:
            return False
        detail = (
            f"{size / _MB:.1f} MB, over data.max_doc_mb={self.max_doc_mb:g}: split the document "
            "or raise the limit"
        )
        self.skipped.add(where, f"over data.max_doc_mb={self.max_doc_mb:g}", detail)
        return True

    @property
    def total_bytes(self) -> int:
        """Bytes on disk of all input files (the progress bar's total)."""
        return sum(status.st_size for _, _, status in self._entries() if _is_stat(status))

    def fingerprint(self) -> str:
        """A hash of the settings and every input file's name, size and mtime (no content).

        Reading 100 GB to hash it would cost minutes on every start; size and modification
        time change whenever a file is edited (an edit of the same size moves the mtime).
        """
        hasher = hashlib.blake2b(digest_size=16)
        settings = [self.format, self.text_field, self.glob, self.max_docs, self.on_bad_record]
        settings.append(self.max_doc_mb)
        hasher.update(json.dumps([str(self.root.resolve()), *settings]).encode())
        for name, _, status in self._entries():
            # A skipped path counts by name and reason: making it readable changes the corpus.
            if _is_stat(status):
                status = f"{status.st_size}\x00{status.st_mtime_ns}"
            hasher.update(f"\x00{name}\x00{status}".encode("utf-8", "surrogateescape"))
        return hasher.hexdigest()

    def describe(self) -> str:
        return f"{self.format} source '{self.root}'"

    # ------------------------------------------------------------------ reading

    def __iter__(self) -> Iterator[Document]:
        self.skipped = SkipReport()
        self.bytes_read = 0
        readers = {
            "text": self._iter_text,
            "jsonl": lambda: iter_jsonl(self),
            "parquet": self._iter_parquet,
            "hf_disk": self._iter_hf_disk,
            "hf": self._iter_hf,
        }
        for count, doc in enumerate(readers[self.format](), start=1):
            yield doc
            if self.max_docs and count >= self.max_docs:
                return

    def bad_record(self, where: str, reason: str, fix: str) -> None:
        if self.on_bad_record == "error":
            raise DataError(f"{where}: {reason}: {fix} (or set data.on_bad_record=skip)")
        self.skipped.add(where, reason)

    def bad_file(self, name: str, detail: str) -> None:
        """A file that cannot be read to its end (truncated, corrupt): an error naming it, or
        with ``on_bad_record="skip"`` one counted skip (what was read before it is kept)."""
        if self.on_bad_record == "error":
            raise DataError(
                f"{name}: {detail}: replace the file (or set data.on_bad_record=skip to keep "
                "what is readable)"
            )
        self.skipped.add(name, "damaged file", detail)

    def _iter_text(self) -> Iterator[Document]:
        for name, path, size in self.regular_files(unreadable_is_bad=False):
            self.bytes_read += size
            if self.too_big(name, size):
                continue  # never opened: a huge file costs nothing
            file = self.open_file(name, path, unreadable_is_bad=False)
            if file is None:
                continue
            with file:
                # Bounded even if the file grew since its stat.
                data = file.read(self.max_doc_size + 1 if self.max_doc_mb else -1)
            if self.too_big(name, len(data)):
                continue
            text = decode_text(data)
            if text is None:
                self.skipped.add(name, "binary or not UTF-8")
            elif not text:
                self.skipped.add(name, "empty")
            else:
                yield Document(name, text)

    def text_field_of(self, record, where: str) -> str | None:
        field_name = self.text_field
        if not isinstance(record, dict) or field_name not in record:
            self.bad_record(
                where,
                f"no '{field_name}' field",
                f"put each document's text in '{field_name}' or set data.text_field",
            )
            return None
        text = record[field_name]
        if text is None:
            self.skipped.add(where, f"null '{field_name}'")
            return None
        if not isinstance(text, str):
            self.bad_record(
                where,
                f"'{field_name}' is a {type(text).__name__}, not a string",
                "store each document's text as a string",
            )
            return None
        if not text.isascii() and not is_unicode(text):
            self.bad_record(
                where,
                "a lone surrogate in the text (not valid Unicode, e.g. '\\ud800' in JSON)",
                "fix the text's encoding",
            )
            return None
        return text

    def iter_records(self, records: Iterator[dict], name: str) -> Iterator[Document]:
        for row, record in enumerate(records, start=1):
            where = f"{name}:{row}"
            text = self.text_field_of(record, where)
            if text and not self.too_big(where, len(text)):
                yield Document(where, text)

    def _iter_parquet(self) -> Iterator[Document]:
        return iter_parquet(self)

    def _iter_hf_disk(self) -> Iterator[Document]:
        return iter_hf_disk(self)

    def _iter_hf(self) -> Iterator[Document]:
        return iter_hf(self)


def open_source(
    path: str | os.PathLike[str],
    format: str = "auto",
    text_field: str = "text",
    glob: str = "*",
    max_docs: int = 0,
    on_bad_record: str = "error",
    max_doc_mb: float = DEFAULT_MAX_DOC_MB,
    max_expanded_mb: float = DEFAULT_MAX_EXPANDED_MB,
) -> Source:
    """A :class:`Source` over ``path``; see the module docstring for the formats.

    Raises:
        DataError: If the path does not exist, is not a regular file or a folder, or the
            format is unknown.
    """
    return Source(
        path,
        format,
        text_field,
        glob,
        max_docs,
        on_bad_record,
        max_doc_mb=max_doc_mb,
        max_expanded_mb=max_expanded_mb,
    )


def stdlib_source(max_files: int = 0) -> Source:
    """The running interpreter's standard-library ``.py`` files as a source (the default
    corpus, ~30 MB: about 1,800 files on 3.11, sorted by path; ``site-packages``,
    ``__pycache__``, empty and non-UTF-8 files are skipped). ``max_files=0`` keeps all.

    Raises:
        DataError: If this Python ships without its standard-library sources.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir() or next(root.glob("*.py"), None) is None:
        raise DataError(
            f"no standard-library .py sources found under '{root}': this Python ships "
            "without them; pass --data a folder of text files or a .jsonl file"
        )
    skip_dirs = frozenset({"site-packages", "__pycache__"})
    return Source(root, "text", glob="*.py", max_docs=max_files, skip_dirs=skip_dirs)
