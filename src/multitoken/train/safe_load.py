"""Reading a checkpoint without running code from it: no unrestricted unpickling.

Left to itself, ``torch.distributed.checkpoint`` (2.13) reads ``.metadata`` with an
unrestricted unpickler, and the non-tensor entries of a state dict (the optimiser's
``param_groups``) with ``torch.load`` in its full-pickle mode: a crafted file in a shared run
folder would run code on whoever resumes or decodes it. This module replaces both readers. The
integrity manifest (:mod:`multitoken.train.manifest`) does not help against that: whoever can
write the folder can rewrite the manifest too. So every read here is one that cannot execute
code:

- ``.metadata``: :class:`RestrictedUnpickler`, which resolves only the handful of DCP metadata
  classes, torch dtypes and ``torch.Size``; anything else (``os.system``, ``builtins.exec``,
  ``copyreg``...) is refused by name.
- non-tensor entries: ``torch.load(weights_only=True)`` (:class:`SafeLoadPlanner`).
- tensors: DCP already uses ``weights_only=True``.
- the per-rank extra state: JSON with tensors as base64 bytes (:func:`dump_state`).
"""

from __future__ import annotations

import base64
import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from multitoken.errors import CheckpointError

__all__ = [
    "RestrictedUnpickler",
    "read_metadata",
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "dump_state",
    "load_state",
    "MAX_STATE_BYTES",
]

# The classes DCP's FileSystemWriter pickles into ``.metadata`` (checked against torch 2.13).
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout's name to torch.strided etc.
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}
_MODULES = {
    "torch.distributed.checkpoint.metadata": dcp_metadata,
    "torch.distributed.checkpoint.filesystem": dcp_filesystem,
}
# A checkpoint's small JSON state; larger is not one we wrote (and would exhaust memory).
MAX_STATE_BYTES = 64 << 20


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only DCP metadata classes, torch dtypes and ``torch.Size``.

    Code runs during unpickling only through the callables a pickle names (``GLOBAL``); refusing
    every name outside a short list of plain data classes leaves nothing to call.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype) or name == "Size":
                return value
        elif (module, name) in _ALLOWED:
            if module in _MODULES:
                return getattr(_MODULES[module], name)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}")


def read_metadata(path: str | Path) -> dcp_metadata.Metadata:
    """A checkpoint's ``.metadata``, read without executing anything from it.

    Raises:
        CheckpointError: unreadable, not DCP metadata, or naming anything but plain data.
    """
    file = Path(path) / ".metadata"
    try:
        with file.open("rb") as stream:
            metadata = RestrictedUnpickler(stream).load()
    except (
        OSError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        pickle.UnpicklingError,
    ) as err:
        raise CheckpointError(f"{file} is not a readable checkpoint index: {err}") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(
        metadata.storage_data, dict
    ):
        raise CheckpointError(f"{file} is not a checkpoint index (DCP metadata)")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by :class:`RestrictedUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by us
            raise CheckpointError("per-rank checkpoint metadata is not supported")
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with non-tensor entries read by ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = str(err).split("WeightsUnpickler error: ")[-1].splitlines()[0]
            raise CheckpointError(
                f"checkpoint entry {read_item.dest_index.fqn} holds more than plain data ({reason})"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return {
            "__tensor__": str(value.dtype).removeprefix("torch."),
            "shape": list(value.shape),
            "data": base64.b64encode(raw).decode("ascii"),
        }
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"checkpoint state keys must be strings, got {list(value)}")
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in checkpoint state: {value!r}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" not in value:
            return {k: _decode(v) for k, v in value.items()}
        dtype = getattr(torch, str(value["__tensor__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {value['__tensor__']!r}")
        raw = bytearray(base64.b64decode(value["data"], validate=True))
        # frombuffer refuses an empty buffer
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.zeros(0).byte()
        return flat.view(dtype).reshape([int(n) for n in value["shape"]]).clone()
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def dump_state(path: Path, state: dict[str, Any]) -> None:
    """Write small per-rank state (numbers, strings, lists, dicts, tensors) as JSON."""
    Path(path).write_text(json.dumps(_encode(state)))


def load_state(path: Path) -> dict[str, Any]:
    """Read :func:`dump_state`'s file back (tensors on the CPU).

    Raises:
        CheckpointError: missing, too large, or not such a file.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise CheckpointError(f"{path} is larger than a checkpoint's state file can be")
        state = _decode(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint state file: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint state file")
    return state
