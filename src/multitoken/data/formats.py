"""The input formats of a source, and which one a path is (``data.format="auto"``)."""

from __future__ import annotations

from pathlib import Path

from multitoken.data.documents import walk_files
from multitoken.data.jsonl import JSONL_SUFFIXES
from multitoken.errors import DataError

__all__ = ["FORMATS", "detect_format"]

FORMATS = ("auto", "text", "jsonl", "parquet", "hf_disk", "hf")


def detect_format(root: Path) -> str:
    """The format of ``root`` by its name, or by the files of a folder (never ``"auto"``)."""
    if root.is_dir():
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            return "hf_disk"
        names = [name.lower() for name, _ in walk_files(root, frozenset({"__pycache__"}))]
        # A folder of shards is a dataset, not a folder of text documents.
        if names and all(name.endswith(JSONL_SUFFIXES) for name in names):
            return "jsonl"
        if names and all(name.endswith(".parquet") for name in names):
            return "parquet"
        return "text"
    name = root.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise DataError(
        f"cannot tell the format of '{root}' from its name: use a folder of text files, a "
        f".jsonl/.jsonl.gz/.jsonl.zst or .parquet file, or set data.format to one of {FORMATS}"
    )
