"""A deterministic, resumable loader of packed global batches, and its data-parallel split.

Every rank builds the same :class:`PackedLoader` from the same corpus and seed, so every
rank sees the same global batch; :func:`dp_slice` then picks the rows of one data-parallel
rank. Nothing here communicates: determinism replaces a broadcast.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from multitoken.data.corpus import DataError
from multitoken.data.packing import Segment, build_batch, pack_documents
from multitoken.data.tokenizer import TokenizedCorpus

__all__ = ["PackedLoader", "dp_slice"]


class _ReorderedCorpus:
    """The corpus seen through a document permutation: item ``i`` is document ``order[i]``.

    The packer works on the shuffled order; mapping indices back lazily, only for the
    rows of a batch, saves rewriting every segment of the epoch.
    """

    def __init__(self, corpus: TokenizedCorpus, order: np.ndarray) -> None:
        self.corpus = corpus
        self.order = order

    def __getitem__(self, index: int) -> np.ndarray:
        return self.corpus[int(self.order[index])]


class PackedLoader:
    """Infinite iterator over packed global batches of ``batch_size`` rows.

    Each epoch, the documents are shuffled with a generator seeded by ``(seed, epoch)``,
    packed best-fit into rows of ``seq_len`` tokens (:func:`pack_documents`), and the
    rows shuffled again (best-fit output is ordered by piece length, which would put
    all long documents in the first batches). The epoch's rows are then served
    ``batch_size`` at a time; the ragged tail that cannot fill a batch is dropped, and
    the next epoch starts. Batches are dicts from :func:`build_batch` on the CPU.

    The batch sequence depends only on the corpus, ``seq_len``, ``batch_size`` and
    ``seed``: any two loaders built alike yield the same batches, and
    :meth:`load_state_dict` resumes one exactly where another stopped.

    Attributes:
        padding_fraction: Pad tokens over all row tokens in the current epoch's packing
            (dropped tail rows included).
        batches_per_epoch: Full batches in the current epoch.

    Example::

        loader = PackedLoader(corpus, seq_len=512, batch_size=8, seed=0, pad_id=tok.pad_id)
        batch = next(loader)            # input_ids, labels: (8, 512); cu_seqlens
        local = dp_slice(batch, dp_rank, dp_size)
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        pad_id: int = 0,
        shuffle: bool = True,
        ignore_index: int = -100,
        align: int = 1,
    ) -> None:
        """Build the loader and pack its first epoch.

        Args:
            corpus: The tokenized documents.
            seq_len: Tokens per row.
            batch_size: Rows per global batch (over all data-parallel ranks).
            seed: Non-negative seed of the shuffles.
            pad_id: Input id of padding.
            shuffle: Shuffle documents and rows each epoch; when False every epoch has
                the same rows, in packing order.
            ignore_index: Label of positions without a target.
            align: pieces occupy multiples of ``align`` tokens (see
                :func:`~multitoken.data.packing.pack_documents`); ``2 * cp`` for context
                parallelism.

        Raises:
            DataError: On a bad setting, or if one epoch packs into fewer than
                ``batch_size`` rows.
        """
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        if len(corpus) == 0:
            raise DataError(
                "the tokenized corpus has no documents: pass --data a folder of text "
                "files or a .jsonl file with a 'text' field"
            )
        self.corpus = corpus
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.ignore_index = ignore_index
        self.align = align
        self._lengths = corpus.lengths
        self._epoch = 0
        self._batch_in_epoch = 0
        self._packed_epoch = -1
        self._rows: list[list[Segment]] = []
        self._docs: _ReorderedCorpus | None = None
        self.padding_fraction = 0.0
        self.batches_per_epoch = 0
        self._pack_epoch(0)  # fail at construction, not at the first step, if too small

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def _pack_epoch(self, epoch: int) -> None:
        if self._packed_epoch == epoch:
            return
        num_docs = len(self._lengths)
        if self.shuffle:
            # A SeedSequence of (seed, epoch): independent streams per epoch, and an
            # epoch's order is computable without replaying the ones before it.
            rng = np.random.default_rng([self.seed, epoch])
            doc_order = rng.permutation(num_docs)
        else:
            rng = None
            doc_order = np.arange(num_docs)
        plan = pack_documents(self._lengths[doc_order], self.seq_len, self.align)
        rows = plan.rows
        if rng is not None:
            rows = [rows[i] for i in rng.permutation(len(rows)).tolist()]
        if len(rows) < self.batch_size:
            raise DataError(
                f"the corpus ({plan.num_tokens:,} tokens) packs into {len(rows)} rows of "
                f"seq_len={self.seq_len}, fewer than one batch of batch_size="
                f"{self.batch_size} rows: lower batch_size or seq_len, or use a larger corpus"
            )
        self._rows = rows
        self._docs = _ReorderedCorpus(self.corpus, doc_order)
        self._packed_epoch = epoch
        self.padding_fraction = plan.padding_fraction
        self.batches_per_epoch = len(rows) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self._pack_epoch(self._epoch)
        if self._batch_in_epoch >= self.batches_per_epoch:
            self._epoch += 1
            self._batch_in_epoch = 0
            self._pack_epoch(self._epoch)
        first = self._batch_in_epoch * self.batch_size
        rows = self._rows[first : first + self.batch_size]
        self._batch_in_epoch += 1
        return build_batch(
            self._docs, rows, self.seq_len, self.pad_id, self.ignore_index, self.align
        )

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands: the next batch is ``batch_in_epoch`` of ``epoch``.

        The settings that determine the batch sequence are stored too, so that loading
        into a differently built loader fails instead of silently diverging.
        """
        return {
            "epoch": self._epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "align": self.align,
            "num_docs": len(self.corpus),
            "num_tokens": self.corpus.num_tokens,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the next batches equal those of the saved run.

        Raises:
            DataError: If the state came from a loader with other settings or corpus.
        """
        expected = self.state_dict()
        for key in ("seed", "seq_len", "batch_size", "align", "num_docs", "num_tokens"):
            if key in state and int(state[key]) != expected[key]:
                raise DataError(
                    f"loader state has {key}={state[key]} but this loader has "
                    f"{key}={expected[key]}: build the loader with the same corpus, "
                    "seq_len, batch_size and seed as the run that saved it"
                )
        epoch, batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or batch_in_epoch < 0:
            raise DataError(f"loader state has a negative position: {dict(state)}")
        self._pack_epoch(epoch)
        if batch_in_epoch > self.batches_per_epoch:
            raise DataError(
                f"loader state points at batch {batch_in_epoch} of epoch {epoch}, which "
                f"has only {self.batches_per_epoch}: the state belongs to another corpus"
            )
        self._epoch = epoch
        self._batch_in_epoch = batch_in_epoch


