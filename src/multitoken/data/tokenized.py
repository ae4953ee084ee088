"""A list of documents in memory, tokenized through the token store like any corpus.

:func:`tokenize_corpus` is the short path for tests, notebooks and the bench scripts: it wraps
the documents in a :class:`DocumentSource` and builds (or reuses) a small token store for them
in the cache folder, so there is one tokenisation pipeline (:func:`~multitoken.data.build.
build_store`) whatever the corpus size.

Example::

    docs = [Document("a", "print(1)"), Document("b", "x = 2")]
    corpus = tokenize_corpus(tokenizer, docs, ".cache/multitoken")
    corpus[1]            # ids of "x = 2", then the end-of-document id
    PackedLoader(corpus, seq_len=512, batch_size=8, pad_id=tokenizer.pad_id)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from multitoken.data.build import build_store
from multitoken.data.documents import Document, documents_fingerprint, documents_summary
from multitoken.data.skips import SkipReport
from multitoken.data.store import StoreSplit
from multitoken.data.tokenizer import DEFAULT_CACHE_DIR, Tokenizer
from multitoken.errors import DataError

__all__ = ["DocumentSource", "tokenize_corpus"]


class DocumentSource:
    """Documents held in memory, as a source for :func:`~multitoken.data.build.build_store`.

    Every document is yielded, in order (an empty text too: it becomes the end-of-document
    id alone), so document ``i`` of the store's split is ``docs[i]``. The fingerprint hashes
    every name and text, so an edited document builds a new store.

    Attributes:
        docs: The documents.
        skipped: Always empty (nothing is skipped).
        bytes_read: UTF-8 bytes yielded so far in the current pass.
    """

    format = "documents"

    def __init__(self, docs: Sequence[Document]) -> None:
        self.docs = list(docs)
        self.skipped = SkipReport()
        self.bytes_read = 0

    def __iter__(self) -> Iterator[Document]:
        self.bytes_read = 0
        for doc in self.docs:
            self.bytes_read += len(doc.text.encode("utf-8", errors="surrogatepass"))
            yield doc

    @property
    def total_bytes(self) -> int:
        return sum(len(doc.text.encode("utf-8", errors="surrogatepass")) for doc in self.docs)

    def fingerprint(self) -> str:
        return "documents-" + documents_fingerprint(self.docs).hexdigest()

    def describe(self) -> str:
        return f"list of {documents_summary(self.docs)}"


def tokenize_corpus(
    tokenizer: Tokenizer,
    docs: Sequence[Document],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    verbose: bool = True,
) -> StoreSplit:
    """Encode every document and append the end-of-document token, through the token store.

    The store is keyed by the documents (names and content) and the tokenizer, so a second
    call with the same documents opens it from the cache, and a different tokenizer or an
    edited document builds a new one.

    Args:
        tokenizer: The tokenizer.
        docs: The documents, in the order the result indexes them.
        cache_dir: Folder of the store; default ``.cache/multitoken`` in the current
            directory.
        verbose: Progress on stderr when encoding.

    Returns:
        The store's ``train`` split, which holds every document: document ``i`` is
        ``docs[i]`` followed by ``eos_id``.

    Raises:
        DataError: If ``docs`` is empty.
    """
    if not docs:
        raise DataError("cannot tokenize an empty list of documents: pass at least one")
    folder = cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR
    source = DocumentSource(docs)
    store = build_store(source, tokenizer, folder, val_fraction=0.0, verbose=verbose)
    return store.split("train")
