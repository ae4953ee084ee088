"""The data pipeline: source -> tokenizer -> token store -> packed rows -> batches.

One pipeline, for any corpus size: documents stream from a source, are tokenised once into a
memory-mapped token store (cached on disk), and are packed into rows. Plain tensors out,
nothing distributed in: every rank runs the same deterministic packing plan and materialises
only its own data-parallel rows (``dp_rank``, ``dp_size``).

Example::

    from multitoken.data import PackedLoader, build_store, open_source, train_tokenizer

    source = open_source("corpus/", format="auto", text_field="text")
    tokenizer = train_tokenizer(source, vocab_size=4096, cache_key=source.fingerprint())
    store = build_store(source, tokenizer, ".cache/multitoken", workers=4)
    loader = PackedLoader(
        store.split("train"), seq_len=512, batch_size=8, window=8192,
        dp_rank=dp_rank, dp_size=dp_size,
    )
    batch = next(loader)  # this rank's 8 / dp_size rows: input_ids, labels, cu_seqlens

A list of documents in memory goes through the same store: ``tokenize_corpus(tokenizer,
docs)`` builds a small one in the cache folder and returns its split.
"""

from multitoken.data.build import build_store, store_key
from multitoken.data.documents import Document
from multitoken.data.loader import Corpus, PackedLoader, dp_slice
from multitoken.data.packing import PackingPlan, Segment, build_batch, pack_documents
from multitoken.data.sources import FORMATS, SkipReport, Source, open_source, stdlib_source
from multitoken.data.split import SplitRule, split_documents
from multitoken.data.store import StoreError, StoreSplit, TokenStore, open_store
from multitoken.data.tokenized import DocumentSource, tokenize_corpus
from multitoken.data.tokenizer import (
    DEFAULT_CACHE_DIR,
    EOS_TOKEN,
    PAD_TOKEN,
    Tokenizer,
    train_tokenizer,
)
from multitoken.errors import DataError

__all__ = [
    "DEFAULT_CACHE_DIR",
    "EOS_TOKEN",
    "FORMATS",
    "PAD_TOKEN",
    "Corpus",
    "DataError",
    "Document",
    "DocumentSource",
    "PackedLoader",
    "PackingPlan",
    "Segment",
    "SkipReport",
    "Source",
    "SplitRule",
    "StoreError",
    "StoreSplit",
    "TokenStore",
    "Tokenizer",
    "build_batch",
    "build_store",
    "dp_slice",
    "open_source",
    "open_store",
    "pack_documents",
    "split_documents",
    "stdlib_source",
    "store_key",
    "tokenize_corpus",
    "train_tokenizer",
]
