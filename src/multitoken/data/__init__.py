"""The data pipeline: corpus -> tokenizer -> token array -> packed rows -> batches.

Plain tensors out, nothing distributed in: every rank runs the same deterministic
pipeline and takes its rows with :func:`dp_slice`.

Example::

    from multitoken.data import (
        PackedLoader, dp_slice, split_corpus, stdlib_corpus, tokenize_corpus, train_tokenizer,
    )

    train_docs, val_docs = split_corpus(stdlib_corpus())
    tokenizer = train_tokenizer(train_docs, vocab_size=4096)
    corpus = tokenize_corpus(tokenizer, train_docs)
    loader = PackedLoader(corpus, seq_len=512, batch_size=8, seed=0, pad_id=tokenizer.pad_id)
    batch = dp_slice(next(loader), dp_rank, dp_size)  # input_ids, labels, cu_seqlens
"""

from multitoken.data.corpus import DataError, Document, load_corpus, split_corpus, stdlib_corpus
from multitoken.data.loader import PackedLoader, dp_slice
from multitoken.data.packing import PackingPlan, Segment, build_batch, pack_documents
from multitoken.data.tokenizer import (
    DEFAULT_CACHE_DIR,
    EOS_TOKEN,
    PAD_TOKEN,
    TokenizedCorpus,
    Tokenizer,
    tokenize_corpus,
    train_tokenizer,
)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "DataError",
    "Document",
    "PackedLoader",
    "PackingPlan",
    "Segment",
    "TokenizedCorpus",
    "Tokenizer",
    "build_batch",
    "dp_slice",
    "load_corpus",
    "pack_documents",
    "split_corpus",
    "stdlib_corpus",
    "tokenize_corpus",
    "train_tokenizer",
]
