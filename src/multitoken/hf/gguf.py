"""A GGUF file as ``model.hf``: checked, then dequantised once into a cached model folder.

``model.hf=model.gguf`` is read by transformers' own GGUF reader (``from_pretrained(folder,
gguf_file=...)``, which dequantises every tensor to fp32; the tokenizer is built from the same
file's metadata) and written with ``save_pretrained`` into a folder under
``<data.cache_dir>/gguf/``, named by the file's SHA-256. From there on the run is that of a
model folder: the folder's gate (:func:`~multitoken.hf.folder.check_model_folder`), training,
checkpoints, ``generate`` and ``export`` read it as any other. The run's config keeps the GGUF
path; a later command finds the folder again by the file's content (or rebuilds it).

Before transformers sees the file, :func:`check_gguf_file` refuses, with one
:class:`~multitoken.errors.ConfigError` naming the fix: anything but a regular file, a file
too small or without the GGUF magic, a header the ``gguf`` package's reader cannot parse,
tensor data past the end of the file, an architecture the adapter does not drive, and a file
without the tokenizer metadata. Nothing in a GGUF is code, and no code of it runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from multitoken.errors import ConfigError
from multitoken.hf.folder import SUPPORTED_MODEL_TYPES, check_model_folder, regular_file

__all__ = ["GGUF_ARCHITECTURES", "GGUFInfo", "check_gguf_file", "gguf_folder", "model_folder"]

# general.architecture values whose model the adapter drives (llama.cpp writes Mistral models
# as "llama"; transformers tells them apart by name).
GGUF_ARCHITECTURES = tuple(a for a in ("llama", "qwen2", "qwen3") if a in SUPPORTED_MODEL_TYPES)
_MAGIC = b"GGUF"
_MIN_BYTES = 24  # magic, version, tensor count, metadata count


@dataclass(frozen=True)
class GGUFInfo:
    """What :func:`check_gguf_file` read from a GGUF header (no tensor data)."""

    path: Path
    architecture: str
    tensors: int
    size: int


def is_gguf(path: str | Path) -> bool:
    """``path`` names a GGUF file (by its suffix): what ``model.hf`` then treats as one."""
    return Path(path).suffix.lower() == ".gguf"


def _reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConfigError(
            f"{path} is a GGUF file, which needs the gguf and accelerate packages: "
            "pip install 'multitoken[gguf]'"
        ) from None
    try:
        return GGUFReader(str(path), "r")
    except Exception as err:  # a damaged header fails in many ways inside the parser
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ConfigError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {reason}): "
            "download or convert it again"
        ) from None


def _field(reader, key: str) -> str | None:
    """A string field's value (the reader's oldest API: gguf 0.10 has no ``contents()``)."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    try:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (UnicodeDecodeError, IndexError, TypeError):
        return None


def check_gguf_file(path: str | Path) -> GGUFInfo:
    """Refuse a GGUF file that is unsafe or that the adapter cannot use (module docstring)."""
    path = Path(path)
    regular_file(path, "GGUF file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        magic = handle.read(4)
    if size < _MIN_BYTES or magic != _MAGIC:
        raise ConfigError(
            f"{path} is not a GGUF file (no GGUF header): point model.hf at a .gguf file or a "
            "folder written by save_pretrained"
        )
    reader = _reader(path)
    for tensor in reader.tensors:
        if int(tensor.data_offset) + int(tensor.n_bytes) > size:
            raise ConfigError(
                f"{path}: tensor {tensor.name!r} runs past the end of the file (truncated?): "
                "download or convert it again"
            )
    architecture = _field(reader, "general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"{path} holds a {architecture!r} model; model.hf drives GGUF architectures "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    if _field(reader, "tokenizer.ggml.model") is None or "tokenizer.ggml.tokens" not in (
        reader.fields
    ):
        raise ConfigError(
            f"{path} has no tokenizer (tokenizer.ggml.* metadata): use a GGUF converted with "
            "its tokenizer"
        )
    return GGUFInfo(path, architecture, len(reader.tensors), size)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            sha.update(block)
    return sha.hexdigest()


def _convert(path: Path, out: Path) -> None:
    """transformers' GGUF reader: the dequantised model and the file's tokenizer, saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    kwargs = dict(gguf_file=path.name, local_files_only=True, trust_remote_code=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), dtype=torch.float32, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        # Dequantised already (plain fp32 Linear layers): drop the GGUF quantizer's mark, which
        # only tells save_pretrained that the model cannot be written back.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ConfigError(
            f"{path} cannot be read by transformers' GGUF reader ({type(err).__name__}: {reason})"
        ) from None
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def gguf_folder(path: str | Path, cache_dir: str | Path) -> Path:
    """The model folder of the GGUF file ``path``: built on first use under
    ``<cache_dir>/gguf/<name>-<sha256>``, then found by the file's content; it passes the
    model folder's gate before it is returned.

    Raises:
        ConfigError: the file's gate (:func:`check_gguf_file`), a conversion transformers
            refuses, or the folder's gate.
    """
    path = Path(path)
    check_gguf_file(path)
    folder = Path(cache_dir) / "gguf" / f"{path.stem}-{_digest(path)[:20]}"
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _convert(path, staging)
            try:
                staging.rename(folder)  # atomic: a reader sees no folder or a whole one
            except OSError:
                if not folder.is_dir():  # not another process having finished first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    check_model_folder(folder)
    return folder


def model_folder(path: str | Path, cache_dir: str | Path) -> Path:
    """``model.hf`` as a model folder: itself, or a GGUF file's (:func:`gguf_folder`)."""
    return gguf_folder(path, cache_dir) if is_gguf(path) else Path(path)
