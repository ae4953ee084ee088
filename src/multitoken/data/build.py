"""Corpus -> token store in one streamed pass: parallel, resumable, atomic, content-addressed.

:func:`build_store` reads the source once, in order, cuts it into work batches of
documents of about 4 M characters, encodes the work batches in worker processes (or in
this process with the tokenizer's own threaded batch encoding), and appends the ids to the
shard files of the ``train`` or ``val`` split, chosen per document by the stable hash of
its name (:class:`~multitoken.data.split.SplitRule`), so the validation split costs no
second pass.

Resumable: the shards are written in parts of about ``part_tokens`` tokens into
``store-<key>.partial/``; a finished part gets a manifest (written last, atomically), and a
re-run keeps the parts whose manifests and files agree, skips the documents they hold
(read, not tokenised) and goes on. Work batch and part boundaries depend only on the corpus, so
an interrupted and resumed build writes byte-for-byte the store an uninterrupted one does.

Atomic: the finished folder is renamed to ``store-<key>/`` after its index is written; a
folder with that name is complete. The key hashes the source's fingerprint, the tokenizer
and the split settings, so the same corpus and tokenizer reuse the store and a changed
file builds a new one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from multitoken.data.encode import encoder
from multitoken.data.sources import Source
from multitoken.data.split import SplitRule, check_val_fraction
from multitoken.data.store import (
    SPLITS,
    STORE_FORMAT,
    StoreError,
    TokenStore,
    file_checksum,
    open_store,
    token_dtype,
)
from multitoken.data.tokenizer import Tokenizer
from multitoken.errors import DataError

__all__ = ["atomic_json", "build_lock", "build_store", "empty_corpus_message", "store_key"]

WORK_BATCH_CHARS = 1 << 22
PART_TOKENS = 1 << 26  # 64 M tokens: 128 MB of uint16 per part, the work an interruption loses


def _log(message: str, verbose: bool) -> None:
    if verbose:
        print(f"multitoken: {message}", file=sys.stderr, flush=True)


def empty_corpus_message(source: Source) -> str:
    """The error for a source without documents, with what was skipped and why."""
    return (
        f"the {source.describe()} is empty: no non-empty UTF-8 document "
        f"({source.skipped.summary()}); point data.path at text, or set data.text_field"
    )


def store_key(
    source: Source,
    tokenizer: Tokenizer,
    val_fraction: float,
    seed: int,
    part_tokens: int = PART_TOKENS,
    work_batch_chars: int = WORK_BATCH_CHARS,
) -> str:
    """The store's content address: what it is built from, and nothing else (not workers)."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(source.fingerprint().encode())
    hasher.update(tokenizer.backend.to_str().encode())
    settings = [tokenizer.eos_id, val_fraction, seed, part_tokens, work_batch_chars, STORE_FORMAT]
    hasher.update(json.dumps(settings).encode())
    return hasher.hexdigest()


def atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def start_build(folder: Path, settings: dict) -> None:
    """Keep ``folder`` if its build.json holds ``settings`` (a build cut short), else empty it."""
    build_file = folder / "build.json"
    try:
        same = json.loads(build_file.read_text()) == settings
    except (OSError, ValueError):
        same = False
    if folder.exists() and not same:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not build_file.is_file():
        atomic_json(build_file, settings)


def _fsync(path: Path) -> None:
    with path.open("rb") as file:
        os.fsync(file.fileno())


