"""Documents, and reading the files they come from safely.

A :class:`Document` is what every source yields and the tokenizer and the token store take.
The file helpers below open only regular files (never a FIFO or a device), decode UTF-8 text
and walk a folder in a machine-independent order; :mod:`multitoken.data.sources` reads
corpora with them.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from multitoken.errors import DataError

__all__ = [
    "Document",
    "NotRegularFileError",
    "decode_text",
    "documents_fingerprint",
    "documents_summary",
    "file_kind",
    "is_unicode",
    "one_line",
    "open_regular",
    "read_regular",
    "walk_files",
]


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes:
        name: A stable identifier (a relative path, or ``file.jsonl:lineno``). The
            train/validation split and the tokenizer cache key are derived from it.
        text: The document's text.
    """

    name: str
    text: str


def documents_fingerprint(docs: Iterable[Document]) -> hashlib.blake2b:
    """A hash of every document's name, size and content (the cache key of in-memory docs).

    Hashing the content (not only names and sizes) costs ~50 ms for 30 MB and means
    an edited document can never be served from a stale cache.
    """
    hasher = hashlib.blake2b(digest_size=16)
    for doc in docs:
        data = doc.text.encode("utf-8", errors="surrogatepass")
        name = doc.name.encode("utf-8", errors="surrogatepass")
        hasher.update(f"{len(name)}:{len(data)}:".encode())
        hasher.update(name)
        hasher.update(data)
    return hasher


def documents_summary(docs: Iterable[Document]) -> str:
    """``"40 documents (1.2 M characters)"``."""
    count = chars = 0
    for doc in docs:
        count, chars = count + 1, chars + len(doc.text)
    return f"{count:,} documents ({chars / 1e6:.1f} M characters)"


class NotRegularFileError(OSError):
    """A path that is a FIFO, a device, a socket or a folder where a file was expected."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is ("a FIFO", "a device", ...)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def open_regular(path: Path) -> io.BufferedReader:
    """``path`` opened for binary reading, only if it is (a link to) a regular file.

    A FIFO would block ``open`` until a writer appears and ``/dev/zero`` never ends, so the
    file is opened non-blocking and its type checked on the open descriptor (which also
    closes the window between a ``stat`` and the ``open``).

    Raises:
        NotRegularFileError: If it is a FIFO, a device, a socket or a folder.
        OSError: If it cannot be opened (permissions, a broken link, ...).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = file_kind(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if kind is not None:
        os.close(fd)
        raise NotRegularFileError(kind)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a small file a user hands in (a tokenizer, a dataset's ``state.json``).

    Raises:
        DataError: Naming the file and ``what`` it is, when it is not (a link to) a regular
            file, cannot be read or is over ``limit`` bytes (checked before reading it).
    """
    try:
        with open_regular(path) as file:
            size = os.fstat(file.fileno()).st_size
            data = file.read(limit + 1) if size <= limit else b""
    except NotRegularFileError as err:
        raise DataError(f"{what} '{path}' is {err.kind}, not a regular file") from None
    except OSError as err:
        raise DataError(f"{what} '{path}' cannot be read ({err.strerror or err})") from None
    if size > limit or len(data) > limit:
        raise DataError(f"{what} '{path}' is over {limit / 1e6:,.0f} MB: not a {what}")
    return data


def decode_text(data: bytes) -> str | None:
    """The bytes as text, or None when they are not UTF-8 text (binary, other encodings)."""
    # A NUL byte is valid UTF-8 but almost never appears in text; it marks a binary file.
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def is_unicode(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (JSON's ``"\\ud800"``), which is no Unicode
    character: UTF-8 cannot encode it, so no tokenizer can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def one_line(error: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` of an exception raised by a library, on one line and at most
    ``limit`` characters (some span lines: the promise is one ``error:`` line)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def walk_files(root: Path, skip_dirs: frozenset[str]) -> list[tuple[str, Path]]:
    """All files under ``root`` as (relative posix path, path), sorted by relative path.

    Sorting the relative path strings (not walk order, which depends on the filesystem)
    makes the corpus, and so the tokenizer and every batch, identical across machines.
    Hidden files and folders (``.git``, ``.cache``) hold tooling state and are skipped.
    """
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found
