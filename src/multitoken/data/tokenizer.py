"""A byte-level BPE tokenizer trained on the corpus, and the corpus as one token array.

Both are cached on disk (default ``.cache/multitoken/`` in the current directory), keyed
by a hash of what they were built from, so only the first run pays the seconds that
training and encoding take; later runs load them in milliseconds.

Special tokens: ``<|pad|>`` is id 0, ``<|endoftext|>`` (end of document) is id 1. Text
is always encoded as text: a literal ``"<|endoftext|>"`` inside a document becomes
ordinary byte-level tokens, never the control id, so data cannot forge a document end.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from multitoken.data.corpus import DataError, Document

__all__ = [
    "DEFAULT_CACHE_DIR",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TokenizedCorpus",
    "Tokenizer",
    "tokenize_corpus",
    "train_tokenizer",
]

DEFAULT_CACHE_DIR = Path(".cache") / "multitoken"
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
# Bump when the training recipe or the cache layout changes, to orphan stale entries.
_CACHE_FORMAT = 1
# 256 byte symbols plus the two special tokens: the smallest vocabulary that can
# encode every string.
_MIN_VOCAB_SIZE = 258
# Documents are encoded in chunks of about this many characters: the backend's
# Encoding objects cost ~100 bytes per token, too much to hold for a whole corpus.
_ENCODE_CHUNK_CHARS = 8_000_000


def _log(message: str, verbose: bool) -> None:
    if verbose:
        print(f"multitoken: {message}", file=sys.stderr, flush=True)


class Tokenizer:
    """A thin wrapper over a ``tokenizers.Tokenizer`` with fixed special tokens.

    Attributes:
        backend: The wrapped ``tokenizers.Tokenizer``.
        from_cache: True when :func:`train_tokenizer` loaded this tokenizer from its
            cache instead of training it.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, from_cache: bool = False) -> None:
        pad_id = backend.token_to_id(PAD_TOKEN)
        eos_id = backend.token_to_id(EOS_TOKEN)
        if pad_id != 0 or eos_id != 1:
            raise DataError(
                f"tokenizer has {PAD_TOKEN} id {pad_id} and {EOS_TOKEN} id {eos_id}, "
                "expected 0 and 1: train it with multitoken's train_tokenizer"
            )
        # Not stored in the JSON, so set on every construction (see the module docstring).
        backend.encode_special_tokens = True
        self.backend = backend
        self.from_cache = from_cache

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (size the embedding with it)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust backend."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; ``decode(encode(text)) == text`` for every string.

        Special tokens are shown as ``<|pad|>`` / ``<|endoftext|>`` unless skipped.
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as ``tokenizers`` JSON (atomically, so readers never see
        half a file)."""
        _atomic_write_text(Path(path), self.backend.to_str())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`.

        Raises:
            DataError: If the file does not exist or is not a multitoken tokenizer.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"tokenizer file '{path}' does not exist: train one with train_tokenizer "
                "or pass the path of a saved tokenizer JSON"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the backend raises a bare Exception on bad JSON
            raise DataError(
                f"'{path}' is not a tokenizers JSON file ({err}): delete it and retrain"
            ) from None
        return cls(backend)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, pad_id=0, eos_id=1)"


def _atomic_write_text(path: Path, text: str) -> None:
    # Several ranks may build the same cache entry at once; each writes its own temp
    # file and renames it into place, and a rename never exposes a partial file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _corpus_fingerprint(docs: Sequence[Document]) -> hashlib.blake2b:
    """A hash of every document's name, size and content.

    Hashing the content (not only names and sizes) costs ~50 ms for 30 MB and means
    an edited file can never be served from a stale cache.
    """
    hasher = hashlib.blake2b(digest_size=16)
    for doc in docs:
        data = doc.text.encode("utf-8", errors="surrogatepass")
        name = doc.name.encode("utf-8", errors="surrogatepass")
        hasher.update(f"{len(name)}:{len(data)}:".encode())
        hasher.update(name)
        hasher.update(data)
    return hasher


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR


def _corpus_summary(docs: Sequence[Document]) -> str:
    megabytes = sum(len(doc.text) for doc in docs) / 1e6
    return f"{len(docs):,} documents ({megabytes:.1f} M characters)"


def train_tokenizer(
    docs: Sequence[Document],
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    verbose: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``docs``, or load it from the cache.

    Byte-level means every string is encodable (no unknown token) and decoding gives
    back the exact text. The cache entry is keyed by the corpus (names, sizes and
    content), ``vocab_size`` and the ``tokenizers`` version.

    Args:
        docs: The training corpus (usually the train split).
        vocab_size: Requested vocabulary size, special tokens included, at least 258.
            A tiny corpus may stop short of it: use ``Tokenizer.vocab_size``.
        cache_dir: Folder for the cache; default ``.cache/multitoken`` in the current
            directory.
        verbose: Print one progress line to stderr when training.

    Returns:
        The tokenizer; its ``from_cache`` flag says whether it was loaded.

    Raises:
        DataError: On an empty corpus or a vocabulary below 258.
    """
    if not docs:
        raise DataError(
            "cannot train a tokenizer on an empty corpus: pass --data a folder of text "
            "files or a .jsonl file with a 'text' field"
        )
    if vocab_size < _MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{_MIN_VOCAB_SIZE} (256 bytes + 2 special tokens)"
        )
    hasher = _corpus_fingerprint(docs)
    hasher.update(f"|vocab={vocab_size}|v{_CACHE_FORMAT}|{tokenizers.__version__}".encode())
    path = _resolve_cache_dir(cache_dir) / f"tokenizer-{vocab_size}-{hasher.hexdigest()}.json"
    if path.is_file():
        try:
            tokenizer = Tokenizer.load(path)
        except DataError:
            pass  # a corrupt entry: retrain and overwrite it
        else:
            tokenizer.from_cache = True
            return tokenizer

    _log(
        f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {_corpus_summary(docs)}",
        verbose,
    )
    backend = tokenizers.Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],  # ids 0 and 1, in this order
        # All 256 bytes, even those the corpus lacks, so any string stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((doc.text for doc in docs), trainer, length=len(docs))
    tokenizer = Tokenizer(backend)
    tokenizer.save(path)
    return tokenizer


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
