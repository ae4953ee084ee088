"""Text corpora: where the documents come from, and a stable train/validation split.

A corpus is a plain ``list[Document]``. Three sources:

- :func:`stdlib_corpus`: the running interpreter's standard-library ``.py`` files, a
  ~30 MB code corpus that every machine has, so examples and tests need no download.
- :func:`load_corpus`: a folder of text files, or a ``.jsonl`` file with a ``text`` field.
- anything else the caller builds: ``[Document(name, text), ...]``.

Every problem with the input raises :class:`DataError` with a message that says what is
wrong and what to pass instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from multitoken.errors import DataError

__all__ = [
    "DataError",
    "Document",
    "load_corpus",
    "split_corpus",
    "stdlib_corpus",
]

_DATA_HINT = "pass --data a folder of text files or a .jsonl file with a 'text' field"


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


class NotRegularFileError(OSError):
    """A path that is a FIFO, a device, a socket or a folder where a file was expected."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _file_kind(mode: int) -> str | None:
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


def _open_regular(path: Path) -> io.BufferedReader:
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
        kind = _file_kind(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if kind is not None:
        os.close(fd)
        raise NotRegularFileError(kind)
    return os.fdopen(fd, "rb")


def _decode_text(data: bytes) -> str | None:
    """The bytes as text, or None when they are not UTF-8 text (binary, other encodings)."""
    # A NUL byte is valid UTF-8 but almost never appears in text; it marks a binary file.
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not a readable regular file of UTF-8 text."""
    try:
        with _open_regular(path) as file:
            data = file.read()
    except OSError:
        return None
    return _decode_text(data)


def _walk_files(root: Path, skip_dirs: frozenset[str]) -> list[tuple[str, Path]]:
    """All files under ``root`` as (relative posix path, path), sorted by relative path.

    Sorting the relative path strings (not walk order, which depends on the filesystem)
    makes the corpus, and so the tokenizer and every batch, identical across machines.
    """
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders (.git, .cache, ...) hold tooling state, not training text.
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def stdlib_corpus(max_files: int | None = None) -> list[Document]:
    """The running interpreter's standard-library Python sources, one document per file.

    ``site-packages`` and ``__pycache__`` are skipped, as are empty files and files that
    are not valid UTF-8 (a few test fixtures in ``test/`` use other encodings on purpose).

    Args:
        max_files: Keep only the first ``max_files`` documents (in sorted order), for
            fast tests and smoke runs. None keeps all (about 1,800 files, ~30 MB on 3.11).

    Returns:
        Documents sorted by path relative to the stdlib folder, named by that path.

    Raises:
        DataError: If the standard library sources cannot be found (some minimal
            installs ship only ``.pyc`` files).
    """
    if max_files is not None and max_files < 1:
        raise DataError(f"max_files must be >= 1 or None, got {max_files}")
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    for rel_path, path in _walk_files(root, frozenset({"site-packages", "__pycache__"})):
        if not rel_path.endswith(".py"):
            continue
        text = _read_text(path)
        if not text:
            continue
        docs.append(Document(rel_path, text))
        if max_files is not None and len(docs) >= max_files:
            break
    if not docs:
        raise DataError(
            f"no standard-library .py sources found under '{root}': this Python ships "
            f"without them; {_DATA_HINT}"
        )
    return docs


def _load_jsonl(path: Path) -> list[Document]:
    docs: list[Document] = []
    with path.open("r", encoding="utf-8", errors="strict") as lines:
        try:
            for lineno, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{where} is not valid JSON ({err.msg}): write one JSON object "
                        'per line, e.g. {"text": "..."}'
                    ) from None
                if not isinstance(record, dict) or "text" not in record:
                    raise DataError(
                        f"{where} has no 'text' field: every line of a .jsonl corpus must "
                        'be an object with the document in \'text\', e.g. {"text": "..."}'
                    )
                text = record["text"]
                if not isinstance(text, str):
                    raise DataError(
                        f"{where}: 'text' is a {type(text).__name__}, not a string: store "
                        "each document's text as a JSON string"
                    )
                if text:
                    docs.append(Document(where, text))
        except UnicodeDecodeError:
            raise DataError(
                f"'{path}' is not UTF-8 text: re-encode it as UTF-8 ({_DATA_HINT})"
            ) from None
    return docs


def load_corpus(path: str | os.PathLike[str]) -> list[Document]:
    """Load a corpus from a folder of text files or a ``.jsonl`` file.

    A folder is read recursively; every file that decodes as UTF-8 is one document,
    named by its path relative to the folder, in sorted order. Binary and non-UTF-8
    files, empty files and hidden files or folders (``.git``) are skipped. In a
    ``.jsonl`` file every non-blank line is an object whose ``text`` field is one
    document, named ``path:lineno``; empty texts are skipped.

    Args:
        path: The folder or the ``.jsonl`` file.

    Returns:
        The documents, in a deterministic order.

    Raises:
        DataError: If the path does not exist, is some other kind of file, holds no
            text, or a JSONL line is not an object with a string ``text`` field.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"data path '{root}' does not exist: {_DATA_HINT}")
    if root.is_dir():
        docs = []
        for rel_path, file_path in _walk_files(root, frozenset({"__pycache__"})):
            text = _read_text(file_path)
            if text:
                docs.append(Document(rel_path, text))
        if not docs:
            raise DataError(
                f"data folder '{root}' contains no non-empty UTF-8 text files: {_DATA_HINT}"
            )
        return docs
    if root.suffix != ".jsonl":
        raise DataError(
            f"data path '{root}' is a file but not a .jsonl file: {_DATA_HINT} "
            "(to train on a single text file, put it in a folder)"
        )
    docs = _load_jsonl(root)
    if not docs:
        raise DataError(f"'{root}' contains no documents (no non-empty 'text'): {_DATA_HINT}")
    return docs


def _unit_hash(name: str, seed: int) -> float:
    """A uniform number in [0, 1) from the name: the same in every process and run.

    Python's ``hash`` of a str is salted per process (PYTHONHASHSEED), so every rank
    and every restart would disagree on the split; a cryptographic hash does not.
    """
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_corpus(
    docs: Sequence[Document], val_fraction: float = 0.02, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split documents into train and validation sets by a stable hash of their names.

    A document's side depends only on its name and ``seed``, never on the other
    documents, so adding files to a corpus does not move existing ones between sets.
    With two or more documents and ``val_fraction > 0`` both sets are non-empty: when
    the hash sends none to validation, the document with the smallest hash goes there
    (and symmetrically for train when ``val_fraction`` is large). ``val_fraction=0``
    means no validation set.

    Args:
        docs: The corpus.
        val_fraction: Expected fraction of documents in the validation set, in [0, 1).
        seed: Changes which documents land in validation.

    Returns:
        ``(train, val)``, each in the corpus order.

    Raises:
        DataError: If the corpus is empty or ``val_fraction`` is outside [0, 1).
    """
    if not docs:
        raise DataError(f"cannot split an empty corpus: {_DATA_HINT}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    scores = [_unit_hash(doc.name, seed) for doc in docs]
    in_val = [score < val_fraction for score in scores]
    if len(docs) >= 2 and val_fraction > 0.0:
        order = sorted(range(len(docs)), key=lambda i: (scores[i], i))
        if not any(in_val):
            in_val[order[0]] = True
        if all(in_val):
            in_val[order[-1]] = False
    train = [doc for doc, v in zip(docs, in_val) if not v]
    val = [doc for doc, v in zip(docs, in_val) if v]
    return train, val