def dp_slice(
    batch: Mapping[str, torch.Tensor], dp_rank: int, dp_size: int
) -> dict[str, torch.Tensor]:
    """The rows of one data-parallel rank: ``[rank * B / dp, (rank + 1) * B / dp)``.

    Every tensor whose first dim is the batch dim is sliced (views, no copies);
    ``cu_seqlens`` keeps the boundaries inside the slice, re-based to start at 0. This
    works because a row boundary is always a segment boundary.

    Example (``B=2``, ``T=4``, ``dp_size=2``): ``cu_seqlens = [0, 3, 4, 6, 8]`` gives
    ``[0, 3, 4]`` on rank 0 and ``[0, 2, 4]`` on rank 1.

    Args:
        batch: A global batch from :class:`PackedLoader` or :func:`build_batch`.
        dp_rank: This rank's index on the data-parallel axis.
        dp_size: Size of the data-parallel axis.

    Returns:
        The local batch, with the same keys.

    Raises:
        DataError: If ``dp_rank`` is out of range or the batch does not split evenly.
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(
            f"dp_rank must be in [0, dp_size), got dp_rank={dp_rank}, dp_size={dp_size}"
        )
    input_ids = batch["input_ids"]
    num_rows, seq_len = input_ids.shape
    if num_rows % dp_size:
        raise DataError(
            f"batch_size={num_rows} rows do not split over dp_size={dp_size} ranks: set "
            f"batch_size to a multiple of {dp_size}"
        )
    rows_per_rank = num_rows // dp_size
    lo, hi = dp_rank * rows_per_rank, (dp_rank + 1) * rows_per_rank
    local: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if key == "cu_seqlens":
            first, last = lo * seq_len, hi * seq_len
            cu_seqlens = value[(value >= first) & (value <= last)] - first
            # Both ends must be boundaries already, or a segment spans two ranks.
            if cu_seqlens.numel() < 2 or cu_seqlens[0] != 0 or cu_seqlens[-1] != last - first:
                raise DataError(
                    "cu_seqlens has a segment crossing a row boundary: build batches "
                    "with build_batch, which ends a segment at every row end"
                )
            local[key] = cu_seqlens
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == num_rows:
            local[key] = value[lo:hi]
        else:
            local[key] = value
    return local
