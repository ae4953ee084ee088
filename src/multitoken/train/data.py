"""From a training configuration to a tokenizer and the train and validation loaders.

The slow parts (training the BPE, tokenising the corpus) are cached on disk, so the launcher
runs :func:`prepare_data` once before it starts the ranks and every rank then loads the cache
in milliseconds. Under ``torchrun`` (no launcher of ours) rank 0 prepares while the others wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from multitoken.data import (
    DataError,
    PackedLoader,
    Tokenizer,
    load_corpus,
    pack_documents,
    split_corpus,
    stdlib_corpus,
    tokenize_corpus,
    train_tokenizer,
)
from multitoken.train.config import TrainConfig, alignment

__all__ = ["PreparedData", "prepare_data", "check_data_path"]


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train_loader: PackedLoader
    val_loader: PackedLoader


def check_data_path(cfg: TrainConfig) -> None:
    """Fail early, with the fix, on a data path that cannot be read."""
    if cfg.data.path and not Path(cfg.data.path).exists():
        raise DataError(
            f"data path {cfg.data.path!r} does not exist: set data.path (or --data) to a folder "
            "of text files or a .jsonl file with a 'text' field, or leave it empty for the "
            "Python standard library"
        )


def _documents(cfg: TrainConfig):
    check_data_path(cfg)
    docs = load_corpus(cfg.data.path) if cfg.data.path else stdlib_corpus()
    if cfg.data.max_files:
        docs = docs[: cfg.data.max_files]
    if len(docs) < 2:
        raise DataError(
            f"the corpus has {len(docs)} document(s): at least 2 are needed (one held out for "
            "validation); add files to data.path"
        )
    return split_corpus(docs, cfg.data.val_fraction, cfg.train.seed)


def prepare_data(cfg: TrainConfig, verbose: bool = True, group=None) -> PreparedData:
    """Tokenizer and loaders for ``cfg`` (collective over ``group`` when it is given).

    Every rank builds the same loaders: the data parallel split happens per batch
    (:func:`multitoken.data.dp_slice`), the context parallel one in the trainer.
    """
    rank = dist.get_rank(group) if group is not None else 0
    cache = cfg.data.cache_dir
    if group is not None and rank != 0:
        dist.barrier(group=group)  # rank 0 fills the cache first
    train_docs, val_docs = _documents(cfg)
    if cfg.model.hf:  # --- Hugging Face models (issue 9): merge point ---
        from multitoken.hf.train import hf_tokenizer  # optional extra: only when used

        tokenizer = hf_tokenizer(cfg)
    else:
        tokenizer = train_tokenizer(train_docs, cfg.data.vocab_size, cache, verbose=verbose)
    train_tokens = tokenize_corpus(tokenizer, train_docs, cache, verbose=verbose)
    val_tokens = tokenize_corpus(tokenizer, val_docs, cache, verbose=verbose)
    if group is not None and rank == 0:
        dist.barrier(group=group)
    align = alignment(cfg)
    train_loader = PackedLoader(
        train_tokens,
        cfg.data.seq_len,
        cfg.data.batch_size,
        seed=cfg.train.seed,
        pad_id=tokenizer.pad_id,
        align=align,
    )
    # The held-out split may be small: use as many rows as it fills, a multiple of dp.
    val_rows = pack_documents(val_tokens.lengths, cfg.data.seq_len, align).num_rows
    dp = cfg.parallel.dp
    val_batch = min(cfg.data.batch_size, val_rows // dp * dp)
    if val_batch < dp:
        raise DataError(
            f"the validation split packs into {val_rows} row(s), fewer than parallel.dp={dp}: "
            "raise data.val_fraction or lower data.seq_len"
        )
    val_loader = PackedLoader(
        val_tokens,
        cfg.data.seq_len,
        val_batch,
        seed=cfg.train.seed,
        pad_id=tokenizer.pad_id,
        shuffle=False,
        align=align,
    )
    if verbose:
        print(
            f"data: {len(train_docs)} train / {len(val_docs)} val documents, "
            f"{train_tokens.num_tokens:,} / {val_tokens.num_tokens:,} tokens, vocab "
            f"{tokenizer.vocab_size}, padding {train_loader.padding_fraction:.1%} of rows",
            flush=True,
        )
    return PreparedData(tokenizer, train_loader, val_loader)
