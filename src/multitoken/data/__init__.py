"""The data pipeline: source -> tokenizer -> token store -> packed rows -> batches.

Plain tensors out, nothing distributed in: every rank runs the same deterministic
pipeline and takes its rows with :func:`dp_slice`.

Example (any corpus size: streamed, memory-mapped)::

    from multitoken.data import PackedLoader, build_store, dp_slice, open_source, train_tokenizer

    source = open_source("corpus/", format="auto", text_field="text")
    tokenizer = train_tokenizer(source, vocab_size=4096, cache_key=source.fingerprint())
    store = build_store(source, tokenizer, ".cache/multitoken", workers=4)
    loader = PackedLoader(store.split("train"), seq_len=512, batch_size=8, window=8192)
    batch = dp_slice(next(loader), dp_rank, dp_size)  # input_ids, labels, cu_seqlens

Small corpora can stay in memory: ``tokenize_corpus(tokenizer, docs)`` gives a
:class:`TokenizedCorpus` the loader takes just the same.
"""

from multitoken.data.build import build_store, store_key
from multitoken.data.corpus import DataError, Document, load_corpus, split_corpus, stdlib_corpus
from multitoken.data.loader import Corpus, PackedLoader, dp_slice
from multitoken.data.packing import PackingPlan, Segment, build_batch, pack_documents
from multitoken.data.sources import FORMATS, SkipReport, Source, open_source, stdlib_source
from multitoken.data.store import StoreError, StoreSplit, TokenStore, open_store
from multitoken.data.tokenized import TokenizedCorpus, tokenize_corpus
from multitoken.data.tokenizer import (
    DEFAULT_CACHE_DIR,
    EOS_TOKEN,
    PAD_TOKEN,
    Tokenizer,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "EOS_TOKEN",
    "FORMATS",
    "PAD_TOKEN",
    "Corpus",
    "DataError",
    "Document",
    "PackedLoader",
    "PackingPlan",
    "Segment",
    "SkipReport",
    "Source",
    "StoreError",
    "StoreSplit",
    "TokenStore",
    "TokenizedCorpus",
    "Tokenizer",
    "build_batch",
    "build_store",
    "dp_slice",
    "load_corpus",
    "open_source",
    "open_store",
    "pack_documents",
    "split_corpus",
    "stdlib_corpus",
    "stdlib_source",
    "store_key",
    "tokenize_corpus",
    "train_tokenizer",
]