class _PartWriter:
    """Appends one part's tokens to its split files; ``close`` publishes the part."""

    def __init__(self, folder: Path, index: int) -> None:
        self.folder, self.index = folder, index
        self.names = {split: f"{split}-{index:05d}.bin" for split in SPLITS}
        self.files = {s: (folder / f".{n}.tmp").open("wb") for s, n in self.names.items()}
        self.hashers = {split: hashlib.blake2b(digest_size=16) for split in SPLITS}
        self.lengths: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        self.num_tokens = 0

    def append(self, split: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        data = tokens.tobytes()
        self.files[split].write(data)
        self.hashers[split].update(data)
        self.lengths[split].append(lengths)
        self.num_tokens += len(tokens)

    def close(self, docs_read: int) -> dict:
        manifest = {"part": self.index, "docs_read": docs_read, "splits": {}}
        for split, name in self.names.items():
            file = self.files[split]
            file.flush()
            os.fsync(file.fileno())
            file.close()
            os.replace(self.folder / f".{name}.tmp", self.folder / name)
            lengths = np.concatenate([np.zeros(0, np.int64), *self.lengths[split]])
            np.save(self.folder / f"{split}-{self.index:05d}.lengths.npy", lengths)
            manifest["splits"][split] = {
                "file": name,
                "num_tokens": int(lengths.sum()),
                "num_docs": len(lengths),
                "bytes": (self.folder / name).stat().st_size,
                "checksum": self.hashers[split].hexdigest(),
            }
        atomic_json(self.folder / f"part-{self.index:05d}.json", manifest)
        return manifest


def _resume(folder: Path, settings: dict) -> list[dict]:
    """The finished parts of an interrupted build with the same settings; the rest removed."""
    start_build(folder, settings)
    parts: list[dict] = []
    while True:
        path = folder / f"part-{len(parts):05d}.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            break
        lengths_ok = all(
            (folder / f"{split}-{len(parts):05d}.lengths.npy").is_file() for split in SPLITS
        )
        files_ok = all(
            (folder / entry["file"]).is_file()
            and (folder / entry["file"]).stat().st_size == entry["bytes"]
            for entry in manifest["splits"].values()
        )
        if not (lengths_ok and files_ok):
            break
        parts.append(manifest)
    keep = {"build.json"}
    for index, manifest in enumerate(parts):
        keep.add(f"part-{index:05d}.json")
        for split, entry in manifest["splits"].items():
            keep.update({entry["file"], f"{split}-{index:05d}.lengths.npy"})
    for path in folder.iterdir():
        if path.name not in keep:  # a part cut short, temp files
            path.unlink()
    return parts


def _work_batches(
    docs: Iterator, rule: SplitRule, skip: int, work_batch_chars: int
) -> Iterator[tuple[list[str], tuple[np.ndarray, int, list[str]]]]:
    """(texts, (is_val per text, documents read so far, names)) work batches of about
    ``work_batch_chars`` characters."""
    texts: list[str] = []
    is_val: list[bool] = []
    names: list[str] = []
    chars = 0
    for count, doc in enumerate(docs, start=1):
        val = rule.is_val(doc.name)
        if count <= skip:
            continue  # in a finished part: read for the split rule's extremes only
        texts.append(doc.text)
        is_val.append(val)
        names.append(doc.name)
        chars += len(doc.text)
        if chars >= work_batch_chars:
            yield texts, (np.array(is_val), count, names)
            texts, is_val, names, chars = [], [], [], 0
    if texts:
        yield texts, (np.array(is_val), rule.count, names)


def _drop_failed(source: Source, is_val: np.ndarray, names: list[str], failed) -> np.ndarray:
    """``is_val`` without the texts the tokenizer failed on, each a bad record (raised or
    counted)."""
    for index, error in failed:
        source.bad_record(names[index], f"the tokenizer failed on it ({error})", "fix the text")
    return np.delete(is_val, [index for index, _ in failed])


def _progress(source: Source, verbose: bool):
    if not verbose:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("tokenising {task.fields[docs]:,} docs"),
        BarColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=Console(stderr=True), transient=False)


def _write_parts(
    folder, source, tokenizer, dtype, rule, workers, part_tokens, work_batch_chars, verbose
):
    settings = {"dtype": dtype.name, "force_val": rule.force_val, "force_train": rule.force_train}
    parts = _resume(folder, settings)
    skip = parts[-1]["docs_read"] if parts else 0
    if parts:
        _log(f"resuming: {len(parts)} finished part(s), {skip:,} documents done", verbose)
    writer: _PartWriter | None = None
    with _progress(source, verbose) as progress, encoder(tokenizer, dtype, workers) as encode:
        task = progress.add_task("", total=source.total_bytes, docs=0) if progress else None
        batches = _work_batches(iter(source), rule, skip, work_batch_chars)
        for tokens, lengths, failed, (is_val, docs_read, names) in encode(batches):
            if failed:
                is_val = _drop_failed(source, is_val, names, failed)
            writer = writer or _PartWriter(folder, len(parts))
            doc_split = np.repeat(is_val, lengths)
            for split, mask, docs in (("train", ~doc_split, ~is_val), ("val", doc_split, is_val)):
                writer.append(split, tokens[mask], lengths[docs])
            if writer.num_tokens >= part_tokens:
                parts.append(writer.close(docs_read))
                writer = None
            if progress:
                progress.update(task, completed=source.bytes_read, docs=docs_read)
        if writer is not None:
            parts.append(writer.close(rule.count))
    return parts


