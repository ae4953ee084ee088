"""A synthetic text corpus of any size, for memory tests and benchmarks (no download).

Documents are runs of made-up words drawn with Zipf-like frequencies, written as JSONL
shards; generation runs at a few hundred MB/s, so a 1 GB corpus costs seconds, not the
minutes its tokenisation takes.

Example::

    paths = write_synthetic_jsonl("corpus/", megabytes=50)   # corpus/shard-00000.jsonl, ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["write_synthetic_jsonl"]

_SHARD_BYTES = 64_000_000


def write_synthetic_jsonl(
    folder: str | os.PathLike[str], megabytes: float, seed: int = 0, mean_doc_bytes: int = 4000
) -> list[Path]:
    """Write about ``megabytes`` MB of JSONL documents (``{"text": ...}``) into ``folder``.

    Args:
        folder: Created if missing; shards are ``shard-00000.jsonl``, ...
        megabytes: Total text to write (10**6 bytes).
        seed: Same seed, same corpus.
        mean_doc_bytes: Mean document size (lengths are log-normal around it).

    Returns:
        The shard paths.
    """
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    vocabulary = [
        bytes(rng.choice(letters, size=int(rng.integers(2, 10)))).decode() for _ in range(8192)
    ]
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)  # Zipf-like: a few words dominate
    weights /= weights.sum()
    words = np.array(vocabulary, dtype=object)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target, written, paths = int(megabytes * 1e6), 0, []
    while written < target:
        path = folder / f"shard-{len(paths):05d}.jsonl"
        shard_bytes = 0
        with path.open("w", encoding="utf-8") as shard:
            while shard_bytes < _SHARD_BYTES and written < target:
                size = int(min(rng.lognormal(np.log(mean_doc_bytes), 0.8), 200_000))
                picks = words[rng.choice(len(words), size=max(1, size // 6), p=weights)]
                line = json.dumps({"text": " ".join(picks)}) + "\n"
                shard.write(line)
                shard_bytes += len(line)
                written += len(line)
        paths.append(path)
    return paths
