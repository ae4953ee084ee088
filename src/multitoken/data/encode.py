"""Encoding work batches of documents in order, in this process or in a pool of workers.

One worker (``workers=1``) encodes in this process with the tokenizer's own threaded batch
encoding; more start that many processes, one thread each, and keep at most two work batches
per worker in flight, so memory stays bounded whatever the corpus size.

A text the tokenizer fails on, in whatever way, never ends a worker: the work batch is then
encoded a text at a time, and the failures come back as (index in the batch, what was raised)
for the caller to raise or count as bad records; the other texts are encoded as always.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from contextlib import contextmanager

import numpy as np

from multitoken.data.documents import one_line
from multitoken.data.tokenizer import Tokenizer

__all__ = ["encode_checked", "encoder"]


def _init_worker(tokenizer: Tokenizer) -> None:
    # One thread per worker: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def encode_checked(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype):
    """``(tokens, lengths, failed)``: the texts encoded, those the tokenizer failed on left out
    and listed in ``failed`` as (index, what it raised)."""
    try:
        return (*tokenizer.encode_documents(texts, dtype), [])
    except Exception:  # noqa: BLE001 - find which text: each is tried alone
        pass
    good, failed = [], []
    for index, text in enumerate(texts):
        try:
            tokenizer.encode_batch([text])
        except Exception as err:  # noqa: BLE001 - whatever the backend raises, name the text
            failed.append((index, one_line(err)))
        else:
            good.append(text)
    return (*tokenizer.encode_documents(good, dtype), failed)


def _encode_in_worker(texts: list[str], dtype: np.dtype):
    return encode_checked(_WORKER_TOKENIZER, texts, dtype)


@contextmanager
def encoder(tokenizer: Tokenizer, dtype: np.dtype, workers: int):
    """A function mapping an iterator of (texts, meta) to (tokens, lengths, failed, meta), in
    order (``failed`` as :func:`encode_checked` gives it).

    Worker processes get at most ``2 * workers`` work batches ahead of the writer, which
    bounds memory (``Pool.imap`` would read the whole corpus into its task queue).
    """
    if workers <= 1:
        yield lambda batches: (
            (*encode_checked(tokenizer, texts, dtype), meta) for texts, meta in batches
        )
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    # Set while the workers fork, so that tokenizers does not warn about forking after its
    # thread pool was used (training); restored for this process's own encoding after.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous

    def run(batches):
        pending: deque = deque()
        for texts, meta in batches:
            pending.append((pool.apply_async(_encode_in_worker, (texts, dtype)), meta))
            if len(pending) >= 2 * workers:
                result, meta = pending.popleft()
                yield (*result.get(), meta)
        while pending:
            result, meta = pending.popleft()
            yield (*result.get(), meta)

    try:
        yield run
    finally:
        pool.terminate()
        pool.join()
