"""The tokenizer: a byte-level BPE trained on the corpus, or an existing one loaded.

A trained tokenizer is cached on disk (default ``.cache/multitoken/`` in the current
directory), keyed by what it was trained on, so only the first run pays for training.

Special tokens of a trained tokenizer: ``<|pad|>`` is id 0, ``<|endoftext|>`` (end of
document) is id 1; an existing tokenizer keeps its own (see :class:`Tokenizer`). Text
is always encoded as text: a literal ``"<|endoftext|>"`` inside a document becomes
ordinary byte-level tokens, never the control id, so data cannot forge a document end.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from multitoken.data.documents import (
    Document,
    documents_fingerprint,
    documents_summary,
    one_line,
    read_regular,
)
from multitoken.errors import DataError

__all__ = [
    "documents_with_eos",
    "DEFAULT_CACHE_DIR",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "Tokenizer",
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
# End and pad tokens of common tokenizers, tried in order when no config names them.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
_HF_CONFIG = "tokenizer_config.json"
# Largest tokenizer files read (read whole; real ones are under 50 MB).
_MAX_TOKENIZER_BYTES = 1 << 30
_MAX_CONFIG_BYTES = 16 << 20
# Longest text handed to the BPE trainer at once. Its pre-tokenisation costs ~90 bytes per
# character of one text (a 50 MB single-line document took 8.7 GB); 64 K characters cost ~6 MB.
_TRAIN_PIECE_CHARS = 1 << 16


def _log(message: str, verbose: bool) -> None:
    if verbose:
        print(f"multitoken: {message}", file=sys.stderr, flush=True)


class Tokenizer:
    """A thin wrapper over a ``tokenizers.Tokenizer`` that knows its end and pad tokens.

    A tokenizer trained by :func:`train_tokenizer` has ``<|pad|>`` = 0 and
    ``<|endoftext|>`` = 1. An existing one (:meth:`load` of a ``tokenizer.json`` or a
    Hugging Face model folder) keeps its ids: the end-of-document token comes from
    ``tokenizer_config.json`` when there is one, else from the usual names (``</s>``,
    ``<|end_of_text|>``, ...); a tokenizer without a pad token pads with its end token
    (padding never has a label, so the id only fills the row).

    Attributes:
        backend: The wrapped ``tokenizers.Tokenizer``.
        eos_token: The end-of-document token.
        pad_token: The padding token.
        from_cache: True when :func:`train_tokenizer` loaded this tokenizer from its
            cache instead of training it.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        from_cache: bool = False,
        eos_token: str | None = EOS_TOKEN,
        pad_token: str | None = PAD_TOKEN,
    ) -> None:
        eos_token = eos_token or _first_present(backend, _EOS_CANDIDATES)
        pad_token = pad_token or _first_present(backend, _PAD_CANDIDATES) or eos_token
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        pad_id = backend.token_to_id(pad_token) if pad_token else None
        if eos_id is None or pad_id is None:
            specials = [t.content for t in backend.get_added_tokens_decoder().values()]
            raise DataError(
                f"tokenizer has no end-of-document token {eos_token!r} or pad token "
                f"{pad_token!r} (its special tokens: {specials[:20]}): name them in a "
                "tokenizer_config.json beside tokenizer.json ('eos_token', 'pad_token')"
            )
        # Not stored in the JSON, so set on every construction (see the module docstring).
        backend.encode_special_tokens = True
        self.backend = backend
        self.eos_token, self.pad_token = eos_token, pad_token
        self._eos_id, self._pad_id = eos_id, pad_id
        self.from_cache = from_cache

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (size the embedding with it)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def is_default(self) -> bool:
        """True for multitoken's own special tokens (pad 0, end 1)."""
        return (self.pad_token, self.eos_token, self.pad_id, self.eos_id) == (
            PAD_TOKEN,
            EOS_TOKEN,
            0,
            1,
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust backend."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def encode_documents(
        self, texts: Sequence[str], dtype: np.dtype
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every text's ids followed by the end-of-document id, flat, and each document's length.

        Returns:
            ``(tokens, lengths)``: ``tokens`` of ``dtype``, shape ``(sum(lengths),)``;
            ``lengths`` int64, shape ``(len(texts),)``, end token included.
        """
        return documents_with_eos(self.encode_batch(texts), self.eos_id, dtype)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; ``decode(encode(text)) == text`` for a byte-level BPE.

        Special tokens are shown (e.g. ``<|pad|>`` / ``<|endoftext|>``) unless skipped.
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as ``tokenizers`` JSON (atomically, so readers never see
        half a file); an existing tokenizer's special tokens go to ``tokenizer_config.json``
        beside it, where :meth:`load` finds them."""
        path = Path(path)
        _atomic_write_text(path, self.backend.to_str())
        if not self.is_default:
            config = {"eos_token": self.eos_token, "pad_token": self.pad_token}
            _atomic_write_text(path.parent / _HF_CONFIG, json.dumps(config, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read a ``tokenizer.json`` (written by :meth:`save` or by Hugging Face), or a model
        folder holding one; special tokens from ``tokenizer_config.json`` when present.

        Raises:
            DataError: If there is no such file, it is not a tokenizers JSON file, or the
                end-of-document token cannot be found.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not os.path.lexists(path):
            raise DataError(
                f"tokenizer file '{path}' does not exist: train one with train_tokenizer "
                "or pass a tokenizer.json or a Hugging Face model folder that holds one"
            )
        text = read_regular(path, _MAX_TOKENIZER_BYTES, "tokenizer file")
        try:
            backend = tokenizers.Tokenizer.from_str(text.decode("utf-8"))
        except Exception as err:  # the backend raises a bare Exception on bad JSON
            raise DataError(
                f"'{path}' is not a tokenizers JSON file ({one_line(err)}): delete it and retrain"
            ) from None
        config = _read_hf_config(path.parent / _HF_CONFIG)
        return cls(backend, eos_token=config.get("eos_token"), pad_token=config.get("pad_token"))

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id})"
        )


