"""Offline backbone features on disk, beside the token store, and the loader that reads them.

A feature store is a folder ``features-<key>/`` written once by
:func:`~multitoken.data.feature_build.build_features` and then only read; it mirrors its token
store token for token (docs/training.md#offline-backbone-features)::

    index.json                  format, identity (token store, backbone, dtype, seq_len), and
                                per split its parts: token range, files, sizes, checksums
    train-00000.hidden.bin      h^0 of the part's tokens, [tokens, H], in the feature dtype
                                (float16, bfloat16 as raw 16-bit words, or float32)
    train-00000.nll.bin         fp32 [tokens]: the main head's NLL of the next token
    train-00000.greedy.bin      int32 [tokens]: the main head's argmax
    val-00000....               the same for the validation split

Token ``n`` of a split (its place in the store's concatenated documents) has row ``n`` of its
split's features. Every value was computed inside the token's document piece of ``seq_len``
tokens (pieces start at multiples of ``seq_len`` in their document, as
:func:`~multitoken.data.packing.pack_documents` cuts them), so the features depend on
``seq_len`` and on nothing else of the packing.

The loader (:class:`FeatureLoader`) packs the same rows as the token loader by packing a twin
corpus whose documents are the tokens' indices (:class:`IndexCorpus`): the same lengths give
the same plan, so every position of a batch knows its token's row in the feature files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from multitoken.data.loader import PackedLoader
from multitoken.data.store import SPLITS, StoreError, StoreSplit, file_checksum

__all__ = [
    "FEATURES_FORMAT",
    "FEATURE_DTYPES",
    "FeatureError",
    "FeatureSplit",
    "FeatureStore",
    "IndexCorpus",
    "FeatureLoader",
    "open_features",
    "file_dtype",
    "file_shape",
    "storage_dtype",
]

# Bump when the layout changes, to orphan stale feature stores.
FEATURES_FORMAT = 1
# features.dtype -> the torch dtype of h^0 on disk.
FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# The files of a part, by what they hold, and their dtype on disk (hidden: the feature dtype's).
FILES = {"hidden": None, "nll": np.dtype(np.float32), "greedy": np.dtype(np.int32)}


class FeatureError(StoreError):
    """A feature store is damaged, or was built for another store, backbone or setting."""


def storage_dtype(name: str) -> np.dtype:
    """The numpy dtype of ``hidden`` on disk (bfloat16 as its raw 16-bit words)."""
    return np.dtype({"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[name])


def file_shape(kind: str, num_tokens: int, hidden: int) -> tuple[int, ...]:
    """``[tokens, H]`` for ``hidden``, ``[tokens]`` for the per-token statistics."""
    return (num_tokens, hidden) if kind == "hidden" else (num_tokens,)


def file_dtype(kind: str, dtype: str) -> np.dtype:
    """The numpy dtype of file ``kind`` on disk for features of ``dtype``."""
    return storage_dtype(dtype) if kind == "hidden" else FILES[kind]


class FeatureSplit:
    """One split's features, memory-mapped; :meth:`gather` reads the rows of a batch."""

    def __init__(self, folder: Path, entry: dict, dtype: str, hidden: int) -> None:
        self.dtype, self.hidden = dtype, hidden
        self.num_tokens = int(entry["num_tokens"])
        parts = entry["parts"]
        self._maps = [
            {
                kind: np.memmap(
                    folder / part["files"][kind]["file"],
                    mode="r",
                    dtype=file_dtype(kind, dtype),
                    shape=file_shape(kind, part["num_tokens"], hidden),
                )  # fmt: skip
                for kind in FILES
            }
            for part in parts
            if part["num_tokens"]
        ]
        self._starts = np.array([int(p["first_token"]) for p in parts if p["num_tokens"]])

    def gather(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        """``hidden`` ``[*, H]`` (the feature dtype), ``nll`` fp32 and ``greedy`` int64
        ``[*]`` of the tokens ``index`` (int64 ``[*]``; -1 = padding, all zeros)."""
        flat = index.reshape(-1)
        out = {
            "hidden": np.zeros((flat.size, self.hidden), dtype=storage_dtype(self.dtype)),
            "nll": np.zeros(flat.size, dtype=np.float32),
            "greedy": np.zeros(flat.size, dtype=np.int32),
        }
        real = np.flatnonzero(flat >= 0)
        part_of = np.searchsorted(self._starts, flat[real], side="right") - 1
        for part in np.unique(part_of).tolist():
            where = real[part_of == part]
            rows = flat[where] - self._starts[part]
            for kind, mapped in self._maps[part].items():
                out[kind][where] = mapped[rows]
        hidden = torch.from_numpy(out["hidden"])
        if self.dtype == "bfloat16":
            hidden = hidden.view(torch.int16).view(torch.bfloat16)
        shape = index.shape
        return {
            "hidden": hidden.view(*shape, self.hidden),
            "nll": torch.from_numpy(out["nll"]).view(shape),
            "greedy": torch.from_numpy(out["greedy"]).long().view(shape),
        }


class FeatureStore:
    """A complete, checked feature folder (:func:`open_features`)."""

    def __init__(self, folder: Path, index: dict) -> None:
        self.folder, self.index = folder, index

    def split(self, name: str) -> FeatureSplit:
        entry = self.index["splits"][name]
        return FeatureSplit(self.folder, entry, self.index["dtype"], int(self.index["hidden"]))


def _check_identity(index: dict, expect: dict, folder: Path) -> None:
    for key, want in expect.items():
        have = index.get(key)
        if have != want:
            what = {"backbone": "another backbone (weights or architecture)"}.get(key, key)
            raise FeatureError(
                f"the features in {folder} were built for {what}: {key} is {have!r}, this run "
                f"needs {want!r}; build them for this run (`multitoken features`) or point "
                "features.path elsewhere"
            )


def open_features(folder: str | os.PathLike[str], verify: str, expect: dict) -> FeatureStore:
    """Open a feature folder after checking it against its index and ``expect``.

    Args:
        folder: the ``features-<key>`` folder.
        verify: ``"size"`` checks every file's size; ``"full"`` also re-hashes every file.
        expect: index entries that must match (``store``, ``backbone``, ``dtype``,
            ``seq_len``, ``hidden``): features of another backbone are refused.

    Raises:
        FeatureError: the index is missing or unreadable, a file is missing, truncated or
            corrupted (the message names it), or an ``expect`` entry differs.
    """
    folder = Path(folder)
    index_path = folder / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FeatureError(f"{index_path} is missing or unreadable ({err})") from None
    if index.get("format") != FEATURES_FORMAT:
        raise FeatureError(f"{index_path} has format {index.get('format')}, not {FEATURES_FORMAT}")
    _check_identity(index, expect, folder)
    fix = f"remove {folder} to build the features again"
    for split in SPLITS:
        for part in index["splits"][split]["parts"]:
            for entry in part["files"].values():
                path = folder / entry["file"]
                size = path.stat().st_size if path.is_file() else None
                if size != entry["bytes"]:
                    raise FeatureError(
                        f"{path} has {size} bytes, the index says {entry['bytes']}: {fix}"
                    )
                if verify == "full" and file_checksum(path) != entry["checksum"]:
                    raise FeatureError(f"{path} does not match its checksum in the index: {fix}")
    return FeatureStore(folder, index)


class IndexCorpus:
    """A store split whose documents are their tokens' indices in the split: packed like the
    split (same lengths), it says where every packed position's features are."""

    def __init__(self, split: StoreSplit) -> None:
        self.split = split

    @property
    def num_tokens(self) -> int:
        return self.split.num_tokens

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> np.ndarray:
        offsets = self.split.offsets
        return np.arange(int(offsets[index]), int(offsets[index + 1]), dtype=np.int64)

    def doc_lengths(self, indices: np.ndarray) -> np.ndarray:
        return self.split.doc_lengths(indices)


class FeatureLoader:
    """A :class:`~multitoken.data.loader.PackedLoader`'s batches with each position's backbone
    features added (``hidden``, ``nll``, ``greedy``; zeros on padding); resumes as it does."""

    def __init__(self, loader: PackedLoader, features: FeatureSplit) -> None:
        self.loader, self.features = loader, features
        self.positions = PackedLoader(
            IndexCorpus(loader.corpus), loader.seq_len, loader.batch_size, seed=loader.seed,
            pad_id=-1, shuffle=loader.shuffle, align=loader.align, window=loader.window,
            dp_rank=loader.dp_rank, dp_size=loader.dp_size,
        )  # fmt: skip
        if features.num_tokens != loader.corpus.num_tokens:
            raise FeatureError(
                f"the features hold {features.num_tokens} tokens, their split "
                f"{loader.corpus.num_tokens}: they belong to another token store"
            )

    def __iter__(self) -> FeatureLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self.loader)
        index = next(self.positions)["input_ids"].numpy()
        return {**batch, **self.features.gather(index)}

    @property
    def padding_fraction(self) -> float:
        return self.loader.padding_fraction

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)
        self.positions.load_state_dict(state)