def _finish(folder: Path, parts: list[dict], source: Source, tokenizer, dtype) -> dict:
    """Write the offsets and the index into ``folder``; returns the index."""
    index = {
        "format": STORE_FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "source": source.describe(),
        "docs_read": parts[-1]["docs_read"] if parts else 0,
        "skipped": source.skipped.to_dict(),
        "splits": {},
    }
    for split in SPLITS:
        num_docs = sum(part["splits"][split]["num_docs"] for part in parts)
        name = f"{split}.offsets.npy"
        # Streamed into a memmap: the offsets of a 100 GB corpus need not fit in memory.
        offsets = np.lib.format.open_memmap(
            folder / name, mode="w+", dtype=np.int64, shape=(num_docs + 1,)
        )
        offsets[0], base, doc = 0, 0, 0
        for index_in_parts in range(len(parts)):
            lengths = np.load(folder / f"{split}-{index_in_parts:05d}.lengths.npy")
            offsets[doc + 1 : doc + 1 + len(lengths)] = base + np.cumsum(lengths)
            base += int(lengths.sum())
            doc += len(lengths)
        offsets.flush()
        del offsets
        _fsync(folder / name)
        entry_parts = [
            {key: part["splits"][split][key] for key in ("file", "num_tokens", "bytes", "checksum")}
            for part in parts
        ]
        index["splits"][split] = {
            "num_docs": num_docs,
            "num_tokens": base,
            "parts": entry_parts,
            "offsets": {
                "file": name,
                "bytes": (folder / name).stat().st_size,
                "checksum": file_checksum(folder / name),
            },
        }
    atomic_json(folder / "index.json", index)
    return index


@contextmanager
def build_lock(path: Path):
    """An exclusive lock between processes building the same store (several launchers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def build_store(
    source: Source,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.02,
    seed: int = 0,
    workers: int = 1,
    part_tokens: int = PART_TOKENS,
    work_batch_chars: int = WORK_BATCH_CHARS,
    verify: str = "full",
    verbose: bool = True,
) -> TokenStore:
    """The token store of ``source`` under ``tokenizer``: opened from the cache, or built.

    A cached store is checked against its index first (``verify``); a truncated or corrupted
    one is reported, deleted and rebuilt.

    Args:
        source: The corpus.
        tokenizer: Encodes the documents; each document is followed by its ``eos_id``.
        cache_dir: Folder of ``store-<key>/``.
        val_fraction: Share of documents (by name hash) in the ``val`` split; with two or
            more documents both splits are non-empty (:mod:`multitoken.data.split`).
        seed: Changes which documents land in validation.
        workers: Tokenisation processes; 1 = this process, with the tokenizer's threads.
        part_tokens: Tokens per resumable part (and shard file).
        work_batch_chars: Characters per encoding task.
        verify: ``"full"`` re-hashes a cached store's files, ``"size"`` checks sizes only.
        verbose: Progress bar and messages on stderr.

    Returns:
        The opened store.

    Raises:
        DataError: If the source yields no document, or on bad input (see
            :mod:`multitoken.data.sources`).
    """
    check_val_fraction(val_fraction)
    if workers < 1 or part_tokens < 1 or work_batch_chars < 1:
        raise DataError("workers, part_tokens and work_batch_chars must be >= 1")
    cache_dir = Path(cache_dir)
    key = store_key(source, tokenizer, val_fraction, seed, part_tokens, work_batch_chars)
    final = cache_dir / f"store-{key}"
    with build_lock(cache_dir / f"store-{key}.lock"):
        if final.exists():
            try:
                return open_store(final, verify)
            except StoreError as err:
                _log(f"the token store is damaged ({err}): rebuilding it", True)
                shutil.rmtree(final)
        dtype = token_dtype(tokenizer.vocab_size)
        partial = cache_dir / f"store-{key}.partial"
        rule: SplitRule | None = SplitRule(val_fraction, seed)
        while rule is not None:
            args = (source, tokenizer, dtype, rule, workers, part_tokens, work_batch_chars, verbose)
            try:
                parts = _write_parts(partial, *args)
            except DataError:  # bad data: the fix changes the key, so the parts are garbage
                shutil.rmtree(partial, ignore_errors=True)
                raise
            docs = {s: sum(p["splits"][s]["num_docs"] for p in parts) for s in SPLITS}
            if rule.count == 0:
                shutil.rmtree(partial)
                raise DataError(empty_corpus_message(source))
            # A small corpus may hash no document to one side: a second pass moves the
            # extreme one there (only ever on corpora of a few documents).
            rule = rule.fixed_up(docs["train"], docs["val"])
        _finish(partial, parts, source, tokenizer, dtype)
        os.replace(partial, final)
        for path in final.iterdir():  # resume bookkeeping, not part of the store
            if path.name.startswith("part-") or path.name.endswith(".lengths.npy"):
                path.unlink()
        (final / "build.json").unlink(missing_ok=True)
        store = open_store(final, "size")
    if source.skipped.total:
        _log(f"{source.describe()}: {source.skipped.summary()}", verbose)
    return store
