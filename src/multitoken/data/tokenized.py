"""A small tokenized corpus held in memory: every document's ids in one flat array.

:func:`tokenize_corpus` is the in-memory path for a list of documents (tests, notebooks,
the bench scripts); training on a corpus of any size goes through the memory-mapped token
store instead (:mod:`multitoken.data.store`, :func:`multitoken.data.build.build_store`).
Both give an object that indexes like a list of token arrays, which is all the loader needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from multitoken.data.corpus import DataError, Document
from multitoken.data.tokenizer import (
    _CACHE_FORMAT,
    Tokenizer,
    _corpus_fingerprint,
    _corpus_summary,
    _log,
    _resolve_cache_dir,
)

__all__ = ["TokenizedCorpus", "tokenize_corpus"]

# Documents are encoded in chunks of about this many characters: the backend's
# Encoding objects cost ~100 bytes per token, too much to hold for a whole corpus.
_ENCODE_CHUNK_CHARS = 8_000_000


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


@dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """Every document's token ids, end-of-document token included, in one flat array.

    Document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``; indexing the corpus gives
    that slice (a view, no copy).

    Attributes:
        tokens: int32 array of shape ``(num_tokens,)``.
        offsets: int64 array of shape ``(num_docs + 1,)``, ``offsets[0] == 0``,
            non-decreasing, ``offsets[-1] == num_tokens``.
    """

    tokens: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or self.offsets.ndim != 1 or len(self.offsets) < 1:
            raise DataError("TokenizedCorpus needs 1-D tokens and non-empty 1-D offsets")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens):
            raise DataError(
                f"TokenizedCorpus offsets must start at 0 and end at {len(self.tokens)} "
                f"(the number of tokens), got {self.offsets[0]} and {self.offsets[-1]}"
            )
        if np.any(np.diff(self.offsets) < 0):
            raise DataError("TokenizedCorpus offsets must be non-decreasing")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """int64 array of each document's length in tokens, shape ``(num_docs,)``."""
        return np.diff(self.offsets)

    def doc_lengths(self, indices: np.ndarray) -> np.ndarray:
        """int64 lengths of the documents ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        return (self.offsets[indices + 1] - self.offsets[indices]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def tokenize_corpus(
    tokenizer: Tokenizer,
    docs: Sequence[Document],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    verbose: bool = True,
) -> TokenizedCorpus:
    """Encode every document and append the end-of-document token, with a disk cache.

    The cache key covers the tokenizer (its full JSON) and the corpus (names, sizes and
    content), so a different tokenizer or an edited corpus is re-encoded.

    Args:
        tokenizer: The tokenizer.
        docs: The documents, in the order the result indexes them.
        cache_dir: Folder for the cache; default ``.cache/multitoken`` in the current
            directory.
        verbose: Print one progress line to stderr when encoding.

    Returns:
        The tokenized corpus; document ``i`` is ``docs[i]`` followed by ``eos_id``.
    """
    hasher = _corpus_fingerprint(docs)
    hasher.update(tokenizer.backend.to_str().encode())
    hasher.update(f"|eos={tokenizer.eos_id}|v{_CACHE_FORMAT}".encode())
    key = hasher.hexdigest()
    folder = _resolve_cache_dir(cache_dir)
    tokens_path = folder / f"tokens-{key}.npy"
    offsets_path = folder / f"offsets-{key}.npy"
    if tokens_path.is_file() and offsets_path.is_file():
        try:
            tokens = np.load(tokens_path)
            offsets = np.load(offsets_path)
            corpus = TokenizedCorpus(tokens, offsets)
        except (OSError, ValueError):
            pass  # a corrupt or mismatched entry: rebuild it
        else:
            if len(corpus) == len(docs) and tokens.dtype == np.int32:
                return corpus

    _log(f"tokenizing {_corpus_summary(docs)}", verbose)
    lengths = np.zeros(len(docs), dtype=np.int64)
    pieces: list[np.ndarray] = []
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    start = 0
    while start < len(docs):
        # Chunk by characters to bound the memory of the backend's Encoding objects.
        stop, chars = start, 0
        while stop < len(docs) and (stop == start or chars < _ENCODE_CHUNK_CHARS):
            chars += len(docs[stop].text)
            stop += 1
        for i, ids in enumerate(tokenizer.encode_batch([d.text for d in docs[start:stop]])):
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(eos)
            lengths[start + i] = len(ids) + 1
        start = stop
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Offsets last: a reader that finds both files finds both complete.
    _atomic_save_npy(tokens_path, tokens)
    _atomic_save_npy(offsets_path, offsets)
    return TokenizedCorpus(tokens, offsets)
