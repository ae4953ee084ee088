"""The columnar inputs of a :class:`~multitoken.data.sources.Source`: Parquet files and
Hugging Face ``datasets`` (saved to disk, or local files through ``load_dataset``).

Both need the optional ``multitoken[data]`` extra, imported only when such an input is read;
both stream a record batch at a time, so memory does not grow with the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from multitoken.data.documents import Document, one_line, open_regular, read_regular
from multitoken.errors import DataError

# The functions take the Source they read for (``source``), typed loosely: this module sits
# below sources.py, which imports it.
Source = object

__all__ = ["import_optional", "iter_parquet", "iter_hf_disk", "iter_hf"]

_MB = 1_000_000
_EXTRA_HINT = "install the data extra: pip install 'multitoken[data]'"


def import_optional(name: str, what: str):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        raise DataError(f"reading {what} needs the '{name}' package: {_EXTRA_HINT}") from None


def iter_parquet(source: Source) -> Iterator[Document]:
    parquet = import_optional("pyarrow.parquet", "Parquet files")
    arrow = import_optional("pyarrow", "Parquet files")
    for name, path, size in source.regular_files(unreadable_is_bad=True):
        opened = source.open_file(name, path, unreadable_is_bad=True)
        if opened is None:
            continue
        with opened:
            try:
                yield from _parquet_documents(source, parquet.ParquetFile(opened), name)
            except DataError:
                raise
            except (arrow.ArrowException, OSError, ValueError) as err:  # damaged: name it
                source.bad_file(name, f"not a readable Parquet file ({one_line(err)})")
        source.bytes_read += size


def _check_expanded(source: Source, file, name: str) -> None:
    """The text column's size once decompressed (from the footer) within the limit."""
    metadata = file.metadata
    column = file.schema_arrow.get_field_index(source.text_field)
    expanded = sum(
        metadata.row_group(group).column(column).total_uncompressed_size
        for group in range(metadata.num_row_groups)
    )
    if source.max_expanded_mb and expanded > source.max_expanded_mb * _MB:
        raise DataError(
            f"{name}: column '{source.text_field}' expands to {expanded / _MB:,.0f} MB, more "
            f"than data.max_expanded_mb={source.max_expanded_mb:g}: split the file or raise "
            "data.max_expanded_mb"
        )


def _parquet_documents(source: Source, file, name: str) -> Iterator[Document]:
    columns = file.schema_arrow.names
    if source.text_field not in columns:
        raise DataError(
            f"{name} has no column '{source.text_field}' (columns: {columns}): set "
            "data.text_field to the column that holds the text"
        )
    column_type = file.schema_arrow.field(source.text_field).type
    if str(column_type) not in ("string", "large_string", "string_view"):
        raise DataError(
            f"{name}: column '{source.text_field}' is {column_type}, not a string: set "
            "data.text_field to the column that holds the text"
        )
    _check_expanded(source, file, name)
    row = 0
    # Record batches bound the memory to one batch, whatever the file's size.
    for batch in file.iter_batches(batch_size=1024, columns=[source.text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                source.skipped.add(f"{name}:{row}", f"null '{source.text_field}'")
            elif text and not source.too_big(f"{name}:{row}", len(text)):
                yield Document(f"{name}:{row}", text)


def _check_saved(root: Path) -> None:
    """A ``save_to_disk`` folder's files are regular files inside it, before ``datasets``
    opens any (a ``state.json`` may name any path)."""
    folders = [root]
    if (root / "dataset_dict.json").exists():
        splits = json.loads(read_regular(root / "dataset_dict.json", _MB, "datasets file"))
        folders = [root / "train"] if "train" in splits.get("splits", []) else []
    for folder in folders:
        state = json.loads(read_regular(folder / "state.json", _MB, "datasets file"))
        for entry in state["_data_files"]:
            name = entry["filename"]
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"state.json names a data file outside the folder: {name!r}")
            try:
                open_regular(folder / name).close()
            except OSError as err:
                why = getattr(err, "kind", None) or err.strerror or err
                raise DataError(f"its data file '{name}': {why}") from None


def _load_saved(datasets, root: Path):
    try:
        _check_saved(root)
        return datasets.load_from_disk(str(root))
    except DataError as err:
        detail = str(err)
    except Exception as err:  # noqa: BLE001 - datasets and arrow raise many types; name it
        detail = one_line(err)
    raise DataError(
        f"'{root}' is not a readable datasets folder ({detail}): save it again with "
        "save_to_disk, or point data.path at its files with data.format=hf"
    )


def iter_hf_disk(source: Source) -> Iterator[Document]:
    datasets = import_optional("datasets", "a saved Hugging Face dataset")
    dataset = _load_saved(datasets, source.root)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(
                f"'{source.root}' holds splits {list(dataset)} and no 'train': save the "
                "training split alone or under the name 'train'"
            )
        dataset = dataset["train"]
    if source.text_field not in dataset.column_names:
        raise DataError(
            f"'{source.root}' has no column '{source.text_field}' (columns: "
            f"{dataset.column_names}): set data.text_field"
        )
    # Arrow tables are memory-mapped; iterating a batch at a time keeps memory flat.
    rows = (
        {source.text_field: text}
        for batch in dataset.select_columns([source.text_field]).iter(batch_size=1024)
        for text in batch[source.text_field]
    )
    yield from source.iter_records(rows, source.root.name)
    source.bytes_read = source.total_bytes


def iter_hf(source: Source) -> Iterator[Document]:
    datasets = import_optional("datasets", "files through datasets.load_dataset")
    try:
        dataset = datasets.load_dataset(str(source.root), split="train", streaming=True)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; name the input
        raise DataError(
            f"datasets.load_dataset('{source.root}') failed ({type(err).__name__}: {err}): "
            "point data.path at a local folder of csv/json/parquet/text files"
        ) from None
    yield from source.iter_records(iter(dataset), source.root.name)
    source.bytes_read = source.total_bytes
