"""Token store + frozen backbone -> feature store, in one pass: resumable, checksummed, atomic.

:func:`build_features` walks each split of a token store in parts of whole documents (about
``part_tokens`` tokens each, boundaries fixed by the store alone), packs each part's document
pieces into rows of ``seq_len`` tokens, runs the backbone over them (``compute``) and scatters
every position's outputs to its token's row of the part's files (:mod:`.features` for the
layout). As the token store's builder (:mod:`.build`), it writes into
``features-<key>.partial/``, publishes a finished part with a manifest written last, keeps the
finished parts when an interrupted build is run again, and renames the folder into place after
its index: a ``features-<key>/`` folder is complete. The key hashes everything the features
depend on (the token store's own content address, the backbone's weights, the dtype, seq_len).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from multitoken.data.build import atomic_json, build_lock, start_build
from multitoken.data.features import (
    FEATURE_DTYPES,
    FEATURES_FORMAT,
    FILES,
    FeatureError,
    FeatureStore,
    file_dtype,
    file_shape,
    open_features,
    storage_dtype,
)
from multitoken.data.packing import build_batch, pack_documents
from multitoken.data.store import SPLITS, StoreSplit, TokenStore, file_checksum

__all__ = ["PART_TOKENS", "build_features", "feature_key", "feature_bytes"]

PART_TOKENS = 1 << 16  # the work an interruption loses: 72 MB of fp16 h^0 at H = 576
_FP16_MAX = float(torch.finfo(torch.float16).max)


def feature_key(identity: dict) -> str:
    """The feature store's content address: what its values depend on, nothing else."""
    text = json.dumps({**identity, "format": FEATURES_FORMAT}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def feature_bytes(num_tokens: int, hidden: int, dtype: str) -> int:
    """Bytes the features of ``num_tokens`` tokens take on disk."""
    return num_tokens * (hidden * storage_dtype(dtype).itemsize + 8)


def _part_ranges(offsets: np.ndarray, part_tokens: int) -> list[tuple[int, int]]:
    """Document ranges ``[d0, d1)`` of about ``part_tokens`` tokens each (whole documents)."""
    ranges, first, num_docs = [], 0, len(offsets) - 1
    while first < num_docs:
        last = int(np.searchsorted(offsets, int(offsets[first]) + part_tokens, side="left"))
        last = min(max(last, first + 1), num_docs)
        ranges.append((first, last))
        first = last
    return ranges


def _to_disk(hidden: torch.Tensor, dtype: str) -> np.ndarray:
    """fp32 ``[N, H]`` -> the feature dtype's numpy array (bfloat16 as raw 16-bit words)."""
    cast = hidden.to(FEATURE_DTYPES[dtype])
    if dtype == "float16" and not bool(hidden.abs().max() <= _FP16_MAX):
        raise FeatureError(
            "the backbone's h^0 exceeds float16's range (65504): use features.dtype=bfloat16"
        )
    if dtype == "bfloat16":
        cast = cast.view(torch.int16)
    return cast.numpy().view(storage_dtype(dtype))


class _Part:
    """One part of a split: its documents, its files, and whether a manifest finished it."""

    def __init__(self, folder: Path, split: str, index: int, docs: tuple[int, int], offsets):
        self.folder, self.name = folder, f"{split}-{index:05d}"
        self.docs, self.first_token = docs, int(offsets[docs[0]])
        self.num_tokens = int(offsets[docs[1]]) - self.first_token
        self.manifest_path = folder / f"{self.name}.json"

    def finished(self) -> dict | None:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        ok = all(
            (self.folder / e["file"]).is_file()
            and (self.folder / e["file"]).stat().st_size == e["bytes"]
            for e in manifest["files"].values()
        )
        return manifest if ok else None

    def write(self, split: StoreSplit, compute, seq_len: int, rows_per_batch: int, dtype, hidden):
        files = {kind: f"{self.name}.{kind}.bin" for kind in FILES}
        maps = {
            kind: np.memmap(
                self.folder / f".{name}.tmp",
                mode="w+",
                dtype=file_dtype(kind, dtype),
                shape=file_shape(kind, self.num_tokens, hidden),
            )  # fmt: skip
            for kind, name in files.items()
        }
        d0, d1 = self.docs
        offsets = split.offsets
        tokens = [split[d] for d in range(d0, d1)]
        local = [np.arange(int(offsets[d]), int(offsets[d + 1])) - self.first_token
                 for d in range(d0, d1)]  # fmt: skip
        rows = pack_documents([len(t) for t in tokens], seq_len).rows
        for start in range(0, len(rows), rows_per_batch):
            chunk = rows[start : start + rows_per_batch]
            batch = build_batch(tokens, chunk, seq_len, pad_id=0)
            where = build_batch(local, chunk, seq_len, pad_id=-1)["input_ids"].reshape(-1).numpy()
            out = compute(batch["input_ids"], batch["labels"], batch["cu_seqlens"])
            real = np.flatnonzero(where >= 0)
            at = where[real]
            maps["hidden"][at] = _to_disk(out.hidden.reshape(-1, hidden)[real].float().cpu(), dtype)
            maps["nll"][at] = out.nll.reshape(-1)[real].float().cpu().numpy()
            maps["greedy"][at] = out.greedy.reshape(-1)[real].cpu().numpy().astype(np.int32)
        entries = {}
        for kind, name in files.items():
            maps[kind].flush()
            del maps[kind]
            path = self.folder / name
            with (self.folder / f".{name}.tmp").open("rb+") as file:
                os.fsync(file.fileno())
            os.replace(self.folder / f".{name}.tmp", path)
            entries[kind] = {"file": name, "bytes": path.stat().st_size,
                             "checksum": file_checksum(path)}  # fmt: skip
        manifest = {"first_token": self.first_token, "num_tokens": self.num_tokens,
                    "docs": list(self.docs), "files": entries}  # fmt: skip
        atomic_json(self.manifest_path, manifest)
        return manifest


def _resume(folder: Path, settings: dict) -> None:
    """Keep an interrupted build with the same settings (its finished parts), else start over."""
    start_build(folder, settings)
    for path in folder.iterdir():
        if path.name.startswith("."):  # a part cut short
            path.unlink()


def _log(message: str, verbose: bool) -> None:
    if verbose:
        print(f"multitoken: features: {message}", file=sys.stderr, flush=True)


def _finish(folder: Path, identity: dict, parts: dict[str, list[dict]], splits) -> None:
    index = {**identity, "format": FEATURES_FORMAT, "splits": {}}
    for name in SPLITS:
        index["splits"][name] = {"num_tokens": splits[name].num_tokens, "parts": parts[name]}
    atomic_json(folder / "index.json", index)


def build_features(
    store: TokenStore,
    folder: str | Path,
    identity: dict,
    compute: Callable,
    *,
    rows_per_batch: int = 8,
    part_tokens: int = PART_TOKENS,
    verify: str = "full",
    verbose: bool = True,
) -> FeatureStore:
    """The features of ``store`` under a frozen backbone: opened from ``folder``, or built.

    A finished folder is checked (``verify``) and refused when damaged: the message names the
    file and says to remove the folder (a build costs a backbone pass over the corpus).

    Args:
        store: the token store.
        folder: ``features-<key>`` (:func:`feature_key` of ``identity``), or any folder.
        identity: what the features depend on, recorded in the index and checked on open:
            ``store`` (the token store's folder name, its content address), ``backbone`` (a
            hash of the decoder's weights and architecture), ``dtype`` (a key of
            :data:`~multitoken.data.features.FEATURE_DTYPES`), ``seq_len``, ``hidden`` (H).
        compute: ``compute(input_ids, labels, cu_seqlens)`` -> the backbone's outputs for a
            packed batch (:class:`~multitoken.frozen.BackboneOutputs`).
        rows_per_batch: rows of ``seq_len`` tokens per backbone call.
        part_tokens: tokens per resumable part (and file).
        verify: ``"full"`` re-hashes a finished folder's files, ``"size"`` checks sizes.
        verbose: progress lines on stderr.

    Raises:
        FeatureError: a damaged folder, features of another identity, a full disk, or a
            float16 overflow.
    """
    folder = Path(folder)
    seq_len, hidden, dtype = int(identity["seq_len"]), int(identity["hidden"]), identity["dtype"]
    with build_lock(folder.with_name(folder.name + ".lock")):
        if folder.exists():
            return open_features(folder, verify, identity)
        splits = {name: store.split(name) for name in SPLITS}
        need = sum(feature_bytes(s.num_tokens, hidden, dtype) for s in splits.values())
        free = shutil.disk_usage(folder.parent).free
        if need > free:
            raise FeatureError(
                f"the features need {need / 1e9:.1f} GB and {folder.parent} has {free / 1e9:.1f}"
                " GB free: free space, set data.cache_dir elsewhere, or use fewer data.max_files"
            )
        partial = folder.with_name(folder.name + ".partial")
        _resume(partial, {**identity, "part_tokens": part_tokens})
        _log(f"{need / 1e6:,.0f} MB for {sum(s.num_tokens for s in splits.values()):,} tokens "
             f"in {folder}", verbose)  # fmt: skip
        parts = {}
        for name, split in splits.items():
            ranges = _part_ranges(np.asarray(split.offsets), part_tokens)
            parts[name] = []
            for i, docs in enumerate(ranges):
                part = _Part(partial, name, i, docs, split.offsets)
                manifest = part.finished()
                if manifest is None:
                    began = time.perf_counter()
                    manifest = part.write(split, compute, seq_len, rows_per_batch, dtype, hidden)
                    rate = part.num_tokens / max(time.perf_counter() - began, 1e-9)
                    _log(f"{name} part {i + 1}/{len(ranges)}: {part.num_tokens:,} tokens, "
                         f"{rate:,.0f} tokens/s", verbose)  # fmt: skip
                parts[name].append(manifest)
        _finish(partial, identity, parts, splits)
        for path in partial.iterdir():  # resume bookkeeping, not part of the store
            if path.suffix == ".json" and path.name != "index.json":
                path.unlink()
        partial.rename(folder)
        return open_features(folder, "size", identity)
