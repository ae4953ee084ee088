"""A checkpoint's integrity manifest: every file with its size and SHA-256, written last.

After every rank has finished writing, each hashes its share of the files; rank 0 gathers the
shares, writes ``manifest.json`` into ``step_N.partial`` and renames the folder to ``step_N``: a
checkpoint folder without a manifest is one whose save never finished. :func:`verify_checkpoint`
checks a checkpoint before anything of it is loaded: the manifest lists exactly the files
present (regular files, no links), with their sizes and hashes (a truncated shard, a flipped
byte, a deleted rank file), the index (``.metadata``) parses without executing anything and
points only at listed files, and every rank's state file reads back. It knows nothing of what
the state dict holds, so it serves any model layout (replicated, FSDP2 shards, DTensor).

The manifest protects against damage, not against an attacker who can write the folder (they
can rewrite the manifest); :mod:`multitoken.train.safe_load` is what keeps such a folder from
running code.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from multitoken.errors import CheckpointError
from multitoken.train.safe_load import load_state, read_metadata

__all__ = [
    "MANIFEST",
    "Manifest",
    "hash_files",
    "write_manifest",
    "read_manifest",
    "verify_checkpoint",
]

MANIFEST = "manifest.json"
_FORMAT = "multitoken-checkpoint/1"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Manifest:
    """What :func:`write_manifest` recorded about one checkpoint."""

    step: int
    world: int
    files: dict[str, dict[str, int | str]]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _listing(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name != MANIFEST and not p.is_dir())


def state_file(rank: int) -> str:
    """The name of rank ``rank``'s small state file (step, schedule, data position, RNG)."""
    return f"extra_rank{rank}.json"


def hash_files(folder: Path, rank: int = 0, world: int = 1) -> dict[str, dict[str, int | str]]:
    """Size and SHA-256 of this rank's share of a finished checkpoint folder's files: every
    ``world``-th file from the ``rank``-th, in name order. The ranks of a save hash their
    shares at once (rank 0 alone used to hash them all while the others waited)."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in _listing(folder)[rank::world]
    }


def write_manifest(
    folder: Path, step: int, world: int, files: dict[str, dict[str, int | str]] | None = None
) -> None:
    """Write a finished checkpoint folder's manifest (atomically) from ``files``, the ranks'
    :func:`hash_files` shares merged (None: hash every file here)."""
    folder = Path(folder)
    files = hash_files(folder) if files is None else dict(sorted(files.items()))
    record = {"format": _FORMAT, "step": step, "world": world, "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> Manifest:
    """The manifest of a checkpoint folder, checked for shape (not against the files).

    Raises:
        CheckpointError: missing (an unfinished save), unreadable, or not ours.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file() or path.is_symlink():
        if (path.parent / "extra_rank0.pt").is_file():  # the pickled state of multitoken 0.1
            raise CheckpointError(
                f"{path.parent} was written by multitoken 0.1 (no {MANIFEST}, pickled "
                "extra_rank*.pt state, which is never loaded: it could run code): start a new "
                "run, or resume it with the version that wrote it"
            )
        raise CheckpointError(f"{path.parent} has no {MANIFEST} (its save did not finish)")
    try:
        if path.stat().st_size > 64 << 20:
            raise ValueError("larger than any manifest we write")
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} manifest")
        step, world, files = int(record["step"]), int(record["world"]), record["files"]
        if world < 1 or not isinstance(files, dict):
            raise ValueError("no ranks or no files")
        for name, entry in files.items():
            if not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
                raise ValueError(f"entry {name!r} lacks a size or a hash")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a valid checkpoint manifest ({err})") from None
    return Manifest(step, world, files)


def verify_checkpoint(folder: Path) -> Manifest:
    """Check a checkpoint folder against its manifest before loading any of it.

    Returns:
        Its manifest.

    Raises:
        CheckpointError: naming the first file that is missing, extra, of another size or
            content, or unreadable.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    present = {str(p.relative_to(folder)): p for p in _listing(folder)}
    for rank in range(manifest.world):
        if state_file(rank) not in manifest.files:
            raise CheckpointError(f"{folder / MANIFEST} does not list {state_file(rank)}")
    for name, entry in manifest.files.items():
        path = present.get(name)
        if path is None:
            raise CheckpointError(f"{folder / name} is missing (listed in {MANIFEST})")
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{folder / name} is not a regular file")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{folder / name} has {size} bytes, {entry['size']} written")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{folder / name} does not match its SHA-256 (damaged)")
    extra = sorted(set(present) - set(manifest.files))
    if extra:
        raise CheckpointError(f"{folder / extra[0]} is not listed in {MANIFEST}")
    metadata = read_metadata(folder)
    for info in metadata.storage_data.values():
        if getattr(info, "relative_path", None) not in manifest.files:
            raise CheckpointError(f"{folder}/.metadata points at a file the checkpoint lacks")
    for rank in range(manifest.world):
        load_state(folder / state_file(rank))
    return manifest
