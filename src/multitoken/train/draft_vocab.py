"""The draft vocabulary of a run: its training split's most frequent tokens
(``multitoken generate --draft-vocab N``; docs/decoding.md#draft-vocabulary)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from multitoken.decoding.draft_vocab import most_frequent
from multitoken.errors import InputError
from multitoken.train.config_io import load_config
from multitoken.train.data import prepare_store

__all__ = ["run_draft_vocab"]

_BATCH_TOKENS = 1 << 22  # tokens counted per np.bincount call


def run_draft_vocab(run_dir: str | Path, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of the run's training split (its token store,
    checked as training checks it; counted a few million tokens at a time), sorted."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"the draft vocabulary size must be an integer >= 1, got {size!r}")
    cfg = load_config(Path(run_dir) / "config.toml")
    tokenizer, store = prepare_store(cfg)  # no batch planning: only the tokens are counted
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    split, batch, held = store.split("train"), [], 0
    for index in range(len(split) + 1):
        if index == len(split) or held >= _BATCH_TOKENS:
            if batch:
                counts += np.bincount(np.concatenate(batch), minlength=counts.size)[: counts.size]
            batch, held = [], 0
        if index < len(split):
            batch.append(split[index])
            held += len(batch[-1])
    return most_frequent(torch.from_numpy(counts), size)
