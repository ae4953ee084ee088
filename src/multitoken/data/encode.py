"""Encoding work batches of documents in order, in this process or in a pool of workers.

One worker (``workers=1``) encodes in this process with the tokenizer's own threaded batch
encoding; more start that many processes, one thread each, and keep at most two work batches
per worker in flight, so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from contextlib import contextmanager

import numpy as np

from multitoken.data.tokenizer import Tokenizer

__all__ = ["encoder"]


def _init_worker(tokenizer: Tokenizer) -> None:
    # One thread per worker: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER_TOKENIZER.encode_documents(texts, dtype)


@contextmanager
def encoder(tokenizer: Tokenizer, dtype: np.dtype, workers: int):
    """A function mapping an iterator of (texts, meta) to (tokens, lengths, meta), in order.

    Worker processes get at most ``2 * workers`` work batches ahead of the writer, which
    bounds memory (``Pool.imap`` would read the whole corpus into its task queue).
    """
    if workers <= 1:
        yield lambda batches: (
            (*tokenizer.encode_documents(texts, dtype), meta) for texts, meta in batches
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
