"""From a training configuration to a tokenizer and the train and validation loaders.

The slow parts (training the BPE, tokenising the corpus into the memory-mapped token store)
are cached on disk, so the launcher runs :func:`prepare_data` once before it starts the ranks
and every rank then opens the cache in milliseconds. Under ``torchrun`` (no launcher of ours)
rank 0 prepares while the others wait. Every rank reads the store through memory maps: its
resident memory does not grow with the corpus.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist

from multitoken.data import (
    DataError,
    Document,
    PackedLoader,
    Source,
    SplitRule,
    StoreSplit,
    Tokenizer,
    TokenStore,
    build_store,
    open_source,
    pack_documents,
    stdlib_source,
    train_tokenizer,
)
from multitoken.data.build import empty_corpus_message
from multitoken.train.config import TrainConfig, alignment

__all__ = ["PreparedData", "prepare_data", "check_data_path", "data_source"]

# Set by the launcher for its ranks: it has just prepared (built or fully checked) the data.
DATA_CHECKED_ENV = "MULTITOKEN_DATA_CHECKED"

# Below this much input, one process with the tokenizer's own threads is as fast as workers.
_WORKERS_FROM_BYTES = 100_000_000


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train_loader: PackedLoader
    val_loader: PackedLoader
    store: TokenStore | None = None  # where the loaders read (offline features sit beside it)


def check_data_path(cfg: TrainConfig) -> None:
    """Fail early, with the fix, on a data path that cannot be read."""
    if cfg.data.path and cfg.data.format != "hf" and not Path(cfg.data.path).exists():
        raise DataError(
            f"data path {cfg.data.path!r} does not exist: set data.path (or --data) to a folder "
            "of text files, a .jsonl(.gz/.zst) or .parquet file or a saved Hugging Face "
            "dataset, or leave it empty for the Python standard library"
        )


def data_source(cfg: TrainConfig) -> Source:
    """The configured corpus as a streamed source (the standard library when no path)."""
    check_data_path(cfg)
    data = cfg.data
    if not data.path:
        return stdlib_source(data.max_files)
    return open_source(
        data.path,
        data.format,
        data.text_field,
        data.glob,
        data.max_files,
        data.on_bad_record,
        max_doc_mb=data.max_doc_mb,
        max_expanded_mb=data.max_expanded_mb,
    )


def _train_sample(source: Source, cfg: TrainConfig) -> Iterator[Document]:
    """The first ``tokenizer_sample_mb`` of training-split text: the BPE never sees validation."""
    budget = cfg.data.tokenizer_sample_mb * 1_000_000
    rule = SplitRule(cfg.data.val_fraction, cfg.train.seed)
    for doc in source:
        if rule.is_val(doc.name):
            continue
        yield doc
        budget -= len(doc.text)
        if budget <= 0:
            return


def _tokenizer(cfg: TrainConfig, source: Source, verbose: bool) -> Tokenizer:
    if cfg.model.hf:  # --- Hugging Face models (issue 9): the model's own tokenizer ---
        from multitoken.train.hf import hf_tokenizer  # optional extra: only when used

        return hf_tokenizer(cfg)
    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    if next(iter(source), None) is None:  # before training on nothing
        raise DataError(empty_corpus_message(source))
    key = f"{source.fingerprint()}|sample={cfg.data.tokenizer_sample_mb}MB|"
    key += f"val={cfg.data.val_fraction}|seed={cfg.train.seed}"
    return train_tokenizer(
        _train_sample(source, cfg),
        cfg.data.vocab_size,
        cfg.data.cache_dir,
        verbose=verbose,
        cache_key=key,
    )


def _workers(cfg: TrainConfig, source: Source) -> int:
    if cfg.data.workers:
        return cfg.data.workers
    if source.format in ("hf", "hf_disk") or source.total_bytes < _WORKERS_FROM_BYTES:
        return 1
    return max(1, min(os.cpu_count() or 1, 16))


def _rows_up_to(split: StoreSplit, seq_len: int, align: int, window: int, limit: int) -> int:
    """Rows of the unshuffled packing, counted window by window until ``limit`` is reached."""
    window = window or len(split)
    rows = 0
    for first in range(0, len(split), window):
        doc_ids = np.arange(first, min(first + window, len(split)))
        rows += pack_documents(split.doc_lengths(doc_ids), seq_len, align).num_rows
        if rows >= limit:
            break
    return rows


def _store(cfg: TrainConfig, source: Source, tokenizer: Tokenizer, rank: int, verbose: bool):
    return build_store(
        source,
        tokenizer,
        cfg.data.cache_dir,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.train.seed,
        workers=_workers(cfg, source),
        # Whoever built or fully checked the store just now (rank 0, or the launcher before
        # it started the ranks) hashes it; every other reader checks file sizes only.
        verify=cfg.data.verify if rank == 0 and not os.environ.get(DATA_CHECKED_ENV) else "size",
        verbose=verbose,
    )


def _loaders(
    cfg: TrainConfig, store: TokenStore, pad_id: int, dp_rank: int, dp_size: int
) -> tuple[PackedLoader, ...]:
    train, val = store.split("train"), store.split("val")
    if len(train) + len(val) < 2:
        raise DataError(
            f"the corpus has {len(train) + len(val)} document(s): at least 2 are needed (one "
            "held out for validation); add files to data.path"
        )
    align, window = alignment(cfg), cfg.data.pack_window
    train_loader = PackedLoader(
        train,
        cfg.data.seq_len,
        cfg.data.batch_size,
        seed=cfg.train.seed,
        pad_id=pad_id,
        align=align,
        window=window,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    # The held-out split may be small: use as many rows as it fills, a multiple of dp.
    dp = cfg.parallel.dp
    val_rows = _rows_up_to(val, cfg.data.seq_len, align, window, cfg.data.batch_size)
    val_batch = min(cfg.data.batch_size, val_rows // dp * dp)
    if val_batch < dp:
        raise DataError(
            f"the validation split packs into {val_rows} row(s), fewer than parallel.dp={dp}: "
            "raise data.val_fraction or lower data.seq_len"
        )
    val_loader = PackedLoader(
        val,
        cfg.data.seq_len,
        val_batch,
        seed=cfg.train.seed,
        pad_id=pad_id,
        shuffle=False,
        align=align,
        window=window,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return train_loader, val_loader


def prepare_store(cfg: TrainConfig) -> tuple[Tokenizer, TokenStore]:
    """The tokenizer and the checked token store of ``cfg``, without planning any batches
    (one process; for tools that read the corpus's tokens, not its rows)."""
    source = data_source(cfg)
    tokenizer = _tokenizer(cfg, source, False)
    return tokenizer, _store(cfg, source, tokenizer, 0, False)


def prepare_data(
    cfg: TrainConfig, verbose: bool = True, group=None, dp_rank: int = 0, dp_size: int = 1
) -> PreparedData:
    """Tokenizer and loaders for ``cfg`` (collective over ``group`` when it is given).

    Every rank plans the same global batches; its loaders yield the rows of data-parallel
    rank ``dp_rank`` of ``dp_size`` (the defaults, 0 of 1, give whole global batches). The
    context parallel split happens in the trainer.
    """
    rank = dist.get_rank(group) if group is not None else 0
    if group is not None and rank != 0:
        dist.barrier(group=group)  # rank 0 fills the cache first
    source = data_source(cfg)
    tokenizer = _tokenizer(cfg, source, verbose)
    store = _store(cfg, source, tokenizer, rank, verbose)
    if group is not None and rank == 0:
        dist.barrier(group=group)
    train_loader, val_loader = _loaders(cfg, store, tokenizer.pad_id, dp_rank, dp_size)
    if verbose:
        splits = store.index["splits"]
        skipped = store.index.get("skipped", {}).get("counts", {})
        skipped_note = f", {sum(skipped.values())} input(s) skipped" if skipped else ""
        window = f"window {cfg.data.pack_window} docs" if cfg.data.pack_window else "whole epoch"
        print(
            f"data: {splits['train']['num_docs']:,} train / {splits['val']['num_docs']:,} val "
            f"documents, {splits['train']['num_tokens']:,} / {splits['val']['num_tokens']:,} "
            f"tokens, vocab {tokenizer.vocab_size}{skipped_note}, padding "
            f"{train_loader.padding_fraction:.1%} of rows (best-fit, {window}), store "
            f"{store.folder}",
            flush=True,
        )
    return PreparedData(tokenizer, train_loader, val_loader, store)
