"""A deterministic, resumable loader of packed batches, each rank reading only its own rows.

Every rank plans the same global batches from the same corpus and seed (packing needs only
document lengths) and materialises only its data-parallel rows. Nothing here communicates:
determinism replaces a broadcast.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from multitoken.data.packing import Segment, build_batch, pack_documents
from multitoken.data.shuffle import permutation_key, permute
from multitoken.errors import DataError

__all__ = ["Corpus", "PackedLoader", "dp_slice"]


class Corpus(Protocol):
    """What the loader reads: documents by index (token arrays), and the token count.

    A :class:`~multitoken.data.store.StoreSplit` (memory-mapped) is a corpus; a
    ``doc_lengths(indices)`` method, when present, spares reading the documents to pack.
    """

    @property
    def num_tokens(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


class _ReorderedCorpus:
    """The corpus seen through a document selection: item ``i`` is document ``order[i]``.

    The packer works on the shuffled window; mapping indices back lazily, only for the
    rows of a batch, saves rewriting every segment.
    """

    def __init__(self, corpus: Corpus, order: np.ndarray) -> None:
        self.corpus = corpus
        self.order = order

    def __getitem__(self, index: int) -> np.ndarray:
        return self.corpus[int(self.order[index])]


class _Window:
    """The packed rows of one window of an epoch, in serving order."""

    def __init__(self, epoch: int, index: int, rows: list[list[Segment]], docs, plan) -> None:
        self.epoch, self.index, self.rows, self.docs = epoch, index, rows, docs
        self.num_tokens, self.num_rows = plan.num_tokens, plan.num_rows


class PackedLoader:
    """Infinite iterator over packed batches: this data-parallel rank's rows of each global
    batch of ``batch_size`` rows.

    Each epoch, the documents are shuffled with a key derived from ``(seed, epoch)`` and cut
    into windows of ``window`` documents; each window is packed best-fit into rows of
    ``seq_len`` tokens (:func:`pack_documents`) and its rows are shuffled (best-fit output
    is ordered by piece length, which would put all long documents first). The rows of
    the epoch's windows, in order, are served ``batch_size`` at a time (a batch may span
    two windows); the ragged tail of the epoch that cannot fill a batch is dropped, and the
    next epoch starts. Batches are dicts from :func:`build_batch` on the CPU, holding rows
    ``[dp_rank * B / dp_size, (dp_rank + 1) * B / dp_size)`` of the global batch: exactly
    ``dp_slice(global_batch, dp_rank, dp_size)``, with only those rows' tokens read.

    Memory is bounded by the window, not the corpus: the shuffle is a keyed permutation
    computed a window at a time (:mod:`multitoken.data.shuffle`), and only the window's
    lengths and rows are held. ``window=0`` packs the whole epoch at once (global best-fit,
    the least padding; memory grows with the corpus).

    The global batch sequence depends only on the corpus, ``seq_len``, ``batch_size``,
    ``align``, ``window`` and ``seed``: any two loaders built alike plan the same batches, on
    every rank of every parallel layout, and :meth:`load_state_dict` resumes one exactly
    where another stopped, mid-epoch and mid-window, without replaying what came before
    (the state is the global position, the same on every rank whatever ``dp_size``).

    Attributes:
        padding_fraction: Pad tokens over all row tokens of the windows packed so far in
            the current epoch (with ``window=0``: the whole epoch's packing).
        batches_per_epoch: Full batches in the current epoch, when known: with
            ``window=0``, or once the epoch has been served to its end; else None.

    Example::

        loader = PackedLoader(corpus, 512, 8, pad_id=tok.pad_id, dp_rank=1, dp_size=2)
        batch = next(loader)  # rows 4..7 of the global batch: input_ids (4, 512), ...
    """

    def __init__(
        self,
        corpus: Corpus,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        pad_id: int = 0,
        shuffle: bool = True,
        ignore_index: int = -100,
        align: int = 1,
        window: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        """Build the loader and pack the start of its first epoch.

        Args:
            corpus: The tokenized documents: a store split
                (:func:`~multitoken.data.tokenized.tokenize_corpus` gives one for a list).
            seq_len: Tokens per row.
            batch_size: Rows per global batch (over all data-parallel ranks); each rank's
                batches have ``batch_size / dp_size`` rows.
            seed: Non-negative seed of the shuffles.
            pad_id: Input id of padding.
            shuffle: Shuffle documents and rows each epoch; when False every epoch has
                the same rows, in corpus and packing order.
            ignore_index: Label of positions without a target.
            align: pieces occupy multiples of ``align`` tokens (see
                :func:`~multitoken.data.packing.pack_documents`); ``2 * cp`` for context
                parallelism.
            window: Documents packed together; 0 = the whole epoch.
            dp_rank: This rank's index on the data-parallel axis.
            dp_size: Data-parallel ranks; must divide ``batch_size``.

        Raises:
            DataError: On a bad setting, or if one epoch packs into fewer than
                ``batch_size`` rows.
        """
        _check_settings(len(corpus), seq_len, batch_size, seed, window)
        _check_dp(batch_size, dp_rank, dp_size)
        self.corpus = corpus
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.ignore_index = ignore_index
        self.align = align
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.local_batch_size = batch_size // dp_size
        self.num_docs = len(corpus)
        self.window = window if 0 < window < self.num_docs else self.num_docs
        self.num_windows = -(-self.num_docs // self.window)
        self.batches_per_epoch: int | None = None
        self.padding_fraction = 0.0
        self._padded = [0, 0]  # real tokens, row tokens of the windows packed this epoch
        self._current: _Window | None = None
        self._epoch, self._window, self._row = 0, 0, 0
        self._batch_in_epoch = 0
        # Fail at construction, not at the first step, if an epoch cannot fill one batch.
        rows = 0
        for index in range(self.num_windows):
            rows += self._pack(0, index).num_rows
            if rows >= batch_size:
                break
        if rows < batch_size:
            raise DataError(
                f"the corpus ({corpus.num_tokens:,} tokens) packs into {rows} rows of "
                f"seq_len={seq_len}, fewer than one batch of batch_size={batch_size} rows: "
                "lower batch_size or seq_len, or use a larger corpus"
            )
        if self.num_windows == 1:
            self.batches_per_epoch = rows // batch_size
        self._seek(0, 0, 0, 0)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    def _pack(self, epoch: int, index: int) -> _Window:
        """Pack window ``index`` of ``epoch`` (cached: the current window only)."""
        current = self._current
        if current is not None and (current.epoch, current.index) == (epoch, index):
            return current
        first = index * self.window
        positions = np.arange(first, min(first + self.window, self.num_docs), dtype=np.int64)
        if not self.shuffle:
            doc_ids = positions
        elif self.num_windows == 1:
            # One window: numpy's permutation, as before windows existed (same batches).
            doc_ids = np.random.default_rng([self.seed, epoch]).permutation(self.num_docs)
        else:
            doc_ids = permute(positions, self.num_docs, permutation_key(self.seed, epoch))
        plan = pack_documents(_lengths(self.corpus, doc_ids), self.seq_len, self.align)
        rows = plan.rows
        if self.shuffle:
            seeds = [self.seed, epoch] if self.num_windows == 1 else [self.seed, epoch, index]
            rng = np.random.default_rng(seeds)
            if self.num_windows == 1:
                rng.permutation(self.num_docs)  # the document shuffle's draw, as before
            rows = [rows[i] for i in rng.permutation(len(rows)).tolist()]
        self._current = _Window(epoch, index, rows, _ReorderedCorpus(self.corpus, doc_ids), plan)
        return self._current

    def epoch_padding(self, epoch: int = 0) -> float:
        """Pad tokens over all row tokens of a whole epoch's packing (every window packed:
        costs a pass over the corpus's lengths; for reports, not for the training loop)."""
        current = self._current
        real = rows = 0
        for index in range(self.num_windows):
            self._current = None  # pack afresh, leave the serving window alone
            packed = self._pack(epoch, index)
            real, rows = real + packed.num_tokens, rows + packed.num_rows
        self._current = current
        return 1.0 - real / max(rows * self.seq_len, 1)

    def _seek(self, epoch: int, window: int, row: int, batch_in_epoch: int) -> None:
        self._epoch, self._window, self._row = epoch, window, row
        self._batch_in_epoch = batch_in_epoch
        self._padded = [0, 0]
        self._account(self._pack(epoch, window))

    def _account(self, packed: _Window) -> None:
        self._padded[0] += packed.num_tokens
        self._padded[1] += packed.num_rows * self.seq_len
        self.padding_fraction = 1.0 - self._padded[0] / max(self._padded[1], 1)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def _take_rows(self) -> list[tuple[_ReorderedCorpus, list[Segment]]] | None:
        """The next batch's rows, or None when the epoch has no full batch left."""
        taken: list[tuple[_ReorderedCorpus, list[Segment]]] = []
        window, row = self._window, self._row
        packed = self._pack(self._epoch, window)
        while len(taken) < self.batch_size:
            if row == len(packed.rows):
                if window + 1 == self.num_windows:
                    return None
                window, row = window + 1, 0
                packed = self._pack(self._epoch, window)
                self._account(packed)
                continue
            need = self.batch_size - len(taken)
            taken += [(packed.docs, r) for r in packed.rows[row : row + need]]
            row = min(row + need, len(packed.rows))
        self._window, self._row = window, row
        return taken

    def __next__(self) -> dict[str, torch.Tensor]:
        taken = self._take_rows()
        if taken is None:
            self.batches_per_epoch = self._batch_in_epoch
            self._seek(self._epoch + 1, 0, 0, 0)
            taken = self._take_rows()
        if taken is None:
            raise DataError(f"epoch {self._epoch} packs into fewer than batch_size rows")
        self._batch_in_epoch += 1
        # The whole global batch is planned; only this rank's rows are read and built.
        first = self.dp_rank * self.local_batch_size
        taken = taken[first : first + self.local_batch_size]
        # Rows may come from two windows, each with its own document order: renumber the
        # batch's documents into one list.
        docs: list[np.ndarray] = []
        rows: list[list[Segment]] = []
        for window_docs, row in taken:
            rows.append([])
            for segment in row:
                rows[-1].append(Segment(len(docs), segment.start, segment.end))
                docs.append(window_docs[segment.doc_index])
        return build_batch(docs, rows, self.seq_len, self.pad_id, self.ignore_index, self.align)

    def state_dict(self) -> dict[str, int]:
        """Where the loader stands: the next batch starts at row ``row`` of window
        ``window`` of ``epoch`` (and is batch ``batch_in_epoch`` of the epoch).

        The settings that determine the batch sequence are stored too, so that loading
        into a differently built loader fails instead of silently diverging.
        """
        return {
            "epoch": self._epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "window_index": self._window,
            "row_in_window": self._row,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "align": self.align,
            "window": self.window,
            "num_docs": self.num_docs,
            "num_tokens": self.corpus.num_tokens,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the next batches equal those of the saved run.

        Raises:
            DataError: If the state came from a loader with other settings or corpus.
        """
        expected = self.state_dict()
        keys = ("seed", "seq_len", "batch_size", "align", "window", "num_docs", "num_tokens")
        for key in keys:
            if key in state and int(state[key]) != expected[key]:
                raise DataError(
                    f"loader state has {key}={state[key]} but this loader has "
                    f"{key}={expected[key]}: build the loader with the same corpus, "
                    "seq_len, batch_size, window and seed as the run that saved it"
                )
        epoch, batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        # A state from before windows existed: one window, rows = batches * batch_size.
        window = int(state.get("window_index", 0))
        row = int(state.get("row_in_window", batch_in_epoch * self.batch_size))
        if min(epoch, batch_in_epoch, window, row) < 0:
            raise DataError(f"loader state has a negative position: {dict(state)}")
        if window >= self.num_windows or row > self._pack(epoch, window).num_rows:
            raise DataError(
                f"loader state points at row {row} of window {window} of epoch {epoch}, "
                "which does not exist: the state belongs to another corpus"
            )
        self._seek(epoch, window, row, batch_in_epoch)


def _lengths(corpus: Corpus, doc_ids: np.ndarray) -> np.ndarray:
    """Lengths of the documents ``doc_ids``, reading only their offsets when possible."""
    if hasattr(corpus, "doc_lengths"):
        return corpus.doc_lengths(doc_ids)
    return np.asarray([len(corpus[int(i)]) for i in doc_ids], dtype=np.int64)


def _check_settings(num_docs: int, seq_len: int, batch_size: int, seed: int, window: int):
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    if window < 0:
        raise DataError(f"window must be >= 0 (0 = the whole epoch), got {window}")
    if num_docs == 0:
        raise DataError(
            "the tokenized corpus has no documents: pass --data a folder of text "
            "files or a .jsonl file with a 'text' field"
        )


def _check_dp(batch_size: int, dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(
            f"dp_rank must be in [0, dp_size), got dp_rank={dp_rank}, dp_size={dp_size}"
        )
    if batch_size % dp_size:
        raise DataError(
            f"batch_size={batch_size} rows do not split over dp_size={dp_size} ranks: set "
            f"batch_size to a multiple of {dp_size}"
        )


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
        batch: A global batch (from a ``dp_size=1`` :class:`PackedLoader`, or :func:`build_batch`).
        dp_rank: This rank's index on the data-parallel axis.
        dp_size: Size of the data-parallel axis.

    Returns:
        The local batch, with the same keys.

    Raises:
        DataError: If ``dp_rank`` is out of range or the batch does not split evenly.
    """
    input_ids = batch["input_ids"]
    num_rows, seq_len = input_ids.shape
    _check_dp(num_rows, dp_rank, dp_size)
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