def _first_present(backend: tokenizers.Tokenizer, names: Sequence[str]) -> str | None:
    return next((name for name in names if backend.token_to_id(name) is not None), None)


def _read_hf_config(path: Path) -> dict[str, str]:
    """``eos_token`` / ``pad_token`` of a Hugging Face ``tokenizer_config.json`` (or {})."""
    if not os.path.lexists(path):
        return {}
    try:
        config = json.loads(read_regular(path, _MAX_CONFIG_BYTES, "tokenizer config"))
    except DataError as err:
        raise DataError(f"{err}: fix or delete it") from None
    except (ValueError, RecursionError) as err:
        raise DataError(f"'{path}' is not valid JSON ({one_line(err)}): fix or delete it") from None
    if not isinstance(config, dict):
        raise DataError(f"'{path}' is not a JSON object: fix or delete it")
    found = {}
    for key in ("eos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str) and value:
            found[key] = value
    return found


def _atomic_write_text(path: Path, text: str) -> None:
    # Several ranks may build the same cache entry at once; each writes its own temp
    # file and renames it into place, and a rename never exposes a partial file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR


def train_tokenizer(
    docs: Sequence[Document] | Iterable[Document],
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    verbose: bool = True,
    cache_key: str | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``docs``, or load it from the cache.

    Byte-level means every string is encodable (no unknown token) and decoding gives
    back the exact text. The cache entry is keyed by the corpus (names, sizes and
    content), ``vocab_size`` and the ``tokenizers`` version.

    Args:
        docs: The training corpus (usually the train split): a sequence, or with
            ``cache_key`` any iterable (streamed, read once, never held in memory).
        vocab_size: Requested vocabulary size, special tokens included, at least 258.
            A tiny corpus may stop short of it: use ``Tokenizer.vocab_size``.
        cache_dir: Folder for the cache; default ``.cache/multitoken`` in the current
            directory.
        verbose: Print one progress line to stderr when training.
        cache_key: Identifies ``docs`` in the cache instead of hashing their content
            (a streamed source's fingerprint).

    Returns:
        The tokenizer; its ``from_cache`` flag says whether it was loaded.

    Raises:
        DataError: On an empty corpus or a vocabulary below 258.
    """
    if cache_key is None and not docs:
        raise DataError(
            "cannot train a tokenizer on an empty corpus: pass --data a folder of text "
            "files or a .jsonl file with a 'text' field"
        )
    if vocab_size < _MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{_MIN_VOCAB_SIZE} (256 bytes + 2 special tokens)"
        )
    if cache_key is None:
        hasher = documents_fingerprint(docs)
    else:
        hasher = hashlib.blake2b(cache_key.encode(), digest_size=16)
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

    summary = documents_summary(docs) if cache_key is None else "a streamed sample"
    _log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on {summary}", verbose)
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
    length = len(docs) if isinstance(docs, Sequence) else None
    seen = 0

    def texts() -> Iterator[str]:
        nonlocal seen
        for doc in docs:
            seen += 1
            yield from _training_pieces(doc.text)

    backend.train_from_iterator(texts(), trainer, length=length)
    if not seen:
        raise DataError(
            "cannot train a tokenizer on an empty corpus: pass --data a folder of text "
            "files or a .jsonl file with a 'text' field"
        )
    tokenizer = Tokenizer(backend)
    tokenizer.save(path)
    return tokenizer


def _training_pieces(text: str, size: int = _TRAIN_PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters, cut before a space or newline that
    follows a non-space: the byte-level pre-tokenizer splits there anyway, so the trained BPE
    is the one the whole text gives (only a run of ``size`` characters without such a cut is
    cut inside a word).
    """
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = max(text.rfind(" ", start + 1, end + 1), text.rfind("\n", start + 1, end + 1))
        for _ in range(64):  # bounded: a piece of blanks only is cut anywhere
            if cut <= start or not text[cut - 1].isspace():
                break
            cut = max(text.rfind(" ", start + 1, cut), text.rfind("\n", start + 1, cut))
        if cut > start and not text[cut - 1].isspace():
            end = cut
        yield text[start:end]
        start = end
    yield text[start:]


def documents_with_eos(
    ids: Sequence[Sequence[int]], eos_id: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Documents' ids each followed by ``eos_id``, flat, and each document's length."""
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
    eos = [eos_id]
    flat = itertools.chain.from_iterable(part for doc in ids for part in (doc, eos))
    tokens = np.fromiter(flat, dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths
