"""The token store on disk: memory-mapped shard files, an offsets index, and their checks.

A store is a folder ``store-<key>/`` written once by
:func:`~multitoken.data.build.build_store` and then only read::

    index.json             format, dtype, and per split: documents, tokens, files
    train-00000.bin ...    token ids of consecutive documents, raw uint16 (or uint32), each
                           document followed by the end-of-document id
    train.offsets.npy      int64 (num_docs + 1,): document i is tokens [offsets[i], offsets[i+1])
                           of the split's concatenated shard files
    val-00000.bin ...      the same for the validation split

``index.json`` records every file's size and checksum, so a truncated or corrupted file is
detected on open (:class:`StoreError`) and the store rebuilt. The folder only ever appears
complete: the builder renames it into place after its last file is written.

Training reads through ``numpy.memmap``: a rank's resident memory holds the pages of the
documents it touches, never the corpus, and the pages are the OS page cache's to evict.

Example::

    store = open_store(".cache/multitoken/store-3f2a...")
    train = store.split("train")        # a corpus: len(train), train[i], train.num_tokens
    PackedLoader(train, seq_len=512, batch_size=8, pad_id=0)
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np

from multitoken.errors import DataError

__all__ = [
    "STORE_FORMAT",
    "SPLITS",
    "StoreError",
    "StoreSplit",
    "TokenStore",
    "file_checksum",
    "open_store",
    "token_dtype",
]

# Bump when the layout changes, to orphan stale stores.
STORE_FORMAT = 1
SPLITS = ("train", "val")
_READ_BLOCK = 1 << 24
# Documents read between two unmappings of a split's pages (see StoreSplit.release).
_RELEASE_EVERY = 64


class StoreError(DataError):
    """A store on disk is incomplete, truncated or corrupted (rebuild it)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (half the disk and page cache), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def file_checksum(path: Path) -> str:
    """blake2b-128 of the file's bytes, read in 16 MB blocks (bounded memory)."""
    hasher = hashlib.blake2b(digest_size=16)
    with path.open("rb") as file:
        while block := file.read(_READ_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    # Documents are read in shuffled order: reading ahead would only fill the page cache.
    raw = getattr(tokens, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_RANDOM"):
        raw.madvise(mmap.MADV_RANDOM)
    return tokens


def _unmap_pages(tokens: np.ndarray) -> None:
    raw = getattr(tokens, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
        raw.madvise(mmap.MADV_DONTNEED)


class StoreSplit:
    """One split of a store, read through memory maps; indexes like a list of documents.

    Attributes:
        offsets: int64 memmap ``(num_docs + 1,)`` of document starts in the split's tokens.
        dtype: The token dtype (uint16 or uint32).
    """

    def __init__(self, folder: Path, entry: dict, dtype: np.dtype) -> None:
        self.dtype = dtype
        num_docs = int(entry["num_docs"])
        self.offsets = np.load(folder / entry["offsets"]["file"], mmap_mode="r")
        if self.offsets.shape != (num_docs + 1,):
            raise StoreError(f"{folder}: {entry['offsets']['file']} does not hold {num_docs} docs")
        sizes = [int(part["num_tokens"]) for part in entry["parts"]]
        self._parts = [
            _map(folder / part["file"], dtype, size) for part, size in zip(entry["parts"], sizes)
        ]
        self._part_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._num_tokens = int(entry["num_tokens"])
        self._reads = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def release(self) -> None:
        """Unmap the pages read so far (they stay in the page cache; a later read maps
        them again).

        The kernel maps a whole page-cache folio (up to 2 MB of a sequentially written
        file) around every document touched, so a shuffled epoch would map most of the
        store into each rank's RSS; :meth:`__getitem__` calls this every
        ``_RELEASE_EVERY`` documents, which bounds the mapped pages by what that many
        reads touch, whatever the corpus size.
        """
        for part in self._parts:
            _unmap_pages(part)
        self._reads = 0

    def __getitem__(self, index: int) -> np.ndarray:
        self._reads += 1
        if self._reads >= _RELEASE_EVERY:
            self.release()
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        # A document never spans two shard files, so one searchsorted finds it.
        part = int(np.searchsorted(self._part_starts, start, side="right")) - 1
        base = int(self._part_starts[part])
        return self._parts[part][start - base : end - base]

    def doc_lengths(self, indices: np.ndarray) -> np.ndarray:
        """int64 lengths of the documents ``indices``, reading only their offsets."""
        indices = np.asarray(indices, dtype=np.int64)
        return np.asarray(self.offsets[indices + 1] - self.offsets[indices], dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        """int64 lengths of every document (materialises ``num_docs`` int64s)."""
        return np.diff(np.asarray(self.offsets))

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the split in one array (copies: for tests and small stores only)."""
        if not self._parts:
            return np.zeros(0, dtype=self.dtype)
        return np.concatenate([np.asarray(part) for part in self._parts])


class TokenStore:
    """A complete, checked store folder.

    Attributes:
        folder: The store folder.
        index: The parsed ``index.json``.
    """

    def __init__(self, folder: Path, index: dict) -> None:
        self.folder = folder
        self.index = index
        self.dtype = np.dtype(index["dtype"])

    def split(self, name: str) -> StoreSplit:
        """The ``"train"`` or ``"val"`` split, memory-mapped."""
        if name not in SPLITS:
            raise DataError(f"a store has splits {SPLITS}, not {name!r}")
        return StoreSplit(self.folder, self.index["splits"][name], self.dtype)

    @property
    def num_bytes(self) -> int:
        """Bytes of every file of the store, index included."""
        return sum(path.stat().st_size for path in self.folder.iterdir())


def _store_files(index: dict) -> list[dict]:
    files = []
    for name in SPLITS:
        entry = index["splits"][name]
        files.extend(entry["parts"])
        files.append(entry["offsets"])
    return files


def open_store(folder: str | os.PathLike[str], verify: str = "full") -> TokenStore:
    """Open a store folder after checking it against its index.

    Args:
        folder: The store folder (``store-<key>``).
        verify: ``"size"`` checks every file's size (instant); ``"full"`` also re-hashes
            every file (about 1 GB/s) and catches corruption that keeps the size.

    Returns:
        The store.

    Raises:
        StoreError: If the index is missing or unreadable, a file is missing, or a size or
            checksum differs from the index; the message names the file.
    """
    folder = Path(folder)
    if verify not in ("size", "full"):
        raise DataError(f"data.verify={verify!r} must be 'size' or 'full'")
    index_path = folder / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StoreError(f"{index_path} is missing or unreadable ({err})") from None
    if index.get("format") != STORE_FORMAT:
        raise StoreError(f"{index_path} has format {index.get('format')}, not {STORE_FORMAT}")
    for file in _store_files(index):
        path = folder / file["file"]
        size = path.stat().st_size if path.is_file() else None
        if size != file["bytes"]:
            raise StoreError(f"{path} has {size} bytes, the index says {file['bytes']}")
        if verify == "full" and file_checksum(path) != file["checksum"]:
            raise StoreError(f"{path} does not match its checksum in the index")
    return TokenStore(folder, index)
